"""The blob store in an S3-compatible bucket (AWS, MinIO, Garage, Ceph), through aiobotocore.

The same contract as `FileBlobStore` (see `blobs.BlobStore`), keys laid out the same way:
objects at `objects/<first two hex digits>/<digest>`, uploads in flight at `tmp/<uuid>`. An
upload is streamed to its temporary key while it is hashed (one `put_object` for a body of at
most one part, a multipart upload of `PART_SIZE` parts above, so at most one part is held in
memory, twice for the moment it is joined), and becomes visible under its digest only in `store`, after the caller has compared the
hash: a server-side copy, then the temporary key is deleted.

What S3 cannot give: no lock orders a deletion by age against a store that freshens the same
object (the file store's DELETION_LOCK). A store freshens the object's LastModified (a copy
onto itself) before its row is committed, so a sweep in another process, which deletes by age
with a grace period, leaves it alone; inside one server the keeper's pins order them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Any

from adiuva_server import errors
from adiuva_server.storage.blobs import DIGEST, Staged

# 8 MiB parts: S3's minimum is 5 MiB (but for the last), and 10,000 parts of 8 MiB allow an
# object of 78 GiB, far above any upload limit the server sets.
PART_SIZE = 8 * 1024 * 1024
# One `copy_object` copies at most 5 GiB; larger objects are copied in parts of this size.
COPY_LIMIT = 5 * 1024**3
COPY_PART = 1024**3
READ_CHUNK = 1024 * 1024
# Requests in flight for put_many/read_many (and the client's connection pool).
CONCURRENCY = 8
OBJECTS = "objects/"
TMP = "tmp/"


class S3BlobStore:
    """Blobs in `bucket`. `open()` builds the client, `close()` releases its connections."""

    def __init__(self, bucket: str, *, endpoint_url: str = "", region: str = "us-east-1",
                 access_key_id: str = "", secret_access_key: str = "", part_size: int = PART_SIZE) -> None:
        self.bucket = bucket
        self._endpoint_url = endpoint_url or None
        self._region = region
        self._keys = (access_key_id or None, secret_access_key or None)
        self.part_size = part_size
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._limit = asyncio.Semaphore(CONCURRENCY)

    async def open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            max_pool_connections=CONCURRENCY * 2,
            # Path-style URLs for self-hosted servers, whose buckets rarely have DNS names.
            s3={"addressing_style": "path"} if self._endpoint_url else None,
        )
        self._client = await self._stack.enter_async_context(get_session().create_client(
            "s3", region_name=self._region, endpoint_url=self._endpoint_url,
            aws_access_key_id=self._keys[0], aws_secret_access_key=self._keys[1], config=config))

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None

    @staticmethod
    def key(digest: str) -> str:
        if not DIGEST.fullmatch(digest):  # never let a name reach the bucket unchecked
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return f"{OBJECTS}{digest[:2]}/{digest}"

    # -- upload -------------------------------------------------------------------------------

    async def receive(self, chunks: AsyncIterable[bytes], max_bytes: int) -> Staged:
        key = f"{TMP}{uuid.uuid4().hex}"
        hasher = hashlib.sha256()
        size = 0
        # The part being filled: the chunks as they came (joined once, when the part goes out).
        part: list[bytes] = []
        filled = 0
        upload_id: str | None = None
        etags: list[dict[str, Any]] = []
        s3 = self._client

        async def send_part() -> None:
            nonlocal upload_id, part, filled
            if upload_id is None:
                upload_id = (await s3.create_multipart_upload(Bucket=self.bucket, Key=key))["UploadId"]
            body, part, filled = _body(part), [], 0
            number = len(etags) + 1
            got = await s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
            etags.append({"PartNumber": number, "ETag": got["ETag"]})

        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise errors.PayloadTooLarge(f"the body is larger than the limit of {max_bytes} bytes")
                hasher.update(chunk)
                while chunk:
                    # A full part goes out only once a byte beyond it has arrived: a body of
                    # exactly one part stays a single put_object.
                    if filled == self.part_size:
                        await send_part()
                    head, chunk = chunk[:self.part_size - filled], chunk[self.part_size - filled:]
                    part.append(head)
                    filled += len(head)
            if upload_id is None:
                await s3.put_object(Bucket=self.bucket, Key=key, Body=_body(part))
            else:
                if part:
                    await send_part()
                await s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                   MultipartUpload={"Parts": etags})
        except BaseException:
            await _shielded(self._abandon(key, upload_id))
            raise
        return Staged(hasher.hexdigest(), size, key)

    async def _abandon(self, key: str, upload_id: str | None) -> None:
        with contextlib.suppress(Exception):
            if upload_id is not None:
                await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        with contextlib.suppress(Exception):
            await self._client.delete_object(Bucket=self.bucket, Key=key)

    async def store(self, staged: Staged) -> None:
        final = self.key(staged.digest)
        if not staged.token.startswith(TMP):
            raise ValueError(f"not a temporary key: {staged.token!r}")
        try:
            if await self._head(final) is not None:
                # Identical bytes are kept once; freshen them so a sweep by age leaves them alone.
                await self._copy(final, final, staged.size)
            else:
                await self._copy(staged.token, final, staged.size)
        finally:
            await _shielded(self._abandon(staged.token, None))

    async def _copy(self, source: str, target: str, size: int) -> None:
        s3 = self._client
        src = {"Bucket": self.bucket, "Key": source}
        if size <= COPY_LIMIT:
            # REPLACE: S3 refuses a copy of an object onto itself that changes nothing.
            await s3.copy_object(Bucket=self.bucket, Key=target, CopySource=src, MetadataDirective="REPLACE")
            return
        upload_id = (await s3.create_multipart_upload(Bucket=self.bucket, Key=target))["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, size, COPY_PART), 1):
                end = min(start + COPY_PART, size) - 1
                got = await s3.upload_part_copy(Bucket=self.bucket, Key=target, UploadId=upload_id, PartNumber=number,
                                                CopySource=src, CopySourceRange=f"bytes={start}-{end}")
                parts.append({"PartNumber": number, "ETag": got["CopyPartResult"]["ETag"]})
            await s3.complete_multipart_upload(Bucket=self.bucket, Key=target, UploadId=upload_id,
                                               MultipartUpload={"Parts": parts})
        except BaseException:
            await _shielded(self._abandon_upload(target, upload_id))
            raise

    async def _abandon_upload(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):
            await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    async def discard(self, staged: Staged) -> None:
        await _shielded(self._abandon(staged.token, None))

    async def put_many(self, objects: Sequence[tuple[str, bytes]]) -> None:
        wanted = dict(objects)  # identical bytes are kept once

        async def put(digest: str, data: bytes) -> None:
            async with self._limit:
                # A PUT replaces atomically, and the bytes are the same: writing them again is
                # also what freshens an object already stored.
                await self._client.put_object(Bucket=self.bucket, Key=self.key(digest), Body=io.BytesIO(data))

        results = await asyncio.gather(*(put(d, b) for d, b in wanted.items()), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    # -- reads --------------------------------------------------------------------------------

    async def read_many(self, digests: Sequence[str]) -> list[bytes | None]:
        async def read(digest: str) -> bytes | None:
            async with self._limit:
                try:
                    got = await self._client.get_object(Bucket=self.bucket, Key=self.key(digest))
                except self._client.exceptions.NoSuchKey:
                    return None
                async with got["Body"] as body:
                    return await body.read()

        return list(await asyncio.gather(*(read(d) for d in digests)))

    async def size(self, digest: str) -> int | None:
        head = await self._head(self.key(digest))
        return None if head is None else head["ContentLength"]

    async def open_range(self, digest: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes [start, end) of an object (to its end when `end` is None), streamed.
        Raises FileNotFoundError when the object is missing."""
        if end is not None and end <= start:
            return
        extra = {} if start == 0 and end is None else {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        try:
            got = await self._client.get_object(Bucket=self.bucket, Key=self.key(digest), **extra)
        except self._client.exceptions.NoSuchKey:
            raise FileNotFoundError(digest) from None
        async with got["Body"] as body:
            while block := await body.read(READ_CHUNK):
                yield block

    async def size_and_hash(self, digest: str) -> tuple[int, str] | None:
        hasher = hashlib.sha256()
        size = 0
        try:
            async for block in self.open_range(digest):
                hasher.update(block)
                size += len(block)
        except FileNotFoundError:
            return None
        return size, hasher.hexdigest()

    async def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return await self._client.head_object(Bucket=self.bucket, Key=key)
        except self._client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    # -- maintenance ----------------------------------------------------------------------------

    async def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        key = self.key(digest)
        head = await self._head(key)
        if head is None:
            return False
        if older_than is not None and head["LastModified"].timestamp() >= older_than:
            return False
        await self._client.delete_object(Bucket=self.bucket, Key=key)
        return True

    async def scan_async(self) -> AsyncIterator[list[tuple[str, float]]]:
        """Every stored object as (digest, mtime), a listing page (up to 1,000) at a time."""
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self.bucket, Prefix=OBJECTS):
            batch = []
            for item in page.get("Contents", ()):
                folder, _, name = item["Key"][len(OBJECTS):].partition("/")
                if DIGEST.fullmatch(name) and name[:2] == folder:
                    batch.append((name, item["LastModified"].timestamp()))
            if batch:
                yield batch

    async def sweep_temporary(self, older_than: float) -> int:
        """Delete temporary keys, and abort multipart uploads, last written before `older_than`."""
        s3 = self._client
        removed = 0
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=TMP):
            stale = [{"Key": o["Key"]} for o in page.get("Contents", ()) if o["LastModified"].timestamp() < older_than]
            if stale:
                await s3.delete_objects(Bucket=self.bucket, Delete={"Objects": stale, "Quiet": True})
                removed += len(stale)
        async for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=TMP):
            for upload in page.get("Uploads", ()):
                if upload["Initiated"].timestamp() < older_than:
                    await self._abandon_upload(upload["Key"], upload["UploadId"])
                    removed += 1
        return removed

    async def temporary_count(self) -> int:
        """Temporary keys plus unfinished multipart uploads; for tests and diagnostics."""
        s3 = self._client
        count = 0
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=TMP):
            count += len(page.get("Contents", ()))
        async for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=TMP):
            count += len(page.get("Uploads", ()))
        return count


def _body(chunks: list[bytes]) -> io.BytesIO:
    """One part's bytes for botocore: a BytesIO over the joined bytes shares their buffer and
    botocore reads it in pieces (given bytes or a bytearray, it makes one or two more copies)."""
    return io.BytesIO(b"".join(chunks))


async def _shielded(coro: Any) -> None:
    """Let a clean-up finish even when the request that started it is being cancelled."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(coro)
