"""One contract for both blob stores: every test runs on FileBlobStore (files in a temp dir) and
on S3BlobStore (a real moto S3 server over HTTP, through aiobotocore), the same assertions."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

from adiuva_server import errors
from adiuva_server.storage.blobs import FileBlobStore
from adiuva_server.storage.s3 import PART_SIZE, S3BlobStore

MiB = 1024 * 1024


@pytest.fixture(params=["files", "s3"])
async def blobs(request, tmp_path):
    if request.param == "files":
        store = FileBlobStore(tmp_path / "blobs")
        store.open()
        yield store
        return
    store = request.getfixturevalue("s3_bucket").store()
    await store.open()
    yield store
    await store.close()


async def temporary(blobs) -> int:
    count = blobs.temporary_count()
    return await count if asyncio.iscoroutine(count) else count


async def stored(blobs) -> list[str]:
    return sorted(d for batch in [b async for b in blobs.scan_async()] for d, _ in batch)


async def chunks_of(data: bytes, size: int = 64 * 1024):
    for i in range(0, len(data), size):
        yield data[i:i + size]
        await asyncio.sleep(0)


async def generated(total: int, seed: bytes = b"s"):
    """`total` bytes made on the fly (never the whole body in the test either)."""
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB
    sent = 0
    while sent < total:
        piece = block[:min(len(block), total - sent)]
        sent += len(piece)
        yield piece


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def put(blobs, data: bytes) -> str:
    staged = await blobs.receive(chunks_of(data), len(data) + 1)
    await blobs.store(staged)
    return staged.digest


async def read(blobs, digest: str, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([b async for b in blobs.open_range(digest, start, end)])


async def test_round_trip(blobs):
    data = os.urandom(300_000)
    staged = await blobs.receive(chunks_of(data), 1 * MiB)
    assert (staged.digest, staged.size) == (sha(data), len(data))
    assert await blobs.read_many([staged.digest]) == [None]  # not visible before store
    await blobs.store(staged)
    assert await blobs.read_many([staged.digest]) == [data]
    assert await blobs.size(staged.digest) == len(data)
    assert await blobs.size_and_hash(staged.digest) == (len(data), sha(data))
    assert await read(blobs, staged.digest) == data
    assert await stored(blobs) == [staged.digest]
    assert await temporary(blobs) == 0


async def test_a_body_whose_digest_is_wrong_is_never_visible(blobs):
    """The service compares the received digest with the checksum the client sent and
    discards on a mismatch: neither name may then hold anything, and no temp stays."""
    data = b"the bytes that arrived"
    declared = sha(b"the bytes the client meant")
    staged = await blobs.receive(chunks_of(data), 1024)
    assert staged.digest != declared
    await blobs.discard(staged)
    assert await blobs.read_many([declared, staged.digest]) == [None, None]
    assert await stored(blobs) == []
    assert await temporary(blobs) == 0


async def test_a_20_mib_streamed_upload_reads_back_byte_identical(blobs):
    total = 20 * MiB
    expected = hashlib.sha256()
    async for piece in generated(total):
        expected.update(piece)
    staged = await blobs.receive(generated(total), total)
    assert (staged.digest, staged.size) == (expected.hexdigest(), total)
    if isinstance(blobs, S3BlobStore):
        # Went through multipart: a multipart object's ETag ends in -<parts>.
        head = await blobs._client.head_object(Bucket=blobs.bucket, Key=staged.token)
        assert head["ETag"].strip('"').endswith(f"-{-(-total // PART_SIZE)}")
    await blobs.store(staged)
    again = hashlib.sha256()
    size = 0
    async for block in blobs.open_range(staged.digest):
        again.update(block)
        size += len(block)
    assert (size, again.hexdigest()) == (total, staged.digest)
    assert await blobs.size_and_hash(staged.digest) == (total, staged.digest)
    assert await temporary(blobs) == 0


@pytest.mark.parametrize("total", [3000, 20 * MiB])  # one put, and a multipart upload under way
async def test_over_max_bytes_is_refused_and_leaves_nothing(blobs, total):
    with pytest.raises(errors.PayloadTooLarge):
        await blobs.receive(generated(total), total - 1)
    assert await temporary(blobs) == 0
    assert await stored(blobs) == []


async def test_a_cancelled_upload_leaves_nothing(blobs):
    async def slow():
        async for piece in generated(12 * MiB):
            yield piece
        await asyncio.sleep(30)
        yield b"never"

    task = asyncio.create_task(blobs.receive(slow(), 100 * MiB))
    await asyncio.sleep(0.5)
    deadline = time.monotonic() + 20
    while not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        if await temporary(blobs):
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await temporary(blobs) == 0


async def test_delete_older_than(blobs):
    digest = await put(blobs, b"delete me")
    assert not await blobs.delete(digest, older_than=time.time() - 60)  # written since: kept
    assert await blobs.read_many([digest]) == [b"delete me"]
    assert await blobs.delete(digest, older_than=time.time() + 2)
    assert await blobs.read_many([digest]) == [None]
    assert not await blobs.delete(digest)  # already gone
    other = await put(blobs, b"and me")
    assert await blobs.delete(other)
    assert await stored(blobs) == []


async def test_storing_identical_bytes_again_freshens_them(blobs):
    digest = await put(blobs, b"twice")
    first = time.time()
    await asyncio.sleep(2.1)  # S3's LastModified has one-second resolution
    between = first + 1.05  # after the first write, before the second (even truncated to seconds)
    assert await put(blobs, b"twice") == digest
    assert not await blobs.delete(digest, older_than=between)  # a sweep by age leaves it alone
    assert await stored(blobs) == [digest]
    assert await temporary(blobs) == 0


async def test_sweep_temporary_removes_abandoned_uploads(blobs):
    abandoned = await blobs.receive(chunks_of(b"a crash before store"), 1024)
    kept = await put(blobs, b"stored")
    assert await temporary(blobs) == 1
    assert await blobs.sweep_temporary(time.time() - 3600) == 0  # too young
    assert await blobs.sweep_temporary(time.time() + 2) == 1
    assert await temporary(blobs) == 0
    assert await blobs.read_many([kept, abandoned.digest]) == [b"stored", None]


async def test_sweep_temporary_aborts_stale_multipart_uploads(s3_bucket):
    blobs = s3_bucket.store()
    await blobs.open()
    try:
        s3 = blobs._client
        await s3.create_multipart_upload(Bucket=blobs.bucket, Key="tmp/crashed")  # a process died mid-upload
        assert await blobs.temporary_count() == 1
        # moto reports every upload as initiated in 2010, so "too young" is checked against 1970.
        assert await blobs.sweep_temporary(0) == 0
        assert await blobs.sweep_temporary(time.time() + 2) == 1
        assert (await s3.list_multipart_uploads(Bucket=blobs.bucket)).get("Uploads", []) == []
    finally:
        await blobs.close()


async def test_ranged_reads(blobs):
    data = os.urandom(3 * MiB + 17)
    digest = await put(blobs, data)
    assert await read(blobs, digest, 10, 20) == data[10:20]
    assert await read(blobs, digest, MiB - 3, 2 * MiB + 5) == data[MiB - 3:2 * MiB + 5]
    assert await read(blobs, digest, 3 * MiB) == data[3 * MiB:]
    assert await read(blobs, digest, 0, len(data)) == data
    assert await read(blobs, digest, 5, 5) == b""
    with pytest.raises(FileNotFoundError):
        await read(blobs, sha(b"missing"))
    assert await blobs.size(sha(b"missing")) is None
    assert await blobs.size_and_hash(sha(b"missing")) is None


async def test_put_many_and_read_many(blobs):
    objects = [(sha(b), b) for b in (f"item {i}".encode() * (i + 1) for i in range(40))]
    await blobs.put_many(objects + objects[:3])  # duplicates are kept once
    digests = [d for d, _ in objects]
    missing = sha(b"no such object")
    assert await blobs.read_many(digests + [missing]) == [b for _, b in objects] + [None]
    assert await stored(blobs) == sorted(digests)
    assert await temporary(blobs) == 0
    await blobs.put_many(objects[:2])  # already stored: fine
    assert await blobs.read_many(digests[:2]) == [objects[0][1], objects[1][1]]


async def test_concurrent_uploads_of_the_same_body_make_one_object(blobs):
    data = os.urandom(9 * MiB)  # above one part: both go through multipart on S3
    digests = await asyncio.gather(put(blobs, data), put(blobs, data))
    assert digests == [sha(data)] * 2
    assert await stored(blobs) == [sha(data)]
    assert await blobs.size_and_hash(sha(data)) == (len(data), sha(data))
    assert await temporary(blobs) == 0


async def test_names_that_are_not_digests_are_refused(blobs):
    for bad in ("../etc/passwd", "ab", "A" * 64):
        with pytest.raises(ValueError):
            await blobs.read_many([bad])


# -- settings --------------------------------------------------------------------------------


def test_s3_settings_are_read_and_the_keys_never_printed(tmp_path):
    from adiuva_server.config import Settings

    settings = Settings.from_env({
        "S3_BUCKET": "adiuva-blobs.eu", "S3_ENDPOINT_URL": "https://s3.example.test:9000/",
        "S3_REGION": "eu-central-1", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "hunter2secretkey",
    }, data_dir=tmp_path)
    assert (settings.s3_bucket, settings.s3_endpoint_url, settings.s3_region) == (
        "adiuva-blobs.eu", "https://s3.example.test:9000", "eu-central-1")
    assert (settings.aws_access_key_id, settings.aws_secret_access_key) == ("AKIDEXAMPLE", "hunter2secretkey")
    assert "hunter2secretkey" not in repr(settings) and "AKIDEXAMPLE" not in repr(settings)
    assert settings.sources["s3_bucket"] == settings.sources["aws_secret_access_key"] == "environment"
    default = Settings.from_env({}, data_dir=tmp_path)
    assert (default.s3_bucket, default.s3_endpoint_url, default.s3_region) == ("", "", "us-east-1")


@pytest.mark.parametrize("name, value", [
    ("S3_BUCKET", "Upper-Case"), ("S3_BUCKET", "ab"), ("S3_BUCKET", "a" * 64), ("S3_BUCKET", "-start"),
    ("S3_BUCKET", "two..dots"), ("S3_BUCKET", "192.168.1.10"), ("S3_BUCKET", "under_score"),
    ("S3_ENDPOINT_URL", "s3.example.test:9000"), ("S3_ENDPOINT_URL", "ftp://s3.example.test"),
    ("S3_ENDPOINT_URL", "http://s3.example.test:port"), ("S3_REGION", "EU Central"),
])
def test_invalid_s3_settings_are_refused_by_name(tmp_path, name, value):
    from adiuva_server.config import ConfigError, Settings

    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value}, data_dir=tmp_path)


def test_the_console_masks_both_s3_keys(tmp_path):
    from adiuva_server.config import Settings
    from adiuva_server.console.settings_view import MASK, setting_rows

    settings = Settings.from_env({"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "hunter2secretkey",
                                  "S3_BUCKET": "adiuva-blobs"}, data_dir=tmp_path)
    rows = {name: shown for name, shown, _ in setting_rows(settings)}
    assert rows["aws_access_key_id"] == rows["aws_secret_access_key"] == MASK
    assert rows["s3_bucket"] == "adiuva-blobs"


# -- the server on S3 (S3_BUCKET set) ---------------------------------------------------------

RECORDS = "/api/v1/storage/records"


@pytest.fixture
async def s3_client(aiohttp_client, data_dir, s3_bucket):
    from adiuva_server.app import create_app
    from tests.conftest import make_settings

    settings = make_settings(
        data_dir, s3_bucket=s3_bucket.name, s3_endpoint_url=s3_bucket.endpoint_url, s3_region=s3_bucket.region,
        aws_access_key_id=s3_bucket.access_key_id, aws_secret_access_key=s3_bucket.secret_access_key,
        max_record_bytes=32 * MiB, rate_limits={"free": 10_000, "pro": 10_000, "power": 10_000, "team": 10_000})
    return await aiohttp_client(create_app(settings))


async def test_the_api_stores_and_serves_records_from_the_bucket(s3_client, s3_bucket, data_dir):
    from adiuva_server.keys import STORAGE
    from adiuva_server.storage import maintenance
    from tests.conftest import register, set_tier

    client = s3_client
    acct = await register(client, "s3@example.org")
    await set_tier(client, acct.email, "pro")
    blobs = client.server.app[STORAGE].blobs
    assert isinstance(blobs, S3BlobStore) and blobs.bucket == s3_bucket.name
    status = await (await client.get("/api/v1/admin/status", headers=acct.headers)).json()  # the first account: admin
    assert status["backends"]["blobs"] == "s3"

    data = os.urandom(12 * MiB + 5)  # a multipart upload on its way in
    resp = await client.post(RECORDS, params={"table": "notes"}, data=chunks_of(data, 256 * 1024),
                             headers={**acct.headers, "X-Checksum": sha(data)})
    assert resp.status == 201, await resp.text()
    record = await resp.json()
    assert await stored(blobs) == [sha(data)]
    assert not (data_dir / "blobs" / "objects").exists() or not any((data_dir / "blobs" / "objects").iterdir())

    url = f"{RECORDS}/{record['id']}"
    resp = await client.get(url, headers=acct.headers)
    assert resp.status == 200 and resp.headers["Accept-Ranges"] == "bytes"
    assert await resp.read() == data
    etag = resp.headers["ETag"]
    resp = await client.get(url, headers={**acct.headers, "Range": "bytes=8388600-8388700"})
    assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes 8388600-8388700/{len(data)}"
    assert await resp.read() == data[8388600:8388701]
    resp = await client.get(url, headers={**acct.headers, "Range": "bytes=-10"})
    assert resp.status == 206 and await resp.read() == data[-10:]
    resp = await client.get(url, headers={**acct.headers, "If-None-Match": etag})
    assert resp.status == 304
    resp = await client.get(url, headers={**acct.headers, "Range": f"bytes={len(data)}-"})
    assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{len(data)}"

    # A body that does not match its checksum leaves nothing in the bucket.
    resp = await client.post(RECORDS, params={"table": "notes"}, data=b"tampered",
                             headers={**acct.headers, "X-Checksum": sha(b"original")})
    assert resp.status == 400 and (await resp.json())["code"] == "checksum_mismatch"
    assert await stored(blobs) == [sha(data)] and await blobs.temporary_count() == 0

    report = await maintenance.check(client.server.app[STORAGE].store, blobs)
    assert report.ok and report.referenced == 1 and report.temporary == 0

    assert (await client.delete(url, headers=acct.headers)).status == 204
    assert await stored(blobs) == []
    resp = await client.get(url, headers=acct.headers)
    assert resp.status == 404


async def test_a_referenced_object_missing_from_the_bucket_is_a_404_problem(s3_client, caplog):
    from adiuva_server.keys import STORAGE
    from tests.conftest import register

    client = s3_client
    acct = await register(client, "gone@example.org")
    resp = await client.post(RECORDS, params={"table": "notes"}, data=b"soon gone",
                             headers={**acct.headers, "X-Checksum": sha(b"soon gone")})
    assert resp.status == 201
    record = await resp.json()
    await client.server.app[STORAGE].blobs.delete(sha(b"soon gone"))  # behind the server's back
    resp = await client.get(f"{RECORDS}/{record['id']}", headers=acct.headers)
    assert resp.status == 404 and resp.content_type == "application/problem+json"
    assert "missing from the blob store" in caplog.text


async def test_a_server_backup_streams_the_objects_out_of_the_bucket_and_restores_to_files(s3_client, tmp_path,
                                                                                          aiohttp_client):
    from adiuva_server.app import create_app
    from adiuva_server.keys import SETTINGS
    from adiuva_server.server_backup import create_backup, restore_backup, verify_backup
    from tests.conftest import make_settings, register

    client = s3_client
    acct = await register(client, "backup@example.org")
    bodies = [os.urandom(3 * MiB + 1), b"small one"]
    ids = []
    for body in bodies:
        resp = await client.post(RECORDS, params={"table": "notes"}, data=body,
                                 headers={**acct.headers, "X-Checksum": sha(body)})
        assert resp.status == 201, await resp.text()
        ids.append((await resp.json())["id"])
    path, manifest = await create_backup(client.server.app[SETTINGS], tmp_path / "s3.tar")
    assert manifest.counts["records"] == 2
    assert {f"blobs/{sha(b)[:2]}/{sha(b)}" for b in bodies} <= set(manifest.files)
    await asyncio.to_thread(verify_backup, path)
    restored = tmp_path / "restored"
    await asyncio.to_thread(restore_backup, path, restored)
    # Served from the restored data dir's files (no bucket): the same account, the same bytes.
    other = await aiohttp_client(create_app(make_settings(restored, rate_limits={"free": 10_000, "pro": 10_000,
                                                                                 "power": 10_000, "team": 10_000})))
    resp = await other.post("/api/v1/auth/login", json={"email": acct.email, "password": acct.password})
    assert resp.status == 200
    headers = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
    for rid, body in zip(ids, bodies):
        resp = await other.get(f"{RECORDS}/{rid}", headers=headers)
        assert resp.status == 200 and await resp.read() == body
    # The old token too: the JWT secret travelled in the archive.
    assert (await other.get("/api/v1/auth/me", headers=acct.headers)).status == 200


async def test_the_doctor_checks_the_bucket(s3_client):
    from adiuva_server import doctor
    from adiuva_server.keys import SETTINGS, STORAGE
    from tests.conftest import register

    client = s3_client
    acct = await register(client, "doc@example.org")
    resp = await client.post(RECORDS, params={"table": "notes"}, data=b"checked",
                             headers={**acct.headers, "X-Checksum": sha(b"checked")})
    assert resp.status == 201
    settings = client.server.app[SETTINGS]
    assert [f.level for f in await doctor._storage(settings, fix=False)] == [doctor.OK]
    await client.server.app[STORAGE].blobs.put_many([(sha(b"stray"), b"stray")])  # no row references it
    findings = await doctor._storage(settings, fix=True)
    # A shared bucket: another node may be committing the row for it, so a fresh one stays.
    assert any("1 younger than 1 h left alone" in f.message for f in findings), findings
    assert await client.server.app[STORAGE].blobs.read_many([sha(b"stray")]) == [b"stray"]


UPLOAD_IN_A_PROCESS = """
import asyncio, os, sys, tracemalloc
from adiuva_server.storage.s3 import S3BlobStore

async def generated(total):  # a new object per chunk, as a request body's chunks are
    for _ in range(total // 65536):
        yield os.urandom(65536)

async def main(endpoint, bucket, total):
    blobs = S3BlobStore(bucket, endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing")
    await blobs.open()
    tracemalloc.start()
    staged = await blobs.receive(generated(total), total)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    await blobs.discard(staged)
    await blobs.close()
    print(staged.size, peak)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_a_large_upload_holds_about_one_part_in_memory(s3_bucket):
    """Measured in a process of its own: this one also runs moto, which keeps every byte."""
    import subprocess
    import sys

    from tests.conftest import REPO

    total = 48 * MiB
    out = subprocess.run([sys.executable, "-c", UPLOAD_IN_A_PROCESS, s3_bucket.endpoint_url, s3_bucket.name, str(total)],
                         capture_output=True, text=True, timeout=120, cwd=REPO, check=True).stdout.split()
    size, peak = int(out[0]), int(out[1])
    assert size == total
    # The part being filled, and its joined copy for the moment it goes out; never the body.
    assert peak < 2.5 * PART_SIZE, f"peak {peak / MiB:.1f} MiB for a {total // MiB} MiB body"
