"""HTTP routes of encrypted storage: records, the change feed, backups. Thin: read the request,
call the service, shape the answer. Bodies are streamed, never read whole."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import re
from collections.abc import Awaitable, Callable
from email.utils import format_datetime
from pathlib import Path
from typing import IO, Any

import ijson
import pydantic
import pydantic_core
from aiohttp import web
# The C parser by name: no silent fall-back to ijson's pure-Python one (~50x slower), and
# PyInstaller sees the import.
from ijson.backends import yajl2_c as json_events

from adiuva_server import errors
from adiuva_server.http.auth import principal
from adiuva_server.http.problem import from_error
from adiuva_server.http.routing import Api, validation_problem
from adiuva_server.keys import STORAGE
from adiuva_server.storage.blobs import FileBlobStore
from adiuva_server.storage.models import (
    MAX_BATCH_BODY_BYTES, BackupHistory, BackupMeta, ChangesPage, Change, ChangesQuery, RecordBatchRequest,
    RecordBatchResult, RecordCreateQuery, RecordListQuery, RecordMeta, RecordPage,
)
from adiuva_server.storage.service import (
    Body, StorageService, etag_of, none_match, parse_backup_headers, parse_checksum,
)
from adiuva_server.storage.store import Backup, Record

log = logging.getLogger(__name__)
api = Api("storage")

OCTETS = "application/octet-stream"
JSON_SLICE = 64 * 1024  # bytes of a batch body parsed between two turns of the event loop
_BYTES = {OCTETS: "the encrypted bytes, as the client encrypted them"}
_CHECKSUM_HEADER = {"X-Checksum": "SHA-256 of the body, hex (required)"}
_BACKUP_HEADERS = {
    "X-Backup-Version": "the desktop app's database version (required)",
    "X-Backup-Timestamp": "when the desktop app took the backup, ISO 8601 (required)",
    "X-Backup-Checksum": "SHA-256 of the body, hex (required)",
}


class RangeNotSatisfiable(errors.AdiuvaError):
    status = 416
    code = "range_not_satisfiable"
    title = "Range not satisfiable"

    def __init__(self, size: int, detail: str) -> None:
        super().__init__(detail, headers={"Content-Range": f"bytes */{size}"}, extra={"size_bytes": size})


_BYTE_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$", re.ASCII | re.IGNORECASE)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (offset, count) a Range header asks of `size` bytes; None for the whole body.
    One range only (as before: aiohttp's FileResponse never did multipart ranges)."""
    if header is None:
        return None
    m = _BYTE_RANGE.fullmatch(header.strip())
    if m is None or m.groups() == ("", ""):
        raise RangeNotSatisfiable(size, "Range must be a single byte range: bytes=first-last, bytes=first- or bytes=-suffix")
    first, last = m.groups()
    try:
        if not first:  # the last `last` bytes
            suffix = int(last)
            if suffix == 0:
                raise RangeNotSatisfiable(size, "a suffix range of 0 bytes selects nothing")
            if size == 0:
                return None
            start = max(0, size - suffix)
            return start, size - start
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:  # more digits than int() accepts
        raise RangeNotSatisfiable(size, "Range is out of bounds") from None
    if end <= start:
        raise RangeNotSatisfiable(size, "Range ends before it starts")
    if start >= size:
        raise RangeNotSatisfiable(size, f"Range starts at or after the end of the {size} bytes")
    return start, min(end, size) - start


def if_range_holds(request: web.Request, etag: str, last_modified: int | None) -> bool:
    """RFC 9110 13.1.5: honour Range only if If-Range is absent or still names the current
    representation: an entity tag by strong comparison (a weak tag never matches), a date
    only when it is exactly the Last-Modified we send. Otherwise the whole body goes out, so
    a resumed download can never splice two versions together."""
    value = request.headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    if last_modified is None:
        return False
    try:
        date = request.if_range
    except ValueError:
        return False
    return date is not None and date.timestamp() == last_modified


class BlobResponse(web.FileResponse):
    """An object's bytes with sendfile, from a file the handler has already opened (so an
    object deleted meanwhile is still read whole, and a missing one was answered as a problem
    by the handler) and a range the handler has already validated. The handler has evaluated
    every conditional header against the resource's own validators (in `headers`); the file's
    mtime must neither answer 304/412/416 nor leave the server, so FileResponse's own
    preparation is replaced and only its sendfile (`_sendfile`, private; tests/test_storage.py
    notices if it moves) is used."""

    def __init__(self, fobj: IO[bytes], size: int, span: tuple[int, int] | None, *,
                 headers: dict[str, str]) -> None:
        super().__init__(Path(fobj.name), headers=headers)
        self._fobj = fobj
        self._size = size
        self._span = span
        self.content_type = OCTETS

    async def prepare(self, request: Any) -> Any:
        try:
            offset, count = self._span or (0, self._size)
            if self._span is not None:
                self.set_status(206)
                self.headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{self._size}"
            self.headers["Accept-Ranges"] = "bytes"
            self.content_length = count
            if count == 0 or request.method == "HEAD":
                return await web.StreamResponse.prepare(self, request)
            return await self._sendfile(request, self._fobj, offset, count)
        finally:
            self._fobj.close()


def _open_object(path: Path) -> IO[bytes] | None:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        return None


async def _send_object(
    request: web.Request, lookup: Callable[[], Awaitable[Record | Backup]],
    describe: Callable[[Any], tuple[dict[str, str], int | None]],
) -> web.StreamResponse:
    """Answer a download: 304 when the client's copy is current, else the bytes (whole, or the
    Range asked for). `describe` gives the response headers (with ETag) and Last-Modified (Unix
    seconds, or None). The object is opened before the answer starts; if it vanished between
    the lookup and the open (a replace or delete raced us), look the resource up once more."""
    storage = _storage(request)
    if not isinstance(storage.blobs, FileBlobStore):
        return await _stream_object(request, lookup, describe)
    loop = asyncio.get_running_loop()
    for _attempt in range(2):
        item = await lookup()
        headers, last_modified = describe(item)
        headers["Cache-Control"] = "private, no-cache"
        if _not_modified(request, item.checksum, last_modified):
            return web.Response(status=304, headers=headers)
        fobj = await loop.run_in_executor(None, _open_object, storage.object_path(item.checksum))
        if fobj is not None:
            break
    else:
        log.error("object %s is referenced but missing from the blob store; run `adiuva doctor`", item.checksum)
        raise errors.NotFound("the stored bytes are missing on the server")
    try:
        size = os.fstat(fobj.fileno()).st_size
        span = byte_range(request.headers.get("Range"), size) if if_range_holds(
            request, headers["ETag"], last_modified) else None
    except BaseException:
        fobj.close()
        raise
    return BlobResponse(fobj, size, span, headers=headers)


async def _stream_object(
    request: web.Request, lookup: Callable[[], Awaitable[Record | Backup]],
    describe: Callable[[Any], tuple[dict[str, str], int | None]],
) -> web.StreamResponse:
    """`_send_object` for a store with no local files (S3): the same answers, the bytes streamed
    as they are read. The object's first bytes are read before the answer starts, so an object
    that vanished meanwhile is looked up once more (or is a problem), never a cut body."""
    blobs = _storage(request).blobs
    for _attempt in range(2):
        item = await lookup()
        headers, last_modified = describe(item)
        headers["Cache-Control"] = "private, no-cache"
        if _not_modified(request, item.checksum, last_modified):
            return web.Response(status=304, headers=headers)
        size = await blobs.size(item.checksum)
        if size is None:
            continue
        span = byte_range(request.headers.get("Range"), size) if if_range_holds(
            request, headers["ETag"], last_modified) else None
        offset, count = span or (0, size)
        chunks = blobs.open_range(item.checksum, offset, offset + count)
        first = b""
        if count and request.method != "HEAD":
            try:
                first = await anext(chunks)
            except (FileNotFoundError, StopAsyncIteration):
                await chunks.aclose()
                continue
        break
    else:
        log.error("object %s is referenced but missing from the blob store; run `adiuva doctor`", item.checksum)
        raise errors.NotFound("the stored bytes are missing on the server")
    try:
        response = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
        if span is not None:
            response.headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
        response.headers["Accept-Ranges"] = "bytes"
        response.content_type = OCTETS
        response.content_length = count
        await response.prepare(request)
        if first:
            await response.write(first)
            async for block in chunks:
                await response.write(block)
        await response.write_eof()
        return response
    finally:
        await chunks.aclose()


def _not_modified(request: web.Request, checksum: str, last_modified: int | None) -> bool:
    """If-None-Match (weak comparison) decides; only without it, If-Modified-Since (RFC 9110 13.2.2)."""
    header = request.headers.get("If-None-Match")
    if header is not None:
        return none_match(header, checksum)
    if last_modified is None:
        return False
    try:
        since = request.if_modified_since
    except ValueError:
        return False
    # Exactly the date sent, not "any later date": a client holding a newer backup that has
    # since been deleted must get the (older) latest one, not a 304.
    return since is not None and last_modified == since.timestamp()


def _body(request: web.Request) -> Body:
    return Body(request.content_length, request.content.iter_any())


def _storage(request: web.Request) -> StorageService:
    return request.app[STORAGE]


def _record_headers(record: Record) -> dict[str, str]:
    assert record.checksum is not None
    return {"X-Checksum": record.checksum, "ETag": etag_of(record.checksum)}


def _backup_headers(backup: Backup) -> dict[str, str]:
    return {
        "X-Backup-Version": backup.version,
        "X-Backup-Timestamp": backup.timestamp,
        "X-Backup-Checksum": backup.checksum,
        "X-Backup-Id": backup.id,
        "ETag": etag_of(backup.checksum),
        "Last-Modified": format_datetime(dt.datetime.fromtimestamp(backup.created_unix, dt.UTC), usegmt=True),
    }


# -- records ----------------------------------------------------------------------------------------


@api.post(
    "/storage/records", summary="Store an encrypted record", query=RecordCreateQuery, response=RecordMeta,
    status=201, errors=(400, 402, 413, 422, 429), raw_body=_BYTES, request_headers=_CHECKSUM_HEADER,
    required_headers=tuple(_CHECKSUM_HEADER),
)
async def create_record(request: web.Request, query: RecordCreateQuery) -> RecordMeta:
    checksum = parse_checksum(request.headers.get("X-Checksum"), "X-Checksum")
    record = await _storage(request).create_record(principal(request), query.table, checksum, _body(request))
    return RecordMeta.of(record)


@api.get("/storage/records", summary="List records (metadata only)", query=RecordListQuery, response=RecordPage,
         errors=(422, 429))
async def list_records(request: web.Request, query: RecordListQuery) -> RecordPage:
    items, total = await _storage(request).list_records(principal(request), query.table, query.page, query.limit)
    return RecordPage(items=[RecordMeta.of(r) for r in items], page=query.page, limit=query.limit, total=total)


@api.get(
    "/storage/records/{record_id}", summary="Download a record's encrypted bytes", errors=(304, 404, 416, 429),
    raw_response={OCTETS: "the bytes"},
    request_headers={"If-None-Match": "an ETag: 304 if unchanged",
                     "Range": "one byte range (206); 416 if it starts past the end",
                     "If-Range": "an ETag: the Range is honoured only if it is still current, else 200 with every byte"},
    response_headers={"X-Checksum": "SHA-256 of the bytes", "ETag": "the quoted checksum"},
)
async def get_record(request: web.Request) -> web.StreamResponse:
    who, record_id = principal(request), request.match_info["record_id"]
    return await _send_object(request, lambda: _storage(request).record(who, record_id),
                              lambda record: (_record_headers(record), None))


@api.put(
    "/storage/records/{record_id}", summary="Replace a record's encrypted bytes", response=RecordMeta,
    errors=(400, 402, 404, 412, 413, 422, 429), raw_body=_BYTES,
    request_headers={**_CHECKSUM_HEADER, "If-Match": "the ETag the client last saw: 412 if it changed since"},
    required_headers=tuple(_CHECKSUM_HEADER),
)
async def replace_record(request: web.Request) -> web.Response:
    checksum = parse_checksum(request.headers.get("X-Checksum"), "X-Checksum")
    record = await _storage(request).replace_record(
        principal(request), request.match_info["record_id"], checksum, _body(request), request.headers.get("If-Match")
    )
    meta = RecordMeta.of(record)
    return web.Response(body=meta.model_dump_json().encode(), content_type="application/json",
                        headers={"ETag": etag_of(meta.checksum)})


@api.delete("/storage/records/{record_id}", summary="Delete a record", status=204, errors=(404, 412, 429),
            request_headers={"If-Match": "the ETag the client last saw: 412 if it changed since"})
async def delete_record(request: web.Request) -> None:
    await _storage(request).delete_record(principal(request), request.match_info["record_id"], request.headers.get("If-Match"))


@api.get("/storage/changes", summary="Records created, replaced or deleted after a cursor (sync feed)",
         query=ChangesQuery, response=ChangesPage, errors=(410, 422, 429))
async def changes(request: web.Request, query: ChangesQuery) -> ChangesPage | web.Response:
    rows, cursor, more = await _storage(request).changes(principal(request), query.since, query.limit, query.include_data)
    if query.include_data:  # up to 16 MiB of base64 to write: not on the event loop
        body = await asyncio.to_thread(_changes_json, rows, cursor, more)
        return web.Response(body=body, content_type="application/json")
    return ChangesPage(changes=[Change.of(r) for r, _ in rows], next_cursor=cursor, has_more=more)


def _changes_json(rows: list[tuple[Record, bytes | None]], cursor: int, more: bool) -> bytes:
    """A ChangesPage as JSON, written one change at a time: a single dump of a page with 16 MiB
    inlined holds the GIL for ~100 ms (measured), so the event loop would wait for it even from
    a thread; change by change (~35 us each) it gets its turn."""
    changes = (
        pydantic_core.to_json(Change.of(r, None if data is None else base64.b64encode(data).decode()))
        for r, data in rows
    )
    envelope = pydantic_core.to_json(ChangesPage(changes=[], next_cursor=cursor, has_more=more))
    head, tail = envelope.split(b'"changes":[]', 1)  # the page's other fields as the model writes them
    return head + b'"changes":[' + b",".join(changes) + b"]" + tail


@api.post(
    "/storage/records/batch", summary="Create and replace many records at once (all or nothing)",
    body=RecordBatchRequest, read_body=False, body_limit=lambda settings: MAX_BATCH_BODY_BYTES,
    response=RecordBatchResult, status=201,
    errors=(400, 402, 404, 412, 413, 422, 429),
)
async def write_batch(request: web.Request) -> RecordBatchResult | web.Response:
    # A refused body is never read further: the connection drops the rest and closes (http.bodies).
    fields = await _read_json_incrementally(request, MAX_BATCH_BODY_BYTES)
    body = await asyncio.to_thread(_validate_batch, fields)
    records = await _storage(request).write_batch(principal(request), body.records)
    return RecordBatchResult(items=[RecordMeta.of(r) for r in records])


async def _read_json_incrementally(request: web.Request, limit: int) -> dict[str, Any]:
    """The body's top-level JSON object as {key: value}, parsed while it arrives, a slice at a
    time: one parse of a 16 MiB body (pydantic, json) holds the GIL for 25-50 ms, so the event
    loop would wait for it even from a thread; slices of 64 KiB take ~0.1 ms each. Refused from
    Content-Length, or as soon as the body passes `limit` bytes (client_max_size, the app's
    limit for JSON, is far smaller than a batch's). Not an object: {} (the model says what is
    missing)."""
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"the body ({request.content_length} bytes) is larger than the limit of {limit} bytes")
    fields = ijson.sendable_list()
    parser = json_events.kvitems_coro(fields, "", use_float=True)
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise errors.PayloadTooLarge(f"the body is larger than the limit of {limit} bytes")
            for i in range(0, len(chunk), JSON_SLICE):
                parser.send(chunk[i:i + JSON_SLICE])
                await asyncio.sleep(0)
        parser.close()
    except ijson.JSONError:
        raise errors.MalformedRequest("a JSON request body is required" if size == 0
                                      else "the request body is not valid JSON") from None
    return dict(fields)


def _validate_batch(fields: dict[str, Any]) -> RecordBatchRequest:
    try:
        return RecordBatchRequest.model_validate(fields)
    except pydantic.ValidationError as exc:
        problem = validation_problem(exc, "body")
        loc = problem.extra.get("errors", [{}])[0].get("loc", [])
        if len(loc) > 2 and loc[1] == "records" and str(loc[2]).isdigit():
            problem.extra["index"] = int(loc[2])  # which record is bad
        raise problem from None


# -- backups ------------------------------------------------------------------------------------------


@api.put(
    "/backup", summary="Upload an encrypted backup of the desktop database", response=BackupMeta, status=201,
    errors=(400, 402, 413, 422, 429), raw_body=_BYTES, request_headers=_BACKUP_HEADERS,
    required_headers=tuple(_BACKUP_HEADERS),
)
async def put_backup(request: web.Request) -> BackupMeta:
    h = request.headers
    version, timestamp = parse_backup_headers(h.get("X-Backup-Version"), h.get("X-Backup-Timestamp"))
    checksum = parse_checksum(h.get("X-Backup-Checksum"), "X-Backup-Checksum")
    backup = await _storage(request).put_backup(principal(request), version, timestamp, checksum, _body(request))
    return BackupMeta.of(backup)


def _describe_backup(backup: Backup) -> tuple[dict[str, str], int | None]:
    # Its date is a validator only if no other backup of the user shares its second.
    return _backup_headers(backup), None if backup.shares_second else backup.created_unix


_BACKUP_RESPONSE = dict(
    raw_response={OCTETS: "the backup's bytes"},
    request_headers={
        "If-None-Match": "an ETag: 304 if it is still the one sent",
        "If-Modified-Since": "the Last-Modified last received: 304 if that backup is still the one (ignored with If-None-Match)",
        "Range": "one byte range (206); 416 if it starts past the end",
        "If-Range": "an ETag or the Last-Modified date: the Range is honoured only if it is still current",
    },
    response_headers={**_BACKUP_HEADERS, "X-Backup-Id": "the backup's id", "ETag": "the quoted checksum",
                      "Last-Modified": "when the server received it (unique per backup of a user)"},
)


@api.get("/backup", summary="Download the latest backup", errors=(304, 404, 416, 429), **_BACKUP_RESPONSE)
async def latest_backup(request: web.Request) -> web.StreamResponse:
    who = principal(request)
    return await _send_object(request, lambda: _storage(request).latest_backup(who), _describe_backup)


@api.get("/backup/history", summary="The backups kept, newest first", response=BackupHistory, errors=(429,))
async def backup_history(request: web.Request) -> BackupHistory:
    return BackupHistory(items=[BackupMeta.of(b) for b in await _storage(request).backups(principal(request))])


@api.get("/backup/{backup_id}", summary="Download one backup", errors=(304, 404, 416, 429), **_BACKUP_RESPONSE)
async def get_backup(request: web.Request) -> web.StreamResponse:
    who, backup_id = principal(request), request.match_info["backup_id"]
    return await _send_object(request, lambda: _storage(request).backup(who, backup_id), _describe_backup)


@api.delete("/backup/{backup_id}", summary="Delete a backup", status=204, errors=(404, 429))
async def delete_backup(request: web.Request) -> None:
    await _storage(request).delete_backup(principal(request), request.match_info["backup_id"])
