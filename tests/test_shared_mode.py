"""The shared (cloud) mode end to end: the real `adiuva serve` process on DATABASE_URL
(PostgreSQL), S3_BUCKET (moto's S3 server) and REDIS_URL, as each node of a cluster runs. What a
client stores goes to PostgreSQL and the bucket; the data dir's SQLite file holds no account."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import asyncpg
import boto3

from adiuva_server.db import connect
from tests.conftest import run_cli
from tests.servers_s3 import ACCESS_KEY, REGION, SECRET_KEY


def shared_env(pg_url: str, s3_bucket, redis_url: str) -> dict[str, str]:
    return {"DATABASE_URL": pg_url, "REDIS_URL": redis_url, "JWT_SECRET": "the-same-secret-on-every-node-32b", "S3_BUCKET": s3_bucket.name,
            "S3_ENDPOINT_URL": s3_bucket.endpoint_url, "S3_REGION": REGION,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


async def test_serve_on_postgresql_s3_and_redis_keeps_nothing_in_sqlite(server_process, data_dir, pg_url,
                                                                         s3_bucket, redis_url):
    env = shared_env(pg_url, s3_bucket, redis_url)
    server = server_process(**env)
    data = b"an encrypted record " * 100
    digest = hashlib.sha256(data).hexdigest()
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/v1/auth/register", json={"email": "ada@example.org", "password": "correct horse battery"}) as r:
            assert r.status == 201, await r.text()
            headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        async with http.post("/api/v1/storage/records", params={"table": "notes"}, data=data,
                             headers={**headers, "X-Checksum": digest}) as r:
            assert r.status == 201, await r.text()
            record = await r.json()
        async with http.get(f"/api/v1/storage/records/{record['id']}", headers=headers) as r:
            assert r.status == 200 and await r.read() == data
        async with http.get("/api/v1/admin/status", headers=headers) as r:  # the first account is the admin
            assert (await r.json())["backends"] == {"database": "postgresql", "blobs": "s3", "rate_limits": "redis"}

    # The CLI of the same settings finds the account (on PostgreSQL) while the server runs.
    listed = await asyncio.to_thread(run_cli, data_dir, "user", "list", **env)
    assert listed.returncode == 0 and "ada@example.org" in listed.stdout, listed.stderr
    assert server.stop() == 0

    # Everything went to PostgreSQL and the bucket: the data dir's SQLite file holds no account,
    # no record, and its blob folder no object.
    conn = connect(data_dir / "adiuva.db", readonly=True)
    try:
        for table in ("users", "storage_records", "refresh_tokens", "storage_usage"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
    finally:
        conn.close()
    assert [p for p in (data_dir / "blobs").rglob("*") if p.is_file()] == []

    pg = await asyncpg.connect(pg_url)
    try:
        assert await pg.fetchval("SELECT email FROM users") == "ada@example.org"
        assert await pg.fetchval("SELECT checksum FROM storage_records WHERE id = $1", record["id"]) == digest
    finally:
        await pg.close()
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=s3_bucket.endpoint_url, aws_access_key_id=ACCESS_KEY,
                      aws_secret_access_key=SECRET_KEY)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket.name).get("Contents", [])]
    assert any(digest in k for k in keys), keys


async def test_the_cli_works_on_postgresql(data_dir, pg_url):
    """The commands that open the stores themselves (user, plugin, doctor) open the backend the
    settings choose: on DATABASE_URL the accounts are PostgreSQL's, none lands in SQLite."""
    env = {"DATABASE_URL": pg_url, "ADIUVA_SINGLE_NODE": "true"}

    def cli(*args: str):
        return run_cli(data_dir, *args, **env)

    out = await asyncio.to_thread(cli, "user", "add", "ada@example.org", "--password", "correct horse battery",
                                  "--admin", "--create")
    assert out.returncode == 0, out.stderr
    for args in (("user", "add", "bob@example.org", "--password", "correct horse battery"),
                 ("user", "set-tier", "bob@example.org", "pro"), ("user", "disable", "bob@example.org")):
        out = await asyncio.to_thread(cli, *args)
        assert out.returncode == 0, (args, out.stderr)
    out = await asyncio.to_thread(cli, "plugin", "pending")
    assert out.returncode == 0 and "nothing waits for review" in out.stdout, out.stderr
    out = await asyncio.to_thread(cli, "doctor")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "[  ok] database: PostgreSQL reachable" in out.stdout, out.stdout
    pg = await asyncpg.connect(pg_url)
    try:
        rows = await pg.fetch("SELECT email, is_admin, disabled FROM users ORDER BY email")
        assert [tuple(r) for r in rows] == [("ada@example.org", True, False), ("bob@example.org", False, True)]
        assert await pg.fetchval("SELECT tier FROM users WHERE email = 'bob@example.org'") == "pro"
        out = await asyncio.to_thread(cli, "user", "delete", "bob@example.org", "--yes")
        assert out.returncode == 0, out.stderr
        assert await pg.fetchval("SELECT count(*) FROM users") == 1
    finally:
        await pg.close()
    conn = connect(data_dir / "adiuva.db", readonly=True)
    try:
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0
    finally:
        conn.close()
