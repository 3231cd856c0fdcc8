"""`adiuva migrate`: a homelab data dir holding every kind of data, moved by the real CLI into a
real PostgreSQL and a real S3 server (moto), verified; the data dir is left as it was."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

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
