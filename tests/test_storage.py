"""Encrypted storage over a real socket: records, the change feed, backups, quotas, and the
blob store on disk behind them."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import hashlib
import logging
import os
from email.utils import format_datetime, parsedate_to_datetime

import pytest

from adiuva_server.app import create_app
from adiuva_server.keys import AUTH, STORAGE
from adiuva_server.storage import maintenance
from adiuva_server.tiers import GB

from tests.conftest import both_backends, make_settings, objects, register, set_tier, set_usage, usage

# Every test on SQLite and on PostgreSQL (DATABASE_URL), unless marked sqlite_only.
pytestmark = both_backends

RECORDS = "/api/v1/storage/records"
CHANGES = "/api/v1/storage/changes"
BACKUP = "/api/v1/backup"
MAX_RECORD = 256 * 1024
MAX_BACKUP = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def settings(data_dir):
    return make_settings(
        data_dir, max_record_bytes=MAX_RECORD, max_backup_bytes=MAX_BACKUP, backup_retention=3,
        rate_limits={"free": 10_000, "pro": 10_000, "power": 10_000, "team": 10_000},
    )



@pytest.fixture
async def pro(client):
    acct = await register(client, "pro@example.org")
    await set_tier(client, acct.email, "pro")
    return acct



def temporaries(client) -> list[str]:
    return os.listdir(client.server.app[STORAGE].blobs.tmp)


async def post_record(client, acct, data: bytes, table: str = "notes", checksum: str | None = None):
    headers = {**acct.headers, "X-Checksum": checksum or sha(data)}
    return await client.post(RECORDS, params={"table": table}, data=data, headers=headers)


async def created(client, acct, data: bytes, table: str = "notes") -> dict:
    resp = await post_record(client, acct, data, table)
    assert resp.status == 201, await resp.text()
    return await resp.json()


def set_utc_now(monkeypatch, now) -> None:
    """The storage stores' clock, on either backend."""
    from adiuva_server.storage import postgres, store

    monkeypatch.setattr(store, "utc_now", now)
    monkeypatch.setattr(postgres, "utc_now", now)


async def problem(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["code"] == code, body
    return body




# -- records ----------------------------------------------------------------------------------------


async def test_record_lifecycle(client, pro):
    data = os.urandom(100_000)
    meta = await created(client, pro, data)
    assert meta["table"] == "notes" and meta["checksum"] == sha(data) and meta["size_bytes"] == len(data)
    assert set(meta) == {"id", "table", "checksum", "size_bytes", "created_at", "updated_at"}

    resp = await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)
    assert resp.status == 200
    assert await resp.read() == data
    assert resp.headers["X-Checksum"] == sha(data)
    etag = resp.headers["ETag"]
    assert etag == f'"{sha(data)}"'
    assert resp.headers["Content-Type"] == "application/octet-stream"

    resp = await client.get(f"{RECORDS}/{meta['id']}", headers={**pro.headers, "If-None-Match": etag})
    assert resp.status == 304

    newer = os.urandom(5000)
    resp = await client.put(f"{RECORDS}/{meta['id']}", data=newer,
                            headers={**pro.headers, "X-Checksum": sha(newer), "If-Match": etag})
    assert resp.status == 200, await resp.text()
    replaced = await resp.json()
    assert replaced["id"] == meta["id"] and replaced["checksum"] == sha(newer)
    assert replaced["created_at"] == meta["created_at"]

    # A second device still holding the first ETag is refused, and nothing changes.
    other = os.urandom(10)
    resp = await client.put(f"{RECORDS}/{meta['id']}", data=other,
                            headers={**pro.headers, "X-Checksum": sha(other), "If-Match": etag})
    await problem(resp, 412, "precondition_failed")
    resp = await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)
    assert await resp.read() == newer
    assert objects(client) == [sha(newer)]  # the replaced bytes are gone from disk
    assert await usage(client, pro.email, "cloud") == len(newer)

    resp = await client.delete(f"{RECORDS}/{meta['id']}", headers={**pro.headers, "If-Match": etag})
    await problem(resp, 412, "precondition_failed")
    resp = await client.delete(f"{RECORDS}/{meta['id']}", headers=pro.headers)
    assert resp.status == 204
    resp = await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)
    await problem(resp, 404, "not_found")
    assert objects(client) == []
    assert await usage(client, pro.email, "cloud") == 0


async def test_download_supports_ranges(client, pro):
    data = os.urandom(50_000)
    meta = await created(client, pro, data)
    resp = await client.get(f"{RECORDS}/{meta['id']}", headers={**pro.headers, "Range": "bytes=1000-1999"})
    assert resp.status == 206
    assert await resp.read() == data[1000:2000]


async def test_list_paginates_and_filters(client, pro):
    ids = [(await created(client, pro, f"n{i}".encode(), "notes"))["id"] for i in range(5)]
    task = await created(client, pro, b"t", "tasks")
    resp = await client.get(RECORDS, params={"table": "notes", "limit": "2", "page": "2"}, headers=pro.headers)
    body = await resp.json()
    assert (body["page"], body["limit"], body["total"]) == (2, 2, 5)
    assert [i["id"] for i in body["items"]] == ids[2:4]
    body = await (await client.get(RECORDS, headers=pro.headers)).json()
    assert body["total"] == 6 and body["items"][-1]["id"] == task["id"]
    resp = await client.get(RECORDS, params={"limit": "5000"}, headers=pro.headers)
    await problem(resp, 422, "validation_error")


async def test_identical_bytes_are_stored_once(client, pro):
    data = os.urandom(4096)
    a = await created(client, pro, data)
    b = await created(client, pro, data, "other")
    assert objects(client) == [sha(data)]
    assert (await client.delete(f"{RECORDS}/{a['id']}", headers=pro.headers)).status == 204
    assert objects(client) == [sha(data)]  # still referenced by b
    resp = await client.get(f"{RECORDS}/{b['id']}", headers=pro.headers)
    assert await resp.read() == data
    assert (await client.delete(f"{RECORDS}/{b['id']}", headers=pro.headers)).status == 204
    assert objects(client) == []


async def test_bad_uploads_store_nothing(client, pro):
    data = b"ciphertext"
    # Missing, malformed and wrong checksums.
    resp = await client.post(RECORDS, params={"table": "notes"}, data=data, headers=pro.headers)
    await problem(resp, 422, "validation_error")
    await problem(await post_record(client, pro, data, checksum="abc"), 422, "validation_error")
    await problem(await post_record(client, pro, data, checksum="g" * 64), 422, "validation_error")
    body = await problem(await post_record(client, pro, data, checksum=sha(b"other")), 400, "checksum_mismatch")
    assert "nothing was stored" in body["detail"]
    # Table names: missing, or not matching the pattern.
    resp = await client.post(RECORDS, data=data, headers={**pro.headers, "X-Checksum": sha(data)})
    await problem(resp, 422, "validation_error")
    for table in ("", "../etc", "a b", "x" * 65, "é"):
        await problem(await post_record(client, pro, data, table=table), 422, "validation_error")
    # Too large: declared by Content-Length, and streamed without one (chunked).
    big = os.urandom(MAX_RECORD + 1)
    await problem(await post_record(client, pro, big), 413, "payload_too_large")

    async def chunks():
        for i in range(0, len(big), 16384):
            yield big[i:i + 16384]

    resp = await client.post(RECORDS, params={"table": "notes"}, data=chunks(),
                             headers={**pro.headers, "X-Checksum": sha(big)})
    await problem(resp, 413, "payload_too_large")
    # A replace with a mismatching checksum leaves the record as it was.
    meta = await created(client, pro, data)
    resp = await client.put(f"{RECORDS}/{meta['id']}", data=b"new", headers={**pro.headers, "X-Checksum": sha(b"old")})
    await problem(resp, 400, "checksum_mismatch")
    assert await (await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)).read() == data

    assert objects(client) == [sha(data)]
    assert temporaries(client) == []
    assert (await (await client.get(RECORDS, headers=pro.headers)).json())["total"] == 1
    assert await usage(client, pro.email, "cloud") == len(data)


async def test_chunked_upload_without_content_length(client, pro):
    data = os.urandom(200_000)

    async def chunks():
        for i in range(0, len(data), 7000):
            yield data[i:i + 7000]

    resp = await client.post(RECORDS, params={"table": "notes"}, data=chunks(),
                             headers={**pro.headers, "X-Checksum": sha(data)})
    assert resp.status == 201, await resp.text()
    meta = await resp.json()
    assert await (await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)).read() == data


async def test_another_users_record_is_not_found(client, pro):
    mine = await created(client, pro, b"secret")
    eve = await register(client, "eve@example.org")
    await set_tier(client, eve.email, "team")
    missing = "00000000-0000-4000-8000-000000000000"
    for method, kw in (("GET", {}), ("PUT", {"data": b"x", "headers_extra": {"X-Checksum": sha(b"x")}}), ("DELETE", {})):
        answers = []
        for rid in (mine["id"], missing):
            headers = {**eve.headers, **kw.get("headers_extra", {})}
            resp = await client.request(method, f"{RECORDS}/{rid}", data=kw.get("data"), headers=headers)
            answers.append((resp.status, await resp.json()))
        assert answers[0] == answers[1], method
        assert answers[0][0] == 404
    assert (await (await client.get(RECORDS, headers=eve.headers)).json())["total"] == 0
    assert (await (await client.get(CHANGES, headers=eve.headers)).json())["changes"] == []
    resp = await client.get(f"{RECORDS}/{mine['id']}", headers=pro.headers)
    assert await resp.read() == b"secret"


async def test_requires_authentication(client):
    resp = await client.get(RECORDS)
    await problem(resp, 401, "unauthorized")


# -- quotas -----------------------------------------------------------------------------------------


async def test_free_tier_has_no_cloud_storage_until_the_admin_changes_it(client, account):
    await set_tier(client, account.email, "free")
    await problem(await post_record(client, account, b"data"), 402, "quota_exceeded")
    await set_tier(client, account.email, "pro")  # takes effect on the next request
    await created(client, account, b"data")
    assert temporaries(client) == []


async def test_quota_counts_bytes_and_refuses_the_overflow(client, pro):
    cap = 5 * GB
    first = await created(client, pro, b"0123456789")
    # Pretend the user has filled the tier, minus 10 bytes (uploading 5 GB in a test is no test).
    await set_usage(client, pro.email, cap - 10)
    body = await problem(await post_record(client, pro, b"x" * 11), 402, "quota_exceeded")
    assert body["quota_bytes"] == cap
    assert objects(client) == [sha(b"0123456789")] and temporaries(client) == []
    await created(client, pro, b"y" * 10)
    # Replacing counts the difference: shrinking a record makes room again.
    resp = await client.put(f"{RECORDS}/{first['id']}", data=b"z", headers={**pro.headers, "X-Checksum": sha(b"z")})
    assert resp.status == 200
    assert await usage(client, pro.email, "cloud") == cap - 9
    await created(client, pro, b"w" * 9)


async def test_record_count_limit(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, max_records_per_user=2)))
    acct = await register(client)
    await set_tier(client, acct.email, "team")
    await created(client, acct, b"1")
    await created(client, acct, b"2")
    await problem(await post_record(client, acct, b"3"), 402, "quota_exceeded")


async def raw_request(client, head: str) -> tuple[int, bytes]:
    """Send only a request head (no body) and read the answer: proves the server refuses from
    the headers alone instead of waiting for the body."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
        rest = await asyncio.wait_for(reader.read(65536), timeout=10)
        return int(status_line.split()[1]), rest
    finally:
        writer.close()


async def test_refused_from_content_length_before_the_body(client, pro):
    token = pro.headers["Authorization"]
    record = f"POST {RECORDS}?table=notes HTTP/1.1\r\nX-Checksum: {'a' * 64}\r\n"
    backup = (f"PUT {BACKUP} HTTP/1.1\r\nX-Backup-Checksum: {'a' * 64}\r\nX-Backup-Version: 1\r\n"
              "X-Backup-Timestamp: 2025-01-01T00:00:00Z\r\n")

    async def refused(start: str, length: int) -> tuple[int, bytes]:
        return await raw_request(client, f"{start}Host: x\r\nAuthorization: {token}\r\nContent-Length: {length}\r\n\r\n")

    for start in (record, backup):
        code, rest = await refused(start, 6 * GB)
        assert code == 413 and b"payload_too_large" in rest
    # Under the size limits, but the user's quotas are full.
    await set_usage(client, pro.email, 5 * GB, ("cloud", "backup"))
    for start in (record, backup):
        code, rest = await refused(start, 1000)
        assert code == 402 and b"quota_exceeded" in rest
    assert temporaries(client) == []


# -- the change feed --------------------------------------------------------------------------------


async def sync(client, acct, state: dict, cursor: int, limit: int = 2) -> int:
    """What a desktop client does: poll the feed until it has everything, apply each change."""
    while True:
        resp = await client.get(CHANGES, params={"since": str(cursor), "limit": str(limit)}, headers=acct.headers)
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        for change in page["changes"]:
            assert change["cursor"] > cursor
            if change["op"] == "delete":
                assert change["checksum"] is None and change["deleted_at"]
                state.pop(change["id"], None)
            else:
                data = await (await client.get(f"{RECORDS}/{change['id']}", headers=acct.headers)).read()
                assert sha(data) == change["checksum"]
                state[change["id"]] = data
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return cursor


async def test_two_devices_converge_through_the_feed(client, pro):
    laptop: dict[str, bytes] = {}
    desktop: dict[str, bytes] = {}
    a = await created(client, pro, b"a1")
    b = await created(client, pro, b"b1")
    laptop_cursor = await sync(client, pro, laptop, 0)
    assert laptop == {a["id"]: b"a1", b["id"]: b"b1"}

    c = await created(client, pro, b"c1", "tasks")
    resp = await client.put(f"{RECORDS}/{a['id']}", data=b"a2", headers={**pro.headers, "X-Checksum": sha(b"a2")})
    assert resp.status == 200
    assert (await client.delete(f"{RECORDS}/{b['id']}", headers=pro.headers)).status == 204
    resp = await client.put(f"{RECORDS}/{a['id']}", data=b"a3", headers={**pro.headers, "X-Checksum": sha(b"a3")})
    assert resp.status == 200

    desktop_cursor = await sync(client, pro, desktop, 0, limit=1)
    laptop_cursor = await sync(client, pro, laptop, laptop_cursor)
    expected = {a["id"]: b"a3", c["id"]: b"c1"}
    assert laptop == desktop == expected
    assert laptop_cursor == desktop_cursor
    page = await (await client.get(CHANGES, params={"since": str(laptop_cursor)}, headers=pro.headers)).json()
    assert page == {"changes": [], "next_cursor": laptop_cursor, "has_more": False}
    resp = await client.get(CHANGES, params={"since": "-1"}, headers=pro.headers)
    await problem(resp, 422, "validation_error")


# -- backups ----------------------------------------------------------------------------------------


def backup_headers(acct, data: bytes, version: str = "7", when: str = "2025-03-01T10:00:00Z") -> dict:
    return {**acct.headers, "X-Backup-Version": version, "X-Backup-Timestamp": when, "X-Backup-Checksum": sha(data)}


async def put_backup(client, acct, data: bytes, **kw) -> dict:
    resp = await client.put(BACKUP, data=data, headers=backup_headers(acct, data, **kw))
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def test_backups_latest_history_retention_and_delete(client, pro, monkeypatch):
    from adiuva_server.storage import store

    now, ticks = store.utc_now(), iter(range(100))  # each upload in a second of its own
    set_utc_now(monkeypatch, lambda: (now[0], now[1] - 100 + next(ticks)))
    resp = await client.get(BACKUP, headers=pro.headers)
    await problem(resp, 404, "not_found")
    blobs = [os.urandom(50_000 + i) for i in range(4)]
    metas = [await put_backup(client, pro, b, version=str(i)) for i, b in enumerate(blobs)]
    assert metas[0]["checksum"] == sha(blobs[0]) and metas[0]["timestamp"] == "2025-03-01T10:00:00Z"

    history = (await (await client.get(f"{BACKUP}/history", headers=pro.headers)).json())["items"]
    assert [h["id"] for h in history] == [m["id"] for m in reversed(metas[1:])]  # retention 3, newest first
    assert sorted(objects(client)) == sorted(sha(b) for b in blobs[1:])
    assert await usage(client, pro.email, "backup") == sum(len(b) for b in blobs[1:])

    resp = await client.get(BACKUP, headers=pro.headers)
    assert resp.status == 200
    assert await resp.read() == blobs[3]
    assert resp.headers["X-Backup-Version"] == "3"
    assert resp.headers["X-Backup-Checksum"] == sha(blobs[3])
    assert resp.headers["X-Backup-Timestamp"] == "2025-03-01T10:00:00Z"
    last_modified = resp.headers["Last-Modified"]
    assert (await client.get(BACKUP, headers={**pro.headers, "If-Modified-Since": last_modified})).status == 304
    an_hour_ago = format_datetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1), usegmt=True)
    assert (await client.get(BACKUP, headers={**pro.headers, "If-Modified-Since": an_hour_ago})).status == 200

    resp = await client.get(f"{BACKUP}/{metas[1]['id']}", headers=pro.headers)
    assert await resp.read() == blobs[1]

    eve = await register(client, "eve@example.org")
    assert (await client.delete(f"{BACKUP}/{metas[3]['id']}", headers=eve.headers)).status == 404
    assert (await client.get(f"{BACKUP}/{metas[3]['id']}", headers=eve.headers)).status == 404
    assert (await client.get(BACKUP, headers=eve.headers)).status == 404

    assert (await client.delete(f"{BACKUP}/{metas[3]['id']}", headers=pro.headers)).status == 204
    resp = await client.get(BACKUP, headers=pro.headers)
    assert await resp.read() == blobs[2]
    assert sha(blobs[3]) not in objects(client)
    assert await usage(client, pro.email, "backup") == len(blobs[1]) + len(blobs[2])


async def test_bad_backups_store_nothing(client, pro, account):
    data = b"encrypted db"
    for drop in ("X-Backup-Version", "X-Backup-Timestamp", "X-Backup-Checksum"):
        headers = backup_headers(pro, data)
        del headers[drop]
        await problem(await client.put(BACKUP, data=data, headers=headers), 422, "validation_error")
    resp = await client.put(BACKUP, data=data, headers=backup_headers(pro, data, when="yesterday"))
    await problem(resp, 422, "validation_error")
    resp = await client.put(BACKUP, data=data, headers={**backup_headers(pro, data), "X-Backup-Checksum": sha(b"x")})
    await problem(resp, 400, "checksum_mismatch")
    big = os.urandom(MAX_BACKUP + 1)
    await problem(await client.put(BACKUP, data=big, headers=backup_headers(pro, big)), 413, "payload_too_large")
    # The free tier has no backup storage.
    await set_tier(client, account.email, "free")
    await problem(await client.put(BACKUP, data=data, headers=backup_headers(account, data)), 402, "quota_exceeded")
    assert objects(client) == [] and temporaries(client) == []
    assert (await (await client.get(f"{BACKUP}/history", headers=pro.headers)).json())["items"] == []


# -- the store on disk ------------------------------------------------------------------------------


async def test_deleting_a_user_lets_the_sweep_remove_their_objects(client, pro):
    shared = b"both have this"
    await created(client, pro, b"only pro")
    await created(client, pro, shared)
    await put_backup(client, pro, b"pro backup")
    other = await register(client, "other@example.org")
    await set_tier(client, other.email, "pro")
    await created(client, other, shared)
    app = client.server.app

    await app[AUTH].store.delete_user(pro.email)
    assert len(objects(client)) == 3  # cascaded rows are gone; objects wait for a sweep
    report = await maintenance.sweep(app[STORAGE].store, app[STORAGE].blobs, grace_seconds=0)
    assert report.objects_removed == 2
    assert objects(client) == [sha(shared)]
    check = await maintenance.check(app[STORAGE].store, app[STORAGE].blobs)
    assert check.ok and check.referenced == 1 and check.unreferenced == 0


async def test_sweep_respects_the_grace_period_and_removes_stale_temporaries(client, pro):
    app = client.server.app
    blobs = app[STORAGE].blobs
    orphan = blobs.local_path(sha(b"orphan"))
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    (blobs.tmp / "upload-abandoned").write_bytes(b"half an upload")
    await created(client, pro, b"kept")
    report = await maintenance.sweep(app[STORAGE].store, blobs)  # default grace: everything is too fresh
    assert (report.objects_removed, report.temporary_removed) == (0, 0)
    report = await maintenance.sweep(app[STORAGE].store, blobs, grace_seconds=0)
    assert (report.objects_removed, report.temporary_removed) == (1, 1)
    assert objects(client) == [sha(b"kept")] and temporaries(client) == []


async def test_check_finds_missing_and_corrupt_objects(client, pro):
    app = client.server.app
    blobs = app[STORAGE].blobs
    a = await created(client, pro, b"aaaa")
    b = await created(client, pro, b"bbbb")
    assert (await maintenance.check(app[STORAGE].store, blobs)).ok
    blobs.local_path(a["checksum"]).write_bytes(b"AAAA")  # bit rot
    blobs.local_path(b["checksum"]).unlink()
    report = await maintenance.check(app[STORAGE].store, blobs)
    assert not report.ok
    assert report.corrupt == [a["checksum"]] and report.missing == [b["checksum"]]
    quick = await maintenance.check(app[STORAGE].store, blobs, verify_hashes=False)
    assert quick.missing == [b["checksum"]] and quick.corrupt == []  # same size: only hashing sees it


async def test_openapi_documents_storage(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    for path in (RECORDS, f"{RECORDS}/{{record_id}}", CHANGES, BACKUP, f"{BACKUP}/history", f"{BACKUP}/{{backup_id}}"):
        assert path in doc["paths"], path
    post = doc["paths"][RECORDS]["post"]
    assert "application/octet-stream" in post["requestBody"]["content"]
    assert {"402", "413"} <= set(post["responses"])


async def test_empty_record(client, pro):
    meta = await created(client, pro, b"")
    assert meta["size_bytes"] == 0 and meta["checksum"] == sha(b"")
    resp = await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)
    assert resp.status == 200 and await resp.read() == b""


async def test_client_vanishing_mid_upload_leaves_nothing(client, pro):
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write((f"POST {RECORDS}?table=notes HTTP/1.1\r\nHost: x\r\nAuthorization: {pro.headers['Authorization']}\r\n"
                  f"X-Checksum: {'a' * 64}\r\nContent-Length: 200000\r\n\r\n").encode() + os.urandom(50_000))
    await writer.drain()
    deadline = asyncio.get_running_loop().time() + 10
    while not temporaries(client):  # the upload has started
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    writer.close()
    while temporaries(client):
        assert asyncio.get_running_loop().time() < deadline, temporaries(client)
        await asyncio.sleep(0.01)
    assert objects(client) == []
    assert (await (await client.get(RECORDS, headers=pro.headers)).json())["total"] == 0


def test_storage_limits_come_from_the_environment(tmp_path):
    from adiuva_server.config import Settings
    from adiuva_server.errors import ConfigError

    s = Settings.from_env({"ADIUVA_DATA_DIR": str(tmp_path), "ADIUVA_MAX_RECORD_BYTES": "1024",
                           "ADIUVA_MAX_BACKUP_BYTES": "4096", "ADIUVA_BACKUP_RETENTION": "2",
                           "ADIUVA_MAX_RECORDS_PER_USER": "10"})
    assert (s.max_record_bytes, s.max_backup_bytes, s.backup_retention, s.max_records_per_user) == (1024, 4096, 2, 10)
    defaults = Settings.from_env({"ADIUVA_DATA_DIR": str(tmp_path)})
    assert (defaults.max_record_bytes, defaults.max_backup_bytes) == (64 * 1024**2, 2 * 1024**3)
    with pytest.raises(ConfigError, match="ADIUVA_BACKUP_RETENTION"):
        Settings.from_env({"ADIUVA_DATA_DIR": str(tmp_path), "ADIUVA_BACKUP_RETENTION": "0"})


async def test_same_bytes_uploaded_while_deleted_stay_readable(client, pro):
    """Deleting the last record of some bytes while another upload of the same bytes is in
    flight must never leave a record pointing at a deleted object."""
    data = os.urandom(300)
    live = [(await created(client, pro, data))["id"]]

    async def churn(i: int) -> None:
        if i % 2:
            live.append((await created(client, pro, data))["id"])
        elif live:
            rid = live.pop(0)
            assert (await client.delete(f"{RECORDS}/{rid}", headers=pro.headers)).status == 204

    for _ in range(10):
        await asyncio.gather(*(churn(i) for i in range(8)))
        for rid in live:
            resp = await client.get(f"{RECORDS}/{rid}", headers=pro.headers)
            assert resp.status == 200 and await resp.read() == data
    app = client.server.app
    report = await maintenance.check(app[STORAGE].store, app[STORAGE].blobs)
    assert report.ok and report.unreferenced == 0, report


# -- regressions ------------------------------------------------------------------------------------


async def test_integer_query_parameters_are_bounded(client, pro):
    """Values past SQLite's 64-bit INTEGER are a 422, never an OverflowError (500)."""
    huge = str(2**63)
    for path, name in ((CHANGES, "since"), (CHANGES, "limit"), (RECORDS, "page"), (RECORDS, "limit")):
        for value in (huge, "9" * 40):
            resp = await client.get(path, params={name: value}, headers=pro.headers)
            body = await problem(resp, 422, "validation_error")
            assert body["errors"][0]["loc"] == ["query", name], body
    resp = await client.get(CHANGES, params={"since": str(2**63 - 1)}, headers=pro.headers)
    assert resp.status == 200
    assert await resp.json() == {"changes": [], "next_cursor": 2**63 - 1, "has_more": False}


async def test_backups_in_the_same_second_never_get_a_wrong_304(client, pro, monkeypatch):
    """Last-Modified has whole seconds and must not be later than Date: two backups in one
    second share it, so that date is no validator for the second one (ETags still are); and a
    client holding a backup that was deleted since gets the latest, not a 304."""
    from adiuva_server.storage import store

    frozen = store.utc_now()
    set_utc_now(monkeypatch, lambda: frozen)  # both uploads land in the same second
    first, second = os.urandom(3000), os.urandom(3000)
    await put_backup(client, pro, first)
    resp = await client.get(BACKUP, headers=pro.headers)
    assert await resp.read() == first
    first_modified, first_etag = resp.headers["Last-Modified"], resp.headers["ETag"]
    assert first_etag == f'"{sha(first)}"'
    await put_backup(client, pro, second)

    resp = await client.get(BACKUP, headers={**pro.headers, "If-Modified-Since": first_modified})
    assert resp.status == 200, resp.headers
    assert await resp.read() == second
    second_modified, second_etag = resp.headers["Last-Modified"], resp.headers["ETag"]
    assert second_modified == first_modified  # the same second, and not in the future
    assert parsedate_to_datetime(second_modified) <= parsedate_to_datetime(resp.headers["Date"])
    assert second_etag == f'"{sha(second)}"'
    # Its date cannot tell it from the first: no 304 by date, no range by date; by ETag, yes.
    resp = await client.get(BACKUP, headers={**pro.headers, "If-Modified-Since": second_modified})
    assert resp.status == 200 and await resp.read() == second
    resp = await client.get(BACKUP, headers={**pro.headers, "Range": "bytes=-10", "If-Range": second_modified})
    assert resp.status == 200 and await resp.read() == second
    resp = await client.get(BACKUP, headers={**pro.headers, "If-None-Match": second_etag})
    assert resp.status == 304
    resp = await client.get(BACKUP, headers={**pro.headers, "If-None-Match": first_etag,
                                             "If-Modified-Since": second_modified})
    assert resp.status == 200 and await resp.read() == second
    # The older backup keeps its own validators.
    history = (await (await client.get(f"{BACKUP}/history", headers=pro.headers)).json())["items"]
    resp = await client.get(f"{BACKUP}/{history[1]['id']}", headers={**pro.headers, "If-None-Match": first_etag})
    assert resp.status == 304 and resp.headers["Last-Modified"] == first_modified

    # A client holding the second, deleted since: the first (same date) is no match for it.
    assert (await client.delete(f"{BACKUP}/{history[0]['id']}", headers=pro.headers)).status == 204
    resp = await client.get(BACKUP, headers={**pro.headers, "If-Modified-Since": second_modified})
    assert resp.status == 200 and await resp.read() == first
    resp = await client.get(BACKUP, headers={**pro.headers, "Range": "bytes=0-9", "If-Range": second_modified})
    assert resp.status == 200 and await resp.read() == first

    # Backups a second apart have dates of their own, and 304 by them.
    async def put_at(second_offset: int) -> tuple[dict, str]:
        set_utc_now(monkeypatch, lambda: (frozen[0], frozen[1] + second_offset))
        meta = await put_backup(client, pro, os.urandom(3000))
        return meta, (await client.get(BACKUP, headers=pro.headers)).headers["Last-Modified"]

    _, third_modified = await put_at(1)
    assert (await client.get(BACKUP, headers={**pro.headers, "If-Modified-Since": third_modified})).status == 304
    fourth, fourth_modified = await put_at(2)
    # Deleted: a client still holding it gets the (older) latest, not a 304 for "not modified since".
    assert (await client.delete(f"{BACKUP}/{fourth['id']}", headers=pro.headers)).status == 204
    resp = await client.get(BACKUP, headers={**pro.headers, "If-Modified-Since": fourth_modified})
    assert resp.status == 200 and resp.headers["Last-Modified"] == third_modified


async def test_if_range_with_a_stale_etag_sends_the_whole_new_body(client, pro):
    old = os.urandom(20_000)
    meta = await created(client, pro, old)
    url = f"{RECORDS}/{meta['id']}"
    resp = await client.get(url, headers={**pro.headers, "Range": "bytes=0-9999"})
    assert resp.status == 206 and await resp.read() == old[:10_000]
    old_etag = resp.headers["ETag"]
    new = os.urandom(20_000)
    resp = await client.put(url, data=new, headers={**pro.headers, "X-Checksum": sha(new)})
    assert resp.status == 200

    # Resuming with the old ETag must not splice the new bytes onto the old ones.
    resp = await client.get(url, headers={**pro.headers, "Range": "bytes=10000-", "If-Range": old_etag})
    assert resp.status == 200 and "Content-Range" not in resp.headers
    assert await resp.read() == new and resp.headers["ETag"] == f'"{sha(new)}"'
    # The current ETag: the range. A weak tag or a date (records send no Last-Modified): all.
    resp = await client.get(url, headers={**pro.headers, "Range": "bytes=10000-", "If-Range": f'"{sha(new)}"'})
    assert resp.status == 206 and await resp.read() == new[10_000:]
    assert resp.headers["Content-Range"] == f"bytes 10000-19999/{len(new)}"
    for if_range in (f'W/"{sha(new)}"', format_datetime(dt.datetime.now(dt.UTC), usegmt=True)):
        resp = await client.get(url, headers={**pro.headers, "Range": "bytes=10000-", "If-Range": if_range})
        assert resp.status == 200 and await resp.read() == new


async def test_backup_if_range_accepts_its_exact_last_modified(client, pro):
    data = os.urandom(5000)
    await put_backup(client, pro, data)
    resp = await client.get(BACKUP, headers=pro.headers)
    last_modified = resp.headers["Last-Modified"]
    for if_range, status in ((last_modified, 206), (resp.headers["ETag"], 206), ('"stale"', 200),
                             (format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=1), usegmt=True), 200)):
        resp = await client.get(BACKUP, headers={**pro.headers, "Range": "bytes=-100", "If-Range": if_range})
        assert resp.status == status, if_range
        assert await resp.read() == (data[-100:] if status == 206 else data)


async def test_unsatisfiable_range_is_a_problem(client, pro):
    data = os.urandom(5000)
    meta = await created(client, pro, data)
    url = f"{RECORDS}/{meta['id']}"
    for rng in ("bytes=5000-", "bytes=99999999999999999999999-", "bytes=10-5", "bytes=-0", "pages=1-2",
                "bytes=0-1,5-6"):
        resp = await client.get(url, headers={**pro.headers, "Range": rng})
        await problem(resp, 416, "range_not_satisfiable")
        assert resp.headers["Content-Range"] == f"bytes */{len(data)}", rng
    await put_backup(client, pro, data)
    resp = await client.get(BACKUP, headers={**pro.headers, "Range": "bytes=6000-7000"})
    await problem(resp, 416, "range_not_satisfiable")
    # Ranges that reach past the end are cut to it; a suffix longer than the body is all of it.
    resp = await client.get(url, headers={**pro.headers, "Range": "bytes=4990-9999"})
    assert resp.status == 206 and await resp.read() == data[4990:]
    resp = await client.get(url, headers={**pro.headers, "Range": "bytes=-9999"})
    assert resp.status == 206 and await resp.read() == data


async def test_a_missing_object_is_a_problem_not_a_bare_404(client, pro):
    meta = await created(client, pro, b"soon gone")
    client.server.app[STORAGE].blobs.local_path(meta["checksum"]).unlink()
    resp = await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)
    await problem(resp, 404, "not_found")


async def test_backup_headers_must_be_printable_ascii(client, pro):
    data = b"encrypted db"
    for header, value in (("X-Backup-Version", "7\u00e9"), ("X-Backup-Version", "v" * 65),
                          ("X-Backup-Version", "7\t1"), ("X-Backup-Timestamp", "2025-03-01T10:00:00\u00e9"),
                          ("X-Backup-Timestamp", "2025-03-01T10:00:00.000000+00:00" + " " * 40 + "Z")):
        token = pro.headers["Authorization"]
        head = (f"PUT {BACKUP} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\nContent-Length: {len(data)}\r\n"
                f"X-Backup-Checksum: {sha(data)}\r\nX-Backup-Version: 7\r\nX-Backup-Timestamp: 2025-03-01T10:00:00Z\r\n")
        head = head.replace(f"{header}: ", f"{header}: {value}\r\nX-Ignored: ", 1)
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        try:
            writer.write(head.encode() + b"\r\n" + data)  # UTF-8 on the wire, as a client would send it
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), timeout=10)
            rest = await asyncio.wait_for(reader.read(65536), timeout=10)
        finally:
            writer.close()
        assert int(status_line.split()[1]) == 422, (header, value, rest)
        assert b"validation_error" in rest and header.encode() in rest
    assert objects(client) == []
    meta = await put_backup(client, pro, data, version="1.2.3 (build 7)")
    assert meta["version"] == "1.2.3 (build 7)"


async def test_change_cursors_are_per_user(client, pro):
    """Another user's writes must not show as gaps in my cursors."""
    other = await register(client, "other@example.org")
    await set_tier(client, other.email, "pro")
    mine = await created(client, pro, b"m1")
    for i in range(3):
        await created(client, other, f"o{i}".encode())
    await created(client, pro, b"m2")
    resp = await client.put(f"{RECORDS}/{mine['id']}", data=b"m3", headers={**pro.headers, "X-Checksum": sha(b"m3")})
    assert resp.status == 200
    await created(client, other, b"o3")
    assert (await client.delete(f"{RECORDS}/{mine['id']}", headers=pro.headers)).status == 204

    page = await (await client.get(CHANGES, headers=pro.headers)).json()
    assert [c["cursor"] for c in page["changes"]] == [2, 4]  # m2 at 2; m1 replaced (3) then deleted (4)
    assert page["next_cursor"] == 4
    page = await (await client.get(CHANGES, headers=other.headers)).json()
    assert [c["cursor"] for c in page["changes"]] == [1, 2, 3, 4]


async def test_sweep_from_another_process_cannot_delete_an_object_being_stored_again(client, pro):
    """An admin's sweep (another process, by age) checks an orphan's mtime; meanwhile the server
    stores the same bytes again (which only freshens the object) and commits a row: the sweep
    must not then unlink the object under that row."""
    import threading
    import time

    from adiuva_server.storage.blobs import FileBlobStore

    app = client.server.app
    data = os.urandom(1000)
    path = app[STORAGE].blobs.local_path(sha(data))
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)  # an orphan (say, of a deleted user), old enough to sweep
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))

    checked, stored = threading.Event(), threading.Event()

    class Paused(type(path)):
        def stat(self, *args, **kw):
            result = super().stat(*args, **kw)
            checked.set()
            stored.wait(0.5)  # without the lock, the server freshens the object right here
            return result

    doctor = FileBlobStore(app[STORAGE].blobs.root)  # its own lock descriptors, like another process
    doctor.local_path = lambda digest: Paused(FileBlobStore.local_path(doctor, digest))
    loop = asyncio.get_running_loop()
    sweeping = asyncio.ensure_future(maintenance.sweep(app[STORAGE].store, doctor, grace_seconds=60))
    assert await loop.run_in_executor(None, checked.wait, 10)
    meta = await created(client, pro, data)
    stored.set()
    await sweeping

    resp = await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)
    assert resp.status == 200 and await resp.read() == data
    assert (await maintenance.check(app[STORAGE].store, app[STORAGE].blobs)).ok


async def test_forgotten_tombstones_send_stale_devices_back_to_zero(client, pro):
    """Tombstones are kept for the retention period only. A device that last synced before a
    forgotten deletion must not silently miss it: 410 cursor_expired, then a full feed from 0
    in which the deleted record is simply absent. Other users' feeds are untouched."""
    other = await register(client, "other@example.org")
    await set_tier(client, other.email, "pro")
    kept = await created(client, pro, b"kept")
    gone = await created(client, pro, b"gone")
    theirs = await created(client, other, b"theirs")
    stale_cursor = (await (await client.get(CHANGES, headers=pro.headers)).json())["next_cursor"]  # 2
    assert (await client.delete(f"{RECORDS}/{gone['id']}", headers=pro.headers)).status == 204
    assert (await client.delete(f"{RECORDS}/{theirs['id']}", headers=other.headers)).status == 204
    page = await (await client.get(CHANGES, params={"since": 1}, headers=pro.headers)).json()
    assert [(c["id"], c["op"]) for c in page["changes"]] == [(gone["id"], "delete")]
    current_cursor = page["next_cursor"]  # 3

    storage = client.app[STORAGE]
    assert await storage.purge_tombstones() == 0  # younger than the retention: kept
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=storage.settings.tombstone_retention + 1)
    assert await storage.purge_tombstones(now=later) == 2

    resp = await client.get(CHANGES, params={"since": stale_cursor - 1}, headers=pro.headers)
    assert resp.status == 410 and resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["code"] == "cursor_expired" and "since=0" in problem["detail"]
    assert (await client.get(CHANGES, params={"since": stale_cursor}, headers=pro.headers)).status == 410
    # A device that had already seen the deletion goes on as before.
    page = await (await client.get(CHANGES, params={"since": current_cursor}, headers=pro.headers)).json()
    assert page == {"changes": [], "next_cursor": current_cursor, "has_more": False}
    # From zero: the full state, without the forgotten record.
    page = await (await client.get(CHANGES, headers=pro.headers)).json()
    assert [c["id"] for c in page["changes"]] == [kept["id"]]
    # The other user's deletion was forgotten too; their old cursor is refused, their new one fine.
    assert (await client.get(CHANGES, params={"since": 1}, headers=other.headers)).status == 410
    page = await (await client.get(CHANGES, params={"since": 2}, headers=other.headers)).json()
    assert page["changes"] == [] and page["next_cursor"] == 2
    # Live records, their bytes and the usage counters are untouched.
    resp = await client.get(f"{RECORDS}/{kept['id']}", headers=pro.headers)
    assert resp.status == 200 and await resp.read() == b"kept"
    report = await maintenance.check(client.app[STORAGE].store, storage.blobs)
    assert report.ok, report


async def test_tombstone_retention_zero_keeps_them_forever(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, tombstone_retention=0.0)))
    acct = await register(client, "ada@example.org")
    await set_tier(client, acct.email, "pro")
    record = await created(client, acct, b"short-lived")
    assert (await client.delete(f"{RECORDS}/{record['id']}", headers=acct.headers)).status == 204
    far = dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)
    assert await client.app[STORAGE].purge_tombstones(now=far) == 0
    page = await (await client.get(CHANGES, params={"since": 0}, headers=acct.headers)).json()
    assert [(c["id"], c["op"]) for c in page["changes"]] == [(record["id"], "delete")]


async def test_a_wildcard_inside_an_if_match_list_is_no_wildcard(client, pro):
    """RFC 9110: `*` means "any" only on its own; `garbage, *` once deleted the record."""
    meta = await created(client, pro, b"keep me")
    for header in ("garbage, *", '"x", *', "*,"):
        resp = await client.delete(f"{RECORDS}/{meta['id']}", headers={**pro.headers, "If-Match": header})
        await problem(resp, 412, "precondition_failed")
        resp = await client.put(f"{RECORDS}/{meta['id']}", data=b"other",
                                headers={**pro.headers, "X-Checksum": sha(b"other"), "If-Match": header})
        await problem(resp, 412, "precondition_failed")
    resp = await client.get(f"{RECORDS}/{meta['id']}", headers=pro.headers)
    assert await resp.read() == b"keep me"
    assert (await client.delete(f"{RECORDS}/{meta['id']}", headers={**pro.headers, "If-Match": " * "})).status == 204


async def test_bodies_that_do_not_decode_are_400(client, pro):
    """A Content-Encoding the body does not match once made a 500 on every route with a body."""
    data = b"not gzip at all"
    resp = await client.post(RECORDS, params={"table": "notes"}, data=data,
                             headers={**pro.headers, "X-Checksum": sha(data), "Content-Encoding": "gzip"})
    await problem(resp, 400, "malformed_request")
    resp = await client.post("/api/v1/auth/login", data=b'{"email": "x@example.org"}',
                             headers={"Content-Type": "application/json", "Content-Encoding": "deflate"})
    await problem(resp, 400, "malformed_request")
    assert (await (await client.get(RECORDS, headers=pro.headers)).json())["total"] == 0
    assert temporaries(client) == []
    # A body that really is gzip is decoded, and its checksum is that of the decoded bytes.
    resp = await client.post(RECORDS, params={"table": "notes"}, data=gzip.compress(data),
                             headers={**pro.headers, "X-Checksum": sha(data), "Content-Encoding": "gzip"})
    assert resp.status == 201, await resp.text()
    record = await resp.json()
    assert await (await client.get(f"{RECORDS}/{record['id']}", headers=pro.headers)).read() == data


async def test_a_client_that_hangs_up_mid_upload_is_no_error(client, pro, caplog):
    """An upload cut off by the client: nothing stored, no temporary file left, and no ERROR
    with a traceback in the log (it used to look like a server fault, a 500)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"POST {RECORDS}?table=notes HTTP/1.1\r\nHost: x\r\nAuthorization: {pro.headers['Authorization']}\r\n"
                 f"X-Checksum: {'0' * 64}\r\nContent-Length: 100000\r\n\r\n".encode() + b"x" * 1000)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    for _ in range(50):
        if not temporaries(client):
            break
        await asyncio.sleep(0.05)
    assert temporaries(client) == []
    assert (await (await client.get(RECORDS, headers=pro.headers)).json())["total"] == 0
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
