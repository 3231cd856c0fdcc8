"""HTTP routes of encrypted storage: records, the change feed, backups. Thin: read the request,
call the service, shape the answer. Bodies are streamed, never read whole."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import AsyncIterator
from email.utils import format_datetime
from pathlib import Path
from typing import Any

from aiohttp import web
# Private, but the only seam to keep sendfile while replacing FileResponse's own validators;
# tests/test_storage.py (ETag, 304, Range) notices if it moves.
from aiohttp.web_fileresponse import _FileResponseResult

from adiuva_server.db import Database
from adiuva_server.http.auth import principal
from adiuva_server.http.routing import Api
from adiuva_server.keys import DB, SETTINGS, STORAGE
from adiuva_server.storage import maintenance
from adiuva_server.storage.models import (
    BackupHistory, BackupMeta, ChangesPage, Change, ChangesQuery, RecordCreateQuery, RecordListQuery, RecordMeta,
    RecordPage,
)
from adiuva_server.storage.service import (
    Body, StorageService, etag_of, none_match, parse_backup_headers, parse_checksum,
)
from adiuva_server.storage.store import Backup, Record, SQLiteStorageStore

log = logging.getLogger(__name__)
api = Api("storage")

OCTETS = "application/octet-stream"
SWEEP_SECONDS = 6 * 3600.0
_BYTES = {OCTETS: "the encrypted bytes, as the client encrypted them"}
_CHECKSUM_HEADER = {"X-Checksum": "SHA-256 of the body, hex (required)"}
_BACKUP_HEADERS = {
    "X-Backup-Version": "the desktop app's database version (required)",
    "X-Backup-Timestamp": "when the desktop app took the backup, ISO 8601 (required)",
    "X-Backup-Checksum": "SHA-256 of the body, hex (required)",
}


class BlobResponse(web.FileResponse):
    """A FileResponse (sendfile, Range support) whose validators are the resource's own: the
    handler has already evaluated conditional headers against them, so the file's mtime-based
    ETag and Last-Modified must neither answer 304/412 nor leave the server."""

    def __init__(self, path: Path, *, etag: str | None = None, last_modified: float | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(path, headers=headers)
        self._own_etag = etag
        self._own_last_modified = last_modified
        self.content_type = OCTETS

    def _make_response(self, request: Any, accept_encoding: str) -> Any:
        fobj = self._path.open("rb")  # no .gz/.br siblings and no conditionals: see the class doc
        return _FileResponseResult.SEND_FILE, fobj, os.fstat(fobj.fileno()), None

    async def _sendfile(self, request: Any, fobj: Any, offset: int, count: int) -> Any:
        self.headers.pop("ETag", None)
        self.headers.pop("Last-Modified", None)
        if self._own_etag is not None:
            self.headers["ETag"] = self._own_etag
        if self._own_last_modified is not None:
            self.last_modified = self._own_last_modified
        return await super()._sendfile(request, fobj, offset, count)


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
        "Last-Modified": format_datetime(dt.datetime.fromtimestamp(backup.created_unix, dt.UTC), usegmt=True),
    }


# -- records ----------------------------------------------------------------------------------------


@api.post(
    "/storage/records", summary="Store an encrypted record", query=RecordCreateQuery, response=RecordMeta,
    status=201, errors=(400, 402, 413, 422, 429), raw_body=_BYTES, request_headers=_CHECKSUM_HEADER,
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
    "/storage/records/{record_id}", summary="Download a record's encrypted bytes", errors=(404, 429),
    raw_response={OCTETS: "the bytes"}, request_headers={"If-None-Match": "an ETag: 304 if unchanged"},
    response_headers={"X-Checksum": "SHA-256 of the bytes", "ETag": "the quoted checksum"},
)
async def get_record(request: web.Request) -> web.StreamResponse:
    storage = _storage(request)
    record = await storage.record(principal(request), request.match_info["record_id"])
    headers = {**_record_headers(record), "Cache-Control": "private, no-cache"}
    if none_match(request.headers.get("If-None-Match"), record.checksum):
        return web.Response(status=304, headers=headers)
    return BlobResponse(storage.object_path(record.checksum), etag=headers.pop("ETag"), headers=headers)


@api.put(
    "/storage/records/{record_id}", summary="Replace a record's encrypted bytes", response=RecordMeta,
    errors=(400, 402, 404, 412, 413, 422, 429), raw_body=_BYTES,
    request_headers={**_CHECKSUM_HEADER, "If-Match": "the ETag the client last saw: 412 if it changed since"},
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
         query=ChangesQuery, response=ChangesPage, errors=(422, 429))
async def changes(request: web.Request, query: ChangesQuery) -> ChangesPage:
    rows, cursor, more = await _storage(request).changes(principal(request), query.since, query.limit)
    return ChangesPage(changes=[Change.of(r) for r in rows], next_cursor=cursor, has_more=more)


# -- backups ------------------------------------------------------------------------------------------


@api.put(
    "/backup", summary="Upload an encrypted backup of the desktop database", response=BackupMeta, status=201,
    errors=(400, 402, 413, 422, 429), raw_body=_BYTES, request_headers=_BACKUP_HEADERS,
)
async def put_backup(request: web.Request) -> BackupMeta:
    h = request.headers
    version, timestamp = parse_backup_headers(h.get("X-Backup-Version"), h.get("X-Backup-Timestamp"))
    checksum = parse_checksum(h.get("X-Backup-Checksum"), "X-Backup-Checksum")
    backup = await _storage(request).put_backup(principal(request), version, timestamp, checksum, _body(request))
    return BackupMeta.of(backup)


def _send_backup(request: web.Request, backup: Backup) -> web.StreamResponse:
    headers = {**_backup_headers(backup), "Cache-Control": "private, no-cache"}
    since = request.if_modified_since
    if since is not None and backup.created_unix <= since.timestamp():
        return web.Response(status=304, headers=headers)
    headers.pop("Last-Modified")
    return BlobResponse(_storage(request).object_path(backup.checksum), last_modified=backup.created_unix,
                        headers=headers)


_BACKUP_RESPONSE = dict(
    raw_response={OCTETS: "the backup's bytes"},
    request_headers={"If-Modified-Since": "304 unless a newer backup arrived since"},
    response_headers={**_BACKUP_HEADERS, "X-Backup-Id": "the backup's id", "Last-Modified": "when the server received it"},
)


@api.get("/backup", summary="Download the latest backup", errors=(404, 429), **_BACKUP_RESPONSE)
async def latest_backup(request: web.Request) -> web.StreamResponse:
    return _send_backup(request, await _storage(request).latest_backup(principal(request)))


@api.get("/backup/history", summary="The backups kept, newest first", response=BackupHistory, errors=(429,))
async def backup_history(request: web.Request) -> BackupHistory:
    return BackupHistory(items=[BackupMeta.of(b) for b in await _storage(request).backups(principal(request))])


@api.get("/backup/{backup_id}", summary="Download one backup", errors=(404, 429), **_BACKUP_RESPONSE)
async def get_backup(request: web.Request) -> web.StreamResponse:
    return _send_backup(request, await _storage(request).backup(principal(request), request.match_info["backup_id"]))


@api.delete("/backup/{backup_id}", summary="Delete a backup", status=204, errors=(404, 429))
async def delete_backup(request: web.Request) -> None:
    await _storage(request).delete_backup(principal(request), request.match_info["backup_id"])


# -- services -----------------------------------------------------------------------------------------


@api.cleanup_ctx
async def storage_service(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    loop = asyncio.get_running_loop()
    blobs = await loop.run_in_executor(None, maintenance.open_blob_store, settings)
    # Nothing is uploading yet: every temporary file is a leftover of an earlier run.
    removed = await blobs.sweep_temporary(float("inf"))
    if removed:
        log.info("removed %d abandoned upload(s)", removed)
    service = StorageService(settings, SQLiteStorageStore(app[DB]), blobs)
    app[STORAGE] = service
    task = asyncio.create_task(_sweep_forever(app[DB], service))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await service.keeper.drain()


async def _sweep_forever(db: Database, service: StorageService) -> None:
    """Unreferenced objects (a crash, a deleted user) and abandoned temporary files: at start,
    then every few hours. The keeper's pins protect objects whose rows are being written; the
    grace period spares temporary files of uploads still being received."""
    while True:
        try:
            report = await maintenance.sweep(db, service.blobs, object_grace_seconds=0, keeper=service.keeper)
            if report.objects_removed or report.temporary_removed:
                log.info("storage sweep removed %d object(s), %d temporary file(s)",
                         report.objects_removed, report.temporary_removed)
        except Exception:
            log.exception("storage sweep failed; will retry")
        await asyncio.sleep(SWEEP_SECONDS)
