"""Whole-server backup and restore, taken while the server is serving and writing; and doctor."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import threading
import time

import aiohttp
import pytest

from adiuva_server import server_backup
from tests.conftest import ServerProcess, run_cli

FAST = {"ADIUVA_RATE_LIMITS": "free=100000,pro=100000,power=100000,team=100000", "ADIUVA_DEFAULT_TIER": "pro",
        "ADIUVA_LOG_LEVEL": "WARNING"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put_record(http, auth, data: bytes, table: str = "notes") -> dict:
    resp = await http.post(f"/api/v1/storage/records?table={table}", data=data,
                           headers={**auth, "X-Checksum": sha(data), "Content-Type": "application/octet-stream"})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def populate(http) -> dict:
    """Two users with records, a desktop backup and vectors; returns what must survive."""
    state = {"users": {}}
    for email in ("ada@example.org", "bob@example.org"):
        resp = await http.post("/api/v1/auth/register", json={"email": email, "password": "correct horse"})
        tokens = await resp.json()
        auth = {"Authorization": f"Bearer {tokens['access_token']}"}
        records = {}
        for i in range(5):
            data = os.urandom(1000 + i) + email.encode()
            records[(await put_record(http, auth, data))["id"]] = data
        backup = os.urandom(50_000)
        resp = await http.put("/api/v1/backup", data=backup, headers={
            **auth, "X-Backup-Version": "7", "X-Backup-Timestamp": "2026-11-26T03:00:00Z", "X-Backup-Checksum": sha(backup)})
        assert resp.status == 201, await resp.text()
        payload = os.urandom(64)
        vectors = [{"id": f"v{i}", "values": [float(i), 1.0, 2.0], "payload": base64.b64encode(payload).decode(),
                    "checksum": sha(payload)} for i in range(10)]
        resp = await http.post("/api/v1/storage/vectors/upsert", json={"metric": "l2", "vectors": vectors}, headers=auth)
        assert resp.status == 200, await resp.text()
        state["users"][email] = {"tokens": tokens, "auth": auth, "records": records, "backup": backup}
    return state


async def churn(http, auth, stop: asyncio.Event) -> int:
    """Writes that keep the server busy while the backup runs: create, replace, delete."""
    n = 0
    while not stop.is_set():
        rec = await put_record(http, auth, os.urandom(3000), table="churn")
        data = os.urandom(2000)
        resp = await http.put(f"/api/v1/storage/records/{rec['id']}", data=data, headers={**auth, "X-Checksum": sha(data)})
        assert resp.status == 200, await resp.text()
        if n % 2:
            assert (await http.delete(f"/api/v1/storage/records/{rec['id']}", headers=auth)).status == 204
        n += 1
    return n


async def test_backup_under_write_load_restores_everything(tmp_path):
    source, target = tmp_path / "source", tmp_path / "restored"
    server = ServerProcess(source, **FAST)
    async with aiohttp.ClientSession(server.url) as http:
        state = await populate(http)
        stop = asyncio.Event()
        writers = [asyncio.create_task(churn(http, u["auth"], stop)) for u in state["users"].values()]
        await asyncio.sleep(0.3)
        out = await asyncio.to_thread(run_cli, source, "backup", "create", "--out", str(tmp_path / "snap.tar"))
        await asyncio.sleep(0.2)
        stop.set()
        writes = sum(await asyncio.gather(*writers))
    assert out.returncode == 0, out.stderr
    assert writes > 0
    assert server.stop() == 0

    verify = run_cli(source, "backup", "verify", str(tmp_path / "snap.tar"))
    assert verify.returncode == 0, verify.stderr
    restore = run_cli(source, "backup", "restore", str(tmp_path / "snap.tar"), "--data-dir", str(target))
    assert restore.returncode == 0, restore.stderr
    doctor = run_cli(target, "doctor")
    assert doctor.returncode == 0, doctor.stdout
    assert "[FAIL]" not in doctor.stdout

    restored = ServerProcess(target, **FAST)
    async with aiohttp.ClientSession(restored.url) as http:
        for email, user in state["users"].items():
            auth = user["auth"]  # the access token issued before the backup still works
            me = await http.get("/api/v1/auth/me", headers=auth)
            assert me.status == 200 and (await me.json())["email"] == email
            for record_id, data in user["records"].items():
                resp = await http.get(f"/api/v1/storage/records/{record_id}", headers=auth)
                assert resp.status == 200
                assert await resp.read() == data and resp.headers["X-Checksum"] == sha(data)
            # Every record the snapshot holds (churn included) reads back whole.
            listing = await (await http.get("/api/v1/storage/records?limit=1000", headers=auth)).json()
            for item in listing["items"]:
                body = await (await http.get(f"/api/v1/storage/records/{item['id']}", headers=auth)).read()
                assert sha(body) == item["checksum"]
            backup = await http.get("/api/v1/backup", headers=auth)
            assert await backup.read() == user["backup"]
            found = await http.post("/api/v1/storage/vectors/search", json={"values": [3.0, 1.0, 2.0], "top_k": 3}, headers=auth)
            assert [m["id"] for m in (await found.json())["matches"]][0] == "v3"
            refreshed = await http.post("/api/v1/auth/refresh", json={"refresh_token": user["tokens"]["refresh_token"]})
            assert refreshed.status == 200
    assert restored.stop() == 0


async def test_damaged_archive_is_refused_and_changes_nothing(tmp_path):
    source, target = tmp_path / "source", tmp_path / "target"
    run_cli(source, "user", "add", "ada@example.org", "--password", "correct horse", "--create")
    run_cli(target, "user", "add", "keep@example.org", "--password", "correct horse", "--create")
    archive = tmp_path / "snap.tar"
    assert run_cli(source, "backup", "create", "--out", str(archive)).returncode == 0
    raw = bytearray(archive.read_bytes())
    raw[2048] ^= 0xFF  # inside the first member's data (the database)
    damaged = tmp_path / "damaged.tar"
    damaged.write_bytes(bytes(raw))
    out = run_cli(source, "backup", "verify", str(damaged))
    assert out.returncode == 1 and "failed verification" in out.stderr
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    out = run_cli(source, "backup", "restore", str(damaged), "--data-dir", str(target), "--force")
    assert out.returncode == 1 and "failed verification" in out.stderr
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert not [p for p in tmp_path.iterdir() if ".restore-" in p.name]
    # Without --force a non-empty data dir is refused; with it, the good archive replaces it.
    out = run_cli(source, "backup", "restore", str(archive), "--data-dir", str(target))
    assert out.returncode == 1 and "--force" in out.stderr
    out = run_cli(source, "backup", "restore", str(archive), "--data-dir", str(target), "--force")
    assert out.returncode == 0, out.stderr
    listed = run_cli(target, "user", "list", "--json").stdout
    assert "ada@example.org" in listed and "keep@example.org" not in listed


def test_restore_refuses_a_running_servers_data_dir(tmp_path, server_process, data_dir):
    archive = tmp_path / "snap.tar"
    server = server_process()
    assert run_cli(data_dir, "backup", "create", "--out", str(archive)).returncode == 0
    out = run_cli(data_dir, "backup", "restore", str(archive), "--data-dir", str(data_dir), "--force")
    assert out.returncode == 1 and "server is running" in out.stderr
    # And a second server on the same data dir is refused.
    second = run_cli(data_dir, "serve", "--port", "0")
    assert second.returncode == 2 and "already running" in second.stderr
    assert server.stop() == 0


def test_backup_list_and_scheduled_backups(tmp_path, data_dir):
    out = run_cli(data_dir, "backup", "list")  # looking needs no database, and creates nothing
    assert out.returncode == 0 and out.stdout.startswith("no backups") and not data_dir.exists()
    server = ServerProcess(data_dir, ADIUVA_BACKUP_INTERVAL="60", ADIUVA_BACKUP_KEEP="2")
    server.stop()
    assert run_cli(data_dir, "backup", "list").stdout.startswith("no backups")
    assert run_cli(data_dir, "backup", "create").returncode == 0
    listed = run_cli(data_dir, "backup", "list").stdout
    assert listed.startswith("adiuva-") and "1 users" not in listed
    out = run_cli(data_dir, "serve", ADIUVA_BACKUP_INTERVAL="5s")
    assert out.returncode == 2 and "ADIUVA_BACKUP_INTERVAL" in out.stderr


async def test_scheduler_writes_and_prunes(tmp_path, data_dir):
    from adiuva_server.app import create_app
    from adiuva_server.server_backup import list_backups, prune_backups
    from tests.conftest import make_settings

    from adiuva_server.db import Database
    from adiuva_server.server_backup import BackupError, create_backup

    settings = make_settings(data_dir)
    create_app(settings)  # creates the data dir and secret
    try:
        await create_backup(settings.with_secret())
    except BackupError as exc:
        assert "no database" in str(exc)
    else:
        raise AssertionError("backed up a data dir without a database")
    await (await Database.open(settings.db_path)).close()

    manual, _ = await create_backup(settings.with_secret())  # an admin's, before an upgrade say
    for _ in range(3):
        await asyncio.sleep(1.05)  # archive names are per second
        await create_backup(settings.with_secret(), scheduled=True)
    assert len(list_backups(settings)) == 4
    assert len(prune_backups(settings, 2)) == 1
    kept = [p for p, _, _ in list_backups(settings)]
    assert len(kept) == 3 and manual in kept  # the schedule prunes only its own


def test_doctor_finds_and_fixes(tmp_path, data_dir):
    run_cli(data_dir, "user", "add", "ada@example.org", "--password", "correct horse", "--create")
    ok = run_cli(data_dir, "doctor")
    assert ok.returncode == 0 and "all is well" in ok.stdout
    os.chmod(data_dir / "jwt_secret", 0o644)
    orphan = data_dir / "blobs" / "objects" / "ab"
    orphan.mkdir(parents=True, exist_ok=True)
    (orphan / ("ab" + "0" * 62)).write_bytes(b"orphan")
    bad = run_cli(data_dir, "doctor")
    assert bad.returncode == 1 and "readable by others" in bad.stdout and "1 unreferenced object" in bad.stdout
    fixed = run_cli(data_dir, "doctor", "--fix")
    assert fixed.returncode == 0, fixed.stdout
    assert (os.stat(data_dir / "jwt_secret").st_mode & 0o777) == 0o600
    assert not (orphan / ("ab" + "0" * 62)).exists()


async def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    """SIGTERM: stop accepting, finish what is in flight, close the database cleanly."""
    import signal

    server = ServerProcess(tmp_path / "data", **FAST)
    data = os.urandom(256 * 1024)

    async def slow_body():
        for i in range(0, len(data), 32 * 1024):
            yield data[i:i + 32 * 1024]
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession(server.url) as http:
        resp = await http.post("/api/v1/auth/register", json={"email": "ada@example.org", "password": "correct horse"})
        auth = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
        upload = asyncio.create_task(http.post("/api/v1/storage/records?table=notes", data=slow_body(),
                                               headers={**auth, "X-Checksum": sha(data)}))
        await asyncio.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        resp = await upload
        assert resp.status == 201, await resp.text()
        # Answers during the drain close their connection: keep-alive clients cannot go on
        # starting requests on a server that is stopping.
        assert resp.headers["Connection"].lower() == "close"
        record = await resp.json()
    assert server.stop() == 0
    again = ServerProcess(tmp_path / "data", **FAST)
    async with aiohttp.ClientSession(again.url) as http:
        resp = await http.post("/api/v1/auth/login", json={"email": "ada@example.org", "password": "correct horse"})
        auth = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
        body = await (await http.get(f"/api/v1/storage/records/{record['id']}", headers=auth)).read()
        assert body == data
    assert again.stop() == 0


def test_leftovers_of_an_interrupted_backup_are_removed(data_dir):
    run_cli(data_dir, "user", "add", "ada@example.org", "--password", "correct horse", "--create")
    staging = data_dir / ".backup-crashed"
    staging.mkdir()
    (staging / "adiuva.db").write_bytes(b"half a snapshot")
    (data_dir / "server-backups").mkdir(exist_ok=True)
    partial = data_dir / "server-backups" / "adiuva-20260101T000000Z.tar.partial"
    partial.write_bytes(b"half an archive")
    out = run_cli(data_dir, "doctor", "--fix")
    assert "removed 2 leftover(s)" in out.stdout, out.stdout
    assert not staging.exists() and not partial.exists()


async def test_verify_catches_an_archive_missing_a_referenced_object(tmp_path):
    import io
    import json
    import tarfile

    server = ServerProcess(tmp_path / "data", **FAST)
    async with aiohttp.ClientSession(server.url) as http:
        resp = await http.post("/api/v1/auth/register", json={"email": "ada@example.org", "password": "correct horse"})
        auth = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
        await put_record(http, auth, b"an encrypted record")
    assert server.stop() == 0
    archive = tmp_path / "snap.tar"
    assert run_cli(tmp_path / "data", "backup", "create", "--out", str(archive)).returncode == 0
    # A self-consistent archive (manifest rewritten to match) that lacks the record's object.
    forged = tmp_path / "forged.tar"
    with tarfile.open(archive) as src, tarfile.open(forged, "w") as dst:
        manifest = json.loads(src.extractfile("manifest.json").read())
        for member in src.getmembers():
            if member.name.startswith("blobs/"):
                del manifest["files"][member.name]
            elif member.name != "manifest.json":
                dst.addfile(member, src.extractfile(member))
        body = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(body)
        dst.addfile(info, io.BytesIO(body))
    out = run_cli(tmp_path / "data", "backup", "verify", str(forged))
    assert out.returncode == 1 and "referenced by the database" in out.stderr, out.stderr
    assert run_cli(tmp_path / "data", "backup", "verify", str(archive)).returncode == 0


async def test_a_cancelled_backup_waits_for_its_snapshot_thread(data_dir, monkeypatch):
    """A server stopping during a scheduled backup cancels it; the snapshot thread holds a
    connection to the live database, which must be closed before the server's Database is."""
    from adiuva_server.config import ensure_data_dir
    from adiuva_server.db import Database
    from tests.conftest import make_settings

    settings = ensure_data_dir(make_settings(data_dir))
    await (await Database.open(settings.db_path)).close()
    started, finished = threading.Event(), threading.Event()
    real = server_backup._snapshot_database

    def slow_snapshot(source, target):
        started.set()
        time.sleep(0.3)
        real(source, target)
        finished.set()

    monkeypatch.setattr(server_backup, "_snapshot_database", slow_snapshot)
    task = asyncio.create_task(server_backup.create_backup(settings.with_secret(), scheduled=True))
    while not started.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()


async def test_sigterm_closes_chat_sockets_and_stops_promptly(tmp_path):
    """An open chat WebSocket (the desktop app idling) never ends on its own: the server closes
    it with 1001 going away instead of making the stop wait out its shutdown timeout."""
    import signal

    server = ServerProcess(tmp_path / "data", **FAST)
    async with aiohttp.ClientSession(server.url) as http:
        resp = await http.post("/api/v1/auth/register", json={"email": "ada@example.org", "password": "correct horse"})
        token = (await resp.json())["access_token"]
        ws = await http.ws_connect(f"/api/v1/chat/stream?token={token}")
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == aiohttp.WSCloseCode.GOING_AWAY, msg
        await ws.close()
    assert server.stop() == 0
    assert time.monotonic() - started < 8, "the stop waited for the socket"
