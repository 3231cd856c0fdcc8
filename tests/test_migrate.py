"""`adiuva migrate`: a homelab data dir holding every kind of data, moved by the real CLI into a
real PostgreSQL and a real S3 server (moto), verified; the data dir is left as it was."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adiuva_server.app import create_app
from adiuva_server.cli import app as cli_app
from adiuva_server.db.postgres import PgDatabase
from tests.conftest import make_settings, register

API = "/api/v1"
FAST = {"free": 100_000, "pro": 100_000, "power": 100_000, "team": 100_000}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vector(vid: str, values) -> dict:
    payload = f"sealed:{vid}".encode()
    return {"id": vid, "values": [float(x) for x in values], "payload": base64.b64encode(payload).decode(),
            "checksum": sha(payload)}


def fingerprint(data_dir: Path) -> dict[str, str]:
    """Every file of the data dir (but SQLite's shared-memory index, which readers touch) and its hash."""
    return {str(p.relative_to(data_dir)): sha(p.read_bytes()) for p in sorted(data_dir.rglob("*"))
            if p.is_file() and not p.name.endswith("-shm")}


async def homelab(aiohttp_client, data_dir) -> dict:
    """A homelab server with accounts, tokens, records (replaced, deleted), bulk records, backups,
    vectors, a plugin installed and rated; returns what each user expects back."""
    client = await aiohttp_client(create_app(make_settings(data_dir, default_tier="team", rate_limits=FAST)))
    admin = await register(client, "admin@example.org")
    ada = await register(client, "ada@example.org")
    bob = await register(client, "bob@example.org")
    want: dict = {"records": {}, "backups": {}}
    for who, acct in (("ada", ada), ("bob", bob)):
        for i in range(3):
            body = os.urandom(1000 + i) + who.encode()
            resp = await client.post(f"{API}/storage/records", params={"table": "notes"}, data=body,
                                     headers={**acct.headers, "X-Checksum": sha(body)})
            assert resp.status == 201, await resp.text()
            want["records"][(who, (await resp.json())["id"])] = body
    ada_ids = [rid for (who, rid) in want["records"] if who == "ada"]
    replaced = b"replaced " * 100
    resp = await client.put(f"{API}/storage/records/{ada_ids[0]}", data=replaced,
                            headers={**ada.headers, "X-Checksum": sha(replaced)})
    assert resp.status == 200, await resp.text()
    want["records"][("ada", ada_ids[0])] = replaced
    assert (await client.delete(f"{API}/storage/records/{ada_ids[1]}", headers=ada.headers)).status == 204
    del want["records"][("ada", ada_ids[1])]
    shared = b"the same bytes twice"  # two records, one object
    batch = [{"table": "tasks", "data": base64.b64encode(shared).decode(), "checksum": sha(shared)} for _ in range(2)]
    resp = await client.post(f"{API}/storage/records/batch", json={"records": batch}, headers=bob.headers)
    assert resp.status == 201, await resp.text()
    for item in (await resp.json())["items"]:
        want["records"][("bob", item["id"])] = shared
    for n in range(2):
        body = os.urandom(5000) + bytes([n])
        resp = await client.put(f"{API}/backup", data=body, headers={
            **ada.headers, "X-Backup-Version": f"1.{n}", "X-Backup-Timestamp": f"2026-12-0{n + 1}T10:00:00Z",
            "X-Backup-Checksum": sha(body)})
        assert resp.status == 201, await resp.text()
        want["backups"][(await resp.json())["id"]] = body
    resp = await client.post(f"{API}/storage/vectors/upsert", headers=ada.headers, json={
        "vectors": [vector(f"v{i}", [i, 1.0, -i / 2]) for i in range(20)]})
    assert resp.status == 200, await resp.text()
    assert (await client.post(f"{API}/plugins/github-sync/install", headers=ada.headers)).status == 200
    assert (await client.put(f"{API}/plugins/github-sync/rating", headers=ada.headers, json={"stars": 4})).status == 200
    want.update(admin=admin, ada=ada, bob=bob)
    await client.close()
    return want


def run_migrate(data_dir: Path, pg_url: str, bucket, *extra: str):
    env = {"ADIUVA_DATA_DIR": str(data_dir), "DATABASE_URL": pg_url, "AWS_ACCESS_KEY_ID": bucket.access_key_id,
           "AWS_SECRET_ACCESS_KEY": bucket.secret_access_key, "S3_REGION": bucket.region}
    return CliRunner().invoke(cli_app, ["migrate", "--s3-bucket", bucket.name, "--s3-endpoint-url",
                                        bucket.endpoint_url, *extra], env=env)


async def test_a_homelab_server_migrates_into_postgresql_and_s3_verified(aiohttp_client, data_dir, pg_url, s3_bucket):
    want = await homelab(aiohttp_client, data_dir)
    before = fingerprint(data_dir)
    done = await asyncio.to_thread(run_migrate, data_dir, pg_url, s3_bucket)
    assert done.exit_code == 0, done.output
    assert "migrated: " in done.output and "counts verified" in done.output
    assert pg_url.split("@")[0] not in done.output  # the URL (and its password) is never printed
    assert fingerprint(data_dir) == before  # the homelab data dir is only read

    pg = await PgDatabase.open(pg_url)
    blobs = s3_bucket.store()
    await blobs.open()
    try:
        emails = {r[0]: r[1] for r in await pg.fetch("SELECT email, is_admin FROM users")}
        assert emails == {"admin@example.org": True, "ada@example.org": False, "bob@example.org": False}
        assert await pg.fetchval("SELECT count(*) FROM refresh_tokens") >= 3
        ids = {r[0]: r[1] for r in await pg.fetch("SELECT id, email FROM users")}
        rows = await pg.fetch("SELECT user_id, id, checksum FROM storage_records WHERE checksum IS NOT NULL")
        got = {(ids[r[0]].split("@")[0], r[1]): r[2] for r in rows}
        assert got == {k: sha(v) for k, v in want["records"].items()}
        assert await pg.fetchval("SELECT count(*) FROM storage_records WHERE checksum IS NULL") == 1  # the tombstone
        backups = {r[0]: r[1] for r in await pg.fetch("SELECT id, checksum FROM storage_backups")}
        assert backups == {k: sha(v) for k, v in want["backups"].items()}
        assert await pg.fetchval("SELECT count(*) FROM vector_items") == 20
        assert await pg.fetchval("SELECT install_count FROM plugins WHERE id = 'github-sync'") == 1
        assert await pg.fetchval("SELECT stars FROM plugin_ratings") == 4
        # Every object, byte-identical in the bucket.
        for body in [*want["records"].values(), *want["backups"].values()]:
            assert (await blobs.read_many([sha(body)]))[0] == body
    finally:
        await blobs.close()
        await pg.close()

    # Again into the same database: refused, nothing changed (the objects are there already).
    again = await asyncio.to_thread(run_migrate, data_dir, pg_url, s3_bucket)
    assert again.exit_code == 1 and "already has users" in again.output


async def test_a_migrated_server_is_served_by_two_nodes_byte_identical(aiohttp_client, data_dir, tmp_path, pg_url,
                                                                       s3_bucket, redis_url):
    want = await homelab(aiohttp_client, data_dir)
    assert (await asyncio.to_thread(run_migrate, data_dir, pg_url, s3_bucket)).exit_code == 0
    secret = (data_dir / "jwt_secret").read_text().strip()
    nodes = []
    for i in range(2):
        settings = make_settings(
            tmp_path / f"node{i}", database_url=pg_url, s3_bucket=s3_bucket.name, s3_endpoint_url=s3_bucket.endpoint_url,
            s3_region=s3_bucket.region, aws_access_key_id=s3_bucket.access_key_id,
            aws_secret_access_key=s3_bucket.secret_access_key, redis_url=redis_url, jwt_secret=secret,
            rate_limits=FAST)
        nodes.append(await aiohttp_client(create_app(settings)))
    for node in nodes:
        # Tokens the homelab server issued work on both nodes; so do the passwords.
        me = await (await node.get(f"{API}/auth/me", headers=want["ada"].headers)).json()
        assert me["email"] == "ada@example.org"
        resp = await node.post(f"{API}/auth/login", json={"email": "bob@example.org", "password": want["bob"].password})
        assert resp.status == 200
        admin = await node.get(f"{API}/admin/status", headers=want["admin"].headers)
        assert admin.status == 200
        for (who, rid), body in want["records"].items():
            resp = await node.get(f"{API}/storage/records/{rid}", headers=want[who].headers)
            assert resp.status == 200 and await resp.read() == body
        resp = await node.get(f"{API}/backup", headers=want["ada"].headers)
        latest = list(want["backups"].values())[-1]  # the second one sent (1.1)
        assert resp.status == 200 and await resp.read() == latest
        history = await (await node.get(f"{API}/backup/history", headers=want["ada"].headers)).json()
        assert [b["version"] for b in history["items"]] == ["1.1", "1.0"]
        resp = await node.post(f"{API}/storage/vectors/search", headers=want["ada"].headers,
                               json={"values": [7.2, 1.0, -3.6], "top_k": 3})
        assert [m["id"] for m in (await resp.json())["matches"]] == ["v7", "v8", "v6"]
        installed = await (await node.get(f"{API}/plugins/installed", headers=want["ada"].headers)).json()
        assert [i["plugin_id"] for i in installed["items"]] == ["github-sync"]
        changes = await (await node.get(f"{API}/storage/changes", params={"since": 0},
                                        headers=want["ada"].headers)).json()
        assert [c["op"] for c in changes["changes"]].count("delete") == 1  # the tombstone travelled too


async def test_a_corrupt_object_stops_the_migration_before_any_row(aiohttp_client, data_dir, pg_url, s3_bucket):
    want = await homelab(aiohttp_client, data_dir)
    victim = sha(next(iter(want["backups"].values())))
    path = data_dir / "blobs" / "objects" / victim[:2] / victim
    path.write_bytes(b"x" + path.read_bytes()[1:])  # same size, other bytes
    done = await asyncio.to_thread(run_migrate, data_dir, pg_url, s3_bucket)
    assert done.exit_code == 1 and "does not hash to its name" in done.output
    pg = await PgDatabase.open(pg_url)
    try:
        assert await pg.fetchval("SELECT count(*) FROM users") == 0
    finally:
        await pg.close()


async def test_migrate_refuses_bad_input_and_a_running_server(data_dir, pg_url, s3_bucket, tmp_path):
    missing = await asyncio.to_thread(run_migrate, tmp_path / "nothing-here", pg_url, s3_bucket)
    assert missing.exit_code == 2 and "no Adiuva database" in missing.output
    not_pg = CliRunner().invoke(cli_app, ["migrate", "--to", "mysql://u:pw@h/db", "--s3-bucket", "b"],
                                env={"ADIUVA_DATA_DIR": str(data_dir)})
    assert not_pg.exit_code == 2 and "pw" not in not_pg.output


async def test_migrate_refuses_while_the_homelab_server_runs(server_process, data_dir, pg_url, s3_bucket):
    server = await asyncio.to_thread(server_process)
    done = await asyncio.to_thread(run_migrate, data_dir, pg_url, s3_bucket)
    assert done.exit_code == 1 and "a server is running" in done.output
    server.stop()


@pytest.fixture
def second_pg(postgres_server):
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture
def second_bucket(s3_endpoint):
    import uuid

    import boto3

    from tests.servers_s3 import ACCESS_KEY, REGION, SECRET_KEY, S3Bucket

    bucket = S3Bucket(s3_endpoint, f"test-{uuid.uuid4().hex[:16]}")
    boto3.client("s3", region_name=REGION, endpoint_url=s3_endpoint, aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=bucket.name)
    return bucket


def cluster_env(pg_url: str, bucket) -> dict[str, str]:
    return {"DATABASE_URL": pg_url, "S3_BUCKET": bucket.name, "S3_ENDPOINT_URL": bucket.endpoint_url,
            "S3_REGION": bucket.region, "AWS_ACCESS_KEY_ID": bucket.access_key_id,
            "AWS_SECRET_ACCESS_KEY": bucket.secret_access_key, "ADIUVA_SINGLE_NODE": "true",
            "JWT_SECRET": "a-cluster-secret-of-at-least-32-bytes!!"}


async def test_a_postgresql_server_backup_restores_into_either_backend(aiohttp_client, data_dir, tmp_path, pg_url,
                                                                       s3_bucket, second_pg, second_bucket):
    want = await homelab(aiohttp_client, data_dir)
    assert (await asyncio.to_thread(run_migrate, data_dir, pg_url, s3_bucket)).exit_code == 0
    node = tmp_path / "node"  # a cluster node's data dir: nothing of the data in it
    archive = tmp_path / "cluster.tar"
    env = {"ADIUVA_DATA_DIR": str(node), **cluster_env(pg_url, s3_bucket)}
    made = await asyncio.to_thread(CliRunner().invoke, cli_app, ["backup", "create", "--out", str(archive)], env=env)
    assert made.exit_code == 0, made.output
    assert "3 users" in made.output and f"{len(want['records'])} records" in made.output
    checked = await asyncio.to_thread(CliRunner().invoke, cli_app, ["backup", "verify", str(archive)])
    assert checked.exit_code == 0, checked.output

    # Into a data dir (SQLite and files), served: the same logins, bytes and installs.
    home = tmp_path / "home"
    back = await asyncio.to_thread(CliRunner().invoke, cli_app, ["backup", "restore", str(archive), "--data-dir", str(home)])
    assert back.exit_code == 0, back.output
    client = await aiohttp_client(create_app(make_settings(home, rate_limits=FAST)))
    resp = await client.post(f"{API}/auth/login", json={"email": "ada@example.org", "password": want["ada"].password})
    assert resp.status == 200
    ada = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
    for (who, rid), body in want["records"].items():
        if who == "ada":
            resp = await client.get(f"{API}/storage/records/{rid}", headers=ada)
            assert resp.status == 200 and await resp.read() == body
    resp = await client.post(f"{API}/storage/vectors/search", headers=ada, json={"values": [3.0, 1.0, -1.5], "top_k": 1})
    assert (await resp.json())["matches"][0]["id"] == "v3"
    installed = await (await client.get(f"{API}/plugins/installed", headers=ada)).json()
    assert [i["plugin_id"] for i in installed["items"]] == ["github-sync"]
    await client.close()

    # Into another, empty PostgreSQL and bucket.
    restored = await asyncio.to_thread(CliRunner().invoke, cli_app, [
        "backup", "restore", str(archive), "--data-dir", str(tmp_path / "node2"), "--to", second_pg,
        "--s3-bucket", second_bucket.name, "--s3-endpoint-url", second_bucket.endpoint_url],
        env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    assert restored.exit_code == 0, restored.output
    pg = await PgDatabase.open(second_pg)
    blobs = second_bucket.store()
    await blobs.open()
    try:
        assert await pg.fetchval("SELECT count(*) FROM users") == 3
        assert await pg.fetchval("SELECT count(*) FROM storage_records WHERE checksum IS NOT NULL") == len(want["records"])
        for body in [*want["records"].values(), *want["backups"].values()]:
            assert (await blobs.read_many([sha(body)]))[0] == body
    finally:
        await blobs.close()
        await pg.close()
    assert (tmp_path / "node2" / "jwt_secret").is_file()
