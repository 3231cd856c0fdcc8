"""Sync in bulk over a real socket: POST /storage/records/batch (all or nothing) and the change
feed with the records' bytes inline, as a desktop client's first sync uses them."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import os
import random
import time

import aiohttp
import pytest

from adiuva_server.app import create_app
from adiuva_server.db import Database
from adiuva_server.keys import STORAGE
from adiuva_server.storage import maintenance, service
from adiuva_server.storage.store import SQLiteStorageStore
from adiuva_server.tiers import GB

from tests.conftest import both_backends, make_settings, objects, register, set_tier, set_usage, usage

# Every test on SQLite and on PostgreSQL (DATABASE_URL), unless marked sqlite_only.
pytestmark = both_backends

RECORDS = "/api/v1/storage/records"
BATCH = "/api/v1/storage/records/batch"
CHANGES = "/api/v1/storage/changes"
INLINE = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
PRO_CAP = 5 * GB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def item(data: bytes, table: str = "notes", **extra) -> dict:
    return {"table": table, "data": base64.b64encode(data).decode(), "checksum": sha(data), **extra}


@pytest.fixture
def settings(data_dir):
    # The tier is set explicitly, whatever new accounts get by default.
    return make_settings(data_dir, default_tier="team",
                         rate_limits={"free": 10_000, "pro": 10_000, "power": 10_000, "team": 10_000})



@pytest.fixture
async def ada(client):
    acct = await register(client, "ada@example.org")
    await set_tier(client, acct.email, "team")
    return acct



def temporaries(client) -> list[str]:
    return os.listdir(client.server.app[STORAGE].blobs.tmp)


async def batch(client, acct, records: list[dict]):
    return await client.post(BATCH, json={"records": records}, headers=acct.headers)


async def problem(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    body = await resp.json()
    assert body["code"] == code, body
    return body


async def listed(client, acct) -> int:
    return (await (await client.get(RECORDS, headers=acct.headers)).json())["total"]




async def referenced_only(client) -> None:
    """Every object on disk is referenced by a row, and nothing is left half-written."""
    app = client.server.app
    report = await maintenance.check(app[STORAGE].store, app[STORAGE].blobs)
    # (not report.ok: tests that fake a nearly full quota make the usage drift on purpose)
    assert not report.missing and not report.corrupt and report.unreferenced == 0 and report.temporary == 0, report


async def first_sync(client, acct) -> tuple[dict[str, bytes], int]:
    """A new device: the feed with the bytes inline, 1,000 changes a page; records too large to
    inline are fetched one by one. Returns {id: bytes} and the number of requests it took."""
    state: dict[str, bytes] = {}
    cursor, requests = 0, 0
    while True:
        resp = await client.get(CHANGES, params={"since": str(cursor), "limit": "1000", "include_data": "true"},
                                headers=acct.headers)
        requests += 1
        assert resp.status == 200, await resp.text()
        page = await resp.json()
        for change in page["changes"]:
            if change["op"] == "delete":
                assert change["data"] is None
                state.pop(change["id"], None)
            elif change["data"] is not None:
                data = base64.b64decode(change["data"], validate=True)
                assert len(data) == change["size_bytes"] <= INLINE and sha(data) == change["checksum"]
                state[change["id"]] = data
            else:
                assert change["size_bytes"] > INLINE
                state[change["id"]] = await (await client.get(f"{RECORDS}/{change['id']}", headers=acct.headers)).read()
                requests += 1
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return state, requests


# -- round trip ---------------------------------------------------------------------------------


async def test_first_sync_of_2500_records_in_a_few_requests(client, ada):
    rng = random.Random(10)
    sent: list[bytes] = [rng.randbytes(rng.choice((0, 10, 700, 2048, 5000, INLINE))) for _ in range(2497)]
    sent += [rng.randbytes(INLINE + 1), rng.randbytes(200_000), rng.randbytes(2048)]  # two too large to inline
    rng.shuffle(sent)
    sent[100] = sent[101]  # identical bytes in two records: stored once
    ids: list[str] = []
    for start in range(0, len(sent), 1000):  # 1000, 1000, 500
        chunk = sent[start:start + 1000]
        resp = await batch(client, ada, [item(d, table=f"t{i % 3}") for i, d in enumerate(chunk)])
        assert resp.status == 201, await resp.text()
        items = (await resp.json())["items"]
        assert [(m["checksum"], m["size_bytes"]) for m in items] == [(sha(d), len(d)) for d in chunk]  # in order
        assert all(m["table"] == f"t{i % 3}" for i, m in enumerate(items))
        ids += [m["id"] for m in items]
    assert len(set(ids)) == 2500 and await listed(client, ada) == 2500
    assert await usage(client, ada.email) == sum(len(d) for d in sent)
    assert len(objects(client)) == len(set(sent))

    state, requests = await first_sync(client, ada)
    assert state == dict(zip(ids, sent))  # every byte back, equal
    assert requests == 3 + 2  # three pages, two records fetched alone
    # The single download agrees with what the feed inlined.
    resp = await client.get(f"{RECORDS}/{ids[5]}", headers=ada.headers)
    assert await resp.read() == sent[5]
    await referenced_only(client)


async def test_without_include_data_the_feed_has_no_bytes(client, ada):
    resp = await batch(client, ada, [item(b"small")])
    assert resp.status == 201
    page = await (await client.get(CHANGES, headers=ada.headers)).json()
    assert [c["data"] for c in page["changes"]] == [None]


async def test_a_page_with_data_ends_early_rather_than_grow_past_its_budget(client, ada, monkeypatch):
    monkeypatch.setattr(service, "INLINE_PAGE_BYTES", 25_000)
    sent = [os.urandom(10_000) for _ in range(5)]
    assert (await batch(client, ada, [item(d) for d in sent])).status == 201
    pages = []
    cursor = 0
    while True:
        page = await (await client.get(CHANGES, params={"since": str(cursor), "include_data": "true"},
                                       headers=ada.headers)).json()
        pages.append([base64.b64decode(c["data"]) for c in page["changes"]])
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [d for p in pages for d in p] == sent


async def test_a_vanished_object_is_left_out_not_an_error(client, ada):
    resp = await batch(client, ada, [item(b"one"), item(b"two")])
    metas = (await resp.json())["items"]
    client.server.app[STORAGE].blobs.local_path(sha(b"one")).unlink()  # as if replaced meanwhile
    page = await (await client.get(CHANGES, params={"include_data": "true"}, headers=ada.headers)).json()
    assert [c["id"] for c in page["changes"]] == [m["id"] for m in metas]
    assert [c["data"] for c in page["changes"]] == [None, base64.b64encode(b"two").decode()]


# -- all or nothing -----------------------------------------------------------------------------


@pytest.mark.parametrize("spoil, status, code", [
    (lambda it: it | {"checksum": sha(b"something else")}, 400, "checksum_mismatch"),
    (lambda it: it | {"data": it["data"][:-2] + "!="}, 422, "validation_error"),
    (lambda it: it | {"data": it["data"].rstrip("=")}, 422, "validation_error"),  # unpadded
    (lambda it: it | {"table": "../etc"}, 422, "validation_error"),
    (lambda it: it | {"id": "00000000-0000-4000-8000-000000000000"}, 404, "not_found"),
    (lambda it: it | {"if_match": '"abc"'}, 422, "validation_error"),  # if_match without an id
    (lambda it: it | {"surprise": 1}, 422, "validation_error"),
])
async def test_one_bad_item_stores_nothing_and_is_named(client, ada, spoil, status, code):
    records = [item(os.urandom(100 + i)) for i in range(20)]
    records[7] = spoil(records[7])
    body = await problem(await batch(client, ada, records), status, code)
    assert body["index"] == 7 and "records[7]" in body["detail"].replace(".7", "[7]"), body
    assert await listed(client, ada) == 0
    assert (await (await client.get(CHANGES, headers=ada.headers)).json())["changes"] == []
    assert objects(client) == [] and temporaries(client) == []
    assert await usage(client, ada.email) == 0
    assert (await batch(client, ada, records[:7])).status == 201  # the good ones alone are fine


async def test_a_record_larger_than_the_limit_is_named(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, default_tier="team", max_record_bytes=1000)))
    acct = await register(client)
    body = await problem(await batch(client, acct, [item(b"x" * 1000), item(b"y" * 1001)]), 413, "payload_too_large")
    assert body["index"] == 1
    assert await listed(client, acct) == 0 and objects(client) == []


async def test_the_same_record_twice_in_one_batch_is_refused(client, ada):
    rid = (await (await batch(client, ada, [item(b"v1")])).json())["items"][0]["id"]
    body = await problem(await batch(client, ada, [item(b"v2", id=rid), item(b"v3", id=rid)]), 422, "validation_error")
    assert body["index"] == 1
    assert await (await client.get(f"{RECORDS}/{rid}", headers=ada.headers)).read() == b"v1"


async def test_bodies_that_are_not_a_batch(client, ada):
    for raw in (b"", b"not json", b"[]", b'{"records": []}', b'{"records": {}}'):
        resp = await client.post(BATCH, data=raw, headers={**ada.headers, "Content-Type": "application/json"})
        assert resp.status in (400, 422), (raw, await resp.text())
        assert resp.content_type == "application/problem+json"
    assert await listed(client, ada) == 0


async def test_more_than_1000_records_is_422(client, ada):
    records = [item(str(i).encode()) for i in range(1001)]
    body = await problem(await batch(client, ada, records), 422, "validation_error")
    assert body["errors"][0]["loc"] == ["body", "records"]
    assert await listed(client, ada) == 0 and objects(client) == []
    assert (await batch(client, ada, records[:1000])).status == 201


# -- replacing ----------------------------------------------------------------------------------


async def test_replace_in_a_batch_honours_if_match(client, ada):
    metas = (await (await batch(client, ada, [item(b"a1"), item(b"b1"), item(b"c1")])).json())["items"]
    a, b, c = (m["id"] for m in metas)
    etag_a = (await client.get(f"{RECORDS}/{a}", headers=ada.headers)).headers["ETag"]
    resp = await batch(client, ada, [item(b"a2", id=a, if_match=etag_a), item(b"b2", id=b), item(b"new")])
    assert resp.status == 201, await resp.text()
    out = (await resp.json())["items"]
    assert [m["id"] for m in out[:2]] == [a, b] and out[2]["id"] not in (a, b, c)
    assert out[0]["created_at"] == metas[0]["created_at"] and out[0]["checksum"] == sha(b"a2")
    for rid, data in ((a, b"a2"), (b, b"b2"), (c, b"c1")):
        assert await (await client.get(f"{RECORDS}/{rid}", headers=ada.headers)).read() == data
    assert objects(client) == sorted(sha(d) for d in (b"a2", b"b2", b"c1", b"new"))  # the old bytes are freed
    assert await usage(client, ada.email) == 9

    # The ETag it sent is stale now: 412 for that item, and nothing of the batch is stored.
    body = await problem(await batch(client, ada, [item(b"c2", id=c), item(b"a3", id=a, if_match=etag_a)]),
                         412, "precondition_failed")
    assert body["index"] == 1
    assert await (await client.get(f"{RECORDS}/{c}", headers=ada.headers)).read() == b"c1"
    assert sha(b"c2") not in objects(client) and temporaries(client) == []
    feed = (await (await client.get(CHANGES, headers=ada.headers)).json())["changes"]
    assert [ch["id"] for ch in feed] == [c, a, b, out[2]["id"]]  # replaced ones moved up the feed
    await referenced_only(client)


async def test_another_users_record_cannot_be_replaced(client, ada):
    mine = (await (await batch(client, ada, [item(b"ada's")])).json())["items"][0]
    eve = await register(client, "eve@example.org")
    await set_tier(client, eve.email, "team")
    body = await problem(await batch(client, eve, [item(b"eve's", id=mine["id"])]), 404, "not_found")
    assert body["index"] == 0
    missing = await problem(await batch(client, eve, [item(b"eve's", id="00000000-0000-4000-8000-000000000000")]),
                            404, "not_found")
    assert {k: v for k, v in body.items()} == missing  # hers and nobody's answer the same
    assert await (await client.get(f"{RECORDS}/{mine['id']}", headers=ada.headers)).read() == b"ada's"
    assert await listed(client, eve) == 0 and objects(client) == [sha(b"ada's")]


# -- limits ------------------------------------------------------------------------------------


async def open_raw(client):
    return await asyncio.open_connection(client.server.host, client.server.port)


async def read_answer(reader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    return int(head.split()[1]), await asyncio.wait_for(reader.readexactly(length), 10)


async def assert_closed(reader) -> None:
    """The server closes the connection (EOF), rather than keep reading the rest of the body."""
    try:
        rest = await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return
    assert rest == b""


async def test_a_body_over_16_mib_is_413_and_the_connection_closed(client, ada):
    auth = ada.headers["Authorization"]
    # Declared too large: refused from the headers, before any byte of the body.
    reader, writer = await open_raw(client)
    writer.write((f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {MAX_BODY + 1}\r\n\r\n").encode())
    status, body = await read_answer(reader)
    assert status == 413 and b"payload_too_large" in body
    await assert_closed(reader)
    writer.close()

    # Chunked, no length: refused as soon as more than 16 MiB have been read.
    head = (f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    filler = b" " * (1024 * 1024)

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    reader, writer = await open_raw(client)
    writer.write(head + b"".join(chunk(filler) for _ in range(16)) + chunk(b" "))  # one byte too many
    await writer.drain()
    status, body = await read_answer(reader)
    assert status == 413 and b"payload_too_large" in body
    await assert_closed(reader)
    writer.close()

    # A client that goes on sending is cut off: past the limit the server drops what arrives
    # unparsed for a short grace (so the 413 can be read), then closes (http.bodies).
    reader, writer = await open_raw(client)
    writer.write(head)
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        while time.monotonic() - started < 30:
            writer.write(chunk(filler))
            await asyncio.wait_for(writer.drain(), 10)
    assert time.monotonic() - started < 15
    writer.close()
    assert await listed(client, ada) == 0


async def test_the_limit_counts_the_body_as_decoded(client, ada):
    small = gzip.compress(json.dumps({"records": [item(b"zipped")]}).encode())
    resp = await client.post(BATCH, data=small, headers={**ada.headers, "Content-Type": "application/json",
                                                          "Content-Encoding": "gzip"})
    assert resp.status == 201, await resp.text()
    # 20 MiB of JSON in 20 KB of gzip: refused once 16 MiB have been decoded, and closed.
    bomb = gzip.compress(b'{"records": [' + b" " * (20 * 1024 * 1024) + b"]}")
    reader, writer = await open_raw(client)
    writer.write((f"POST {BATCH} HTTP/1.1\r\nHost: x\r\nAuthorization: {ada.headers['Authorization']}\r\n"
                  f"Content-Type: application/json\r\nContent-Encoding: gzip\r\nContent-Length: {len(bomb)}\r\n\r\n"
                  ).encode() + bomb)
    await writer.drain()
    status, body = await read_answer(reader)
    assert status == 413 and b"payload_too_large" in body
    await assert_closed(reader)
    writer.close()
    assert await listed(client, ada) == 1


async def test_a_body_of_exactly_16_mib_is_read(client, ada):
    raw = json.dumps({"records": [item(b"x" * 100)]}).encode()
    raw = raw[:-1] + b" " * (MAX_BODY - len(raw)) + b"}"  # padded with whitespace to the limit
    assert len(raw) == MAX_BODY
    resp = await client.post(BATCH, data=raw, headers={**ada.headers, "Content-Type": "application/json"})
    assert resp.status == 201, await resp.text()


async def test_a_batch_over_the_quota_stores_nothing(client):
    pro = await register(client, "pro@example.org")
    await set_tier(client, pro.email, "pro")
    await set_usage(client, pro.email, PRO_CAP - 1000)
    body = await problem(await batch(client, pro, [item(os.urandom(400)) for _ in range(3)]), 402, "quota_exceeded")
    assert body["quota_bytes"] == PRO_CAP
    assert await listed(client, pro) == 0 and objects(client) == [] and temporaries(client) == []
    assert await usage(client, pro.email) == PRO_CAP - 1000
    assert (await batch(client, pro, [item(os.urandom(400)) for _ in range(2)])).status == 201
    assert await usage(client, pro.email) == PRO_CAP - 200
    # A replacement counts the difference: shrinking one record makes room for another.
    first = (await (await client.get(RECORDS, headers=pro.headers)).json())["items"][0]
    assert (await batch(client, pro, [item(b"", id=first["id"]), item(os.urandom(500))])).status == 201
    assert await usage(client, pro.email) == PRO_CAP - 100

    free = await register(client, "free@example.org")
    await set_tier(client, free.email, "free")
    await problem(await batch(client, free, [item(b"x")]), 402, "quota_exceeded")


async def test_a_batch_over_the_record_count_stores_nothing(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, default_tier="team", max_records_per_user=5)))
    acct = await register(client)
    assert (await batch(client, acct, [item(b"1"), item(b"2")])).status == 201
    await problem(await batch(client, acct, [item(str(i).encode() * 3) for i in range(4)]), 402, "quota_exceeded")
    assert await listed(client, acct) == 2 and len(objects(client)) == 2
    assert (await batch(client, acct, [item(str(i).encode() * 3) for i in range(3)])).status == 201


async def test_concurrent_batches_cannot_pass_the_quota_together(client):
    pro = await register(client, "pro@example.org")
    await set_tier(client, pro.email, "pro")
    await set_usage(client, pro.email, PRO_CAP - 10_000)
    # Each fits alone (4 x 1000 bytes); only two fit together.
    batches = [[item(os.urandom(1000)) for _ in range(4)] for _ in range(6)]
    answers = await asyncio.gather(*[batch(client, pro, b) for b in batches])
    statuses = sorted(r.status for r in answers)
    assert statuses == [201, 201, 402, 402, 402, 402], statuses
    assert await usage(client, pro.email) == PRO_CAP - 2000
    assert await listed(client, pro) == 8
    await referenced_only(client)  # the refused batches' objects are gone again


async def test_concurrent_batches_cannot_pass_the_record_count_together(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, default_tier="team", max_records_per_user=10)))
    acct = await register(client)
    batches = [[item(os.urandom(50)) for _ in range(4)] for _ in range(5)]
    statuses = sorted(r.status for r in await asyncio.gather(*[batch(client, acct, b) for b in batches]))
    assert statuses == [201, 201, 402, 402, 402], statuses
    assert await listed(client, acct) == 8
    await referenced_only(client)


# -- crash safety -------------------------------------------------------------------------------


async def test_an_acknowledged_batch_survives_kill_9(server_process, data_dir):
    env = {"ADIUVA_DEFAULT_TIER": "team", "ADIUVA_LOG_LEVEL": "WARNING"}
    server = server_process(**env)
    acked: dict[str, bytes] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(f"{server.url}/api/v1/auth/register",
                             json={"email": "ada@example.org", "password": "correct horse battery"}) as r:
            headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}

        async def one_batch(n: int) -> None:
            sent = [os.urandom(3000) for _ in range(n)]
            async with http.post(f"{server.url}{BATCH}", json={"records": [item(d) for d in sent]}, headers=headers) as r:
                if r.status == 201:
                    acked.update(zip((m["id"] for m in (await r.json())["items"]), sent))

        await one_batch(500)
        assert len(acked) == 500
        in_flight = [asyncio.create_task(one_batch(1000)) for _ in range(3)]
        await asyncio.sleep(0.05)
        server.proc.kill()  # SIGKILL right after an acknowledged batch, with others in flight
        server.proc.wait()
        await asyncio.gather(*in_flight, return_exceptions=True)

    server = server_process(**env)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(f"{server.url}/api/v1/auth/login",
                             json={"email": "ada@example.org", "password": "correct horse battery"}) as r:
            headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        stored: dict[str, bytes] = {}
        cursor = 0
        while True:
            async with http.get(f"{server.url}{CHANGES}", headers=headers,
                                params={"since": str(cursor), "limit": "1000", "include_data": "true"}) as r:
                assert r.status == 200, await r.text()
                page = await r.json()
            stored.update((c["id"], base64.b64decode(c["data"])) for c in page["changes"])
            cursor = page["next_cursor"]
            if not page["has_more"]:
                break
        assert {rid: stored.get(rid) for rid in acked} == acked
        assert len(stored) in (500, 1500, 2500, 3500)  # whole batches only, never part of one
    server.stop()
    settings = make_settings(data_dir)
    db = await Database.open(settings.db_path, readers=1)
    try:
        blobs = maintenance.open_blob_store(settings)
        assert (await maintenance.check(SQLiteStorageStore(db), blobs)).ok
    finally:
        await db.close()


# -- uploads without Content-Length ------------------------------------------------------------


async def test_a_chunked_upload_with_no_quota_left_is_refused_before_any_byte_is_written(client):
    free = await register(client, "free@example.org")
    await set_tier(client, free.email, "free")  # 0 bytes of cloud storage
    reader, writer = await open_raw(client)
    chunk = os.urandom(1024 * 1024)
    # One chunk of the body and no end: a server that reads before refusing waits for the rest.
    writer.write((f"POST {RECORDS}?table=notes HTTP/1.1\r\nHost: x\r\nAuthorization: {free.headers['Authorization']}\r\n"
                  f"X-Checksum: {'a' * 64}\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                 + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    await writer.drain()
    status, body = await read_answer(reader)
    assert status == 402 and b"quota_exceeded" in body
    assert temporaries(client) == [] and objects(client) == []
    writer.close()


async def test_a_chunked_upload_is_refused_once_it_passes_the_quota_left(client):
    pro = await register(client, "pro@example.org")
    await set_tier(client, pro.email, "pro")
    await set_usage(client, pro.email, PRO_CAP - 1000)
    seen: list[int] = []
    blobs = client.server.app[STORAGE].blobs

    async def chunks():
        for _ in range(50):  # 50 x 100 KiB: far more than the 1000 bytes left
            seen.append(sum(f.stat().st_size for f in blobs.tmp.iterdir()))
            yield os.urandom(100 * 1024)
            await asyncio.sleep(0.01)

    data = os.urandom(900)
    resp = await client.post(RECORDS, params={"table": "notes"}, data=chunks(),
                             headers={**pro.headers, "X-Checksum": sha(data)})
    await problem(resp, 402, "quota_exceeded")
    assert max(seen, default=0) <= 1024 * 1024  # it stopped at the first chunk past the quota
    assert temporaries(client) == [] and objects(client) == []

    async def small():
        yield data

    resp = await client.post(RECORDS, params={"table": "notes"}, data=small(), headers={**pro.headers, "X-Checksum": sha(data)})
    assert resp.status == 201, await resp.text()


# -- the document ---------------------------------------------------------------------------------


async def test_openapi_documents_bulk_sync(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    post = doc["paths"][BATCH]["post"]
    assert {"201", "400", "402", "404", "412", "413", "422"} <= set(post["responses"])
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    records = doc["components"]["schemas"][ref]["properties"]["records"]
    assert records["maxItems"] == 1000
    item_schema = doc["components"]["schemas"][records["items"]["$ref"].rsplit("/", 1)[1]]
    assert {"table", "data", "checksum", "id", "if_match"} == set(item_schema["properties"])
    params = {p["name"]: p for p in doc["paths"][CHANGES]["get"]["parameters"]}
    assert params["include_data"]["schema"]["type"] == "boolean"
    assert params["limit"]["schema"]["maximum"] == 1000
