"""Encrypted storage: records, their change feed, and backups.

The server never sees plaintext: bodies are opaque bytes that the client has encrypted. It
proves they arrived intact (SHA-256, compared in constant time), keeps them exactly once per
content, and acknowledges a write only when both the object and its row are durable.

Every upload goes: limits and quota from Content-Length (refused before the body is read;
with no Content-Length, refused at once when no quota is left, and as soon as the stream passes
what is left) → body streamed to a temporary object while hashed → checksum compared → object
stored → one short transaction (quota counted again, authoritatively) → answer.

A batch (sync in bulk) goes the same way with its bytes in memory: every item decoded and its
checksum compared (off the event loop) → limits, ids and quota checked → every object stored →
one transaction for all rows (all checked again in it) → answer. Any bad item: nothing stored.
"""

from __future__ import annotations

import asyncio
import binascii
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adiuva_server import errors, quota
from adiuva_server.config import Settings
from adiuva_server.storage.blobs import BlobStore, Staged
from adiuva_server.storage.keeper import BlobKeeper
from adiuva_server.storage.pins import SharedPins
from adiuva_server.storage.store import Backup, Record, RecordWrite, StorageStore, batch_growth

CHECKSUM = re.compile(r"^[0-9a-fA-F]{64}$")
TABLE_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$"
MAX_VERSION_LENGTH = 64
MAX_TIMESTAMP_LENGTH = 64
PURGE_BATCH = 1000  # tombstones forgotten per write transaction
INLINE_DATA_BYTES = 64 * 1024  # a change carries its record's bytes up to this size
# Bytes inlined in one page of the change feed (before base64): a page ends early rather than
# pass it, so an answer stays about as large as the largest request a batch may send.
INLINE_PAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Body:
    """An upload's bytes as they arrive, and the length the client declared (if any)."""

    length: int | None
    chunks: AsyncIterable[bytes]


class Caller(Protocol):
    """Who is asking (the request's principal): only their own data is ever touched."""

    id: str
    tier: str


def parse_checksum(value: str | None, header: str) -> str:
    if value is None or not value.strip():
        raise errors.ValidationError(
            f"the {header} header (SHA-256 of the body, hex) is required",
            extra={"errors": [{"loc": ["header", header], "msg": "field required", "type": "missing"}]},
        )
    value = value.strip()
    if not CHECKSUM.fullmatch(value):
        raise errors.ValidationError(
            f"{header} must be a SHA-256 digest in hex (64 characters)",
            extra={"errors": [{"loc": ["header", header], "msg": "not a SHA-256 hex digest", "type": "value_error"}]},
        )
    return value.lower()


class BatchItem(Protocol):
    """One record of a batch as the client sent it (`data` still base64)."""

    table: str
    data: str
    checksum: str
    id: str | None
    if_match: str | None


def _item_error(cls: type[errors.AdiuvaError], index: int, field: str | None, msg: str) -> errors.AdiuvaError:
    extra: dict = {"index": index}
    if cls is errors.ValidationError:
        loc = ["body", "records", index] + ([field] if field else [])
        extra["errors"] = [{"loc": loc, "msg": msg, "type": "value_error"}]
    return cls(f"records[{index}]{'.' + field if field else ''}: {msg}", extra=extra)


def decode_batch(items: Sequence[BatchItem], max_record_bytes: int) -> list[tuple[RecordWrite, bytes]]:
    """Blocking (run it in a thread): each item's bytes, decoded and checked against its
    checksum in constant time. The first bad item raises, naming its index."""
    seen: set[str] = set()
    decoded = []
    for i, item in enumerate(items):
        if item.if_match is not None and item.id is None:
            raise _item_error(errors.ValidationError, i, "if_match", "only a replacement (with an id) can have if_match")
        if item.id is not None:
            if item.id in seen:
                raise _item_error(errors.ValidationError, i, "id", "this record appears more than once in the batch")
            seen.add(item.id)
        try:
            data = binascii.a2b_base64(item.data, strict_mode=True)  # standard alphabet, padded
        except (binascii.Error, ValueError):
            raise _item_error(errors.ValidationError, i, "data", "not valid base64 (standard alphabet, padded)") from None
        if len(data) > max_record_bytes:
            raise _item_error(errors.PayloadTooLarge, i, "data",
                              f"{len(data)} bytes is larger than the limit of {max_record_bytes} bytes a record")
        digest = hashlib.sha256(data).hexdigest()
        if not hmac.compare_digest(digest, item.checksum.lower()):
            raise _item_error(errors.ChecksumMismatch, i, "checksum",
                              "the SHA-256 of the decoded data does not match the checksum sent; nothing was stored")
        decoded.append((RecordWrite(item.table, digest, len(data), item.id, if_match(item.if_match)), data))
    return decoded


async def _within(chunks: AsyncIterable[bytes], room: int, refuse) -> AsyncIterator[bytes]:
    """`chunks`, refused (`refuse()` raised) as soon as they pass `room` bytes in all."""
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > room:
            raise refuse()
        yield chunk


def etag_of(checksum: str) -> str:
    return f'"{checksum}"'


def if_match(header: str | None):
    """A predicate on the current checksum for an If-Match header (None: no condition).
    Strong comparison, as RFC 9110 requires for If-Match."""
    if header is None:
        return None
    if header.strip() == "*":  # only on its own: "x, *" is no wildcard (RFC 9110 13.1.1)
        return lambda current: True
    tags = {t.strip() for t in header.split(",") if t.strip()}
    return lambda current: etag_of(current) in tags


def none_match(header: str | None, checksum: str) -> bool:
    """True when If-None-Match names the current representation (answer 304). Weak comparison."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return etag_of(checksum) in tags


def _printable_ascii(value: str) -> bool:
    """Visible ASCII and spaces only: these values are echoed back in response headers, which
    are Latin-1 on the wire, so anything else would come back garbled."""
    return all(" " <= c <= "~" for c in value)


def parse_backup_headers(version: str | None, timestamp: str | None) -> tuple[str, str]:
    def bad(header: str, msg: str) -> errors.ValidationError:
        return errors.ValidationError(
            f"{header}: {msg}", extra={"errors": [{"loc": ["header", header], "msg": msg, "type": "value_error"}]}
        )

    if not version or not version.strip():
        raise bad("X-Backup-Version", "field required")
    version = version.strip()
    if len(version) > MAX_VERSION_LENGTH or not _printable_ascii(version):
        raise bad("X-Backup-Version", f"at most {MAX_VERSION_LENGTH} printable ASCII characters")
    if not timestamp or not timestamp.strip():
        raise bad("X-Backup-Timestamp", "field required")
    timestamp = timestamp.strip()
    if len(timestamp) > MAX_TIMESTAMP_LENGTH or not _printable_ascii(timestamp):
        raise bad("X-Backup-Timestamp", f"at most {MAX_TIMESTAMP_LENGTH} printable ASCII characters")
    try:
        dt.datetime.fromisoformat(timestamp)
    except ValueError:
        raise bad("X-Backup-Timestamp", "not an ISO 8601 date and time") from None
    return version, timestamp


class StorageService:
    def __init__(self, settings: Settings, store: StorageStore, blobs: BlobStore, pins: SharedPins | None = None) -> None:
        self.settings = settings
        self.store = store
        self.blobs = blobs
        self.keeper = BlobKeeper(blobs, store, pins)

    def object_path(self, checksum: str) -> Path:
        return self.blobs.local_path(checksum)

    # -- uploads ----------------------------------------------------------------------------------

    @staticmethod
    def _check_length(body: Body, max_bytes: int) -> None:
        if body.length is not None and body.length > max_bytes:
            raise errors.PayloadTooLarge(f"the body ({body.length} bytes) is larger than the limit of {max_bytes} bytes")

    async def _receive(self, body: Body, checksum: str, max_bytes: int) -> Staged:
        staged = await self.blobs.receive(body.chunks, max_bytes)
        if not hmac.compare_digest(staged.digest, checksum):
            await self.blobs.discard(staged)
            raise errors.ChecksumMismatch("the SHA-256 of the received bytes does not match the checksum sent; nothing was stored")
        return staged

    async def _precheck_quota(self, who: Caller, kind: str, body: Body, freed: int = 0) -> Body:
        """Refuse early what the transaction would refuse anyway: from Content-Length; without
        one, at once when no quota is left, else as soon as the stream passes what is left
        (plus `freed`, the bytes the write gives back). Returns the body to receive."""
        used = await self.store.usage(who.id, kind)
        if body.length is not None:
            quota.check(who.tier, kind, used, body.length - freed)
            return body
        room = quota.room(who.tier, kind, used)
        if room is None:
            return body
        room += freed
        if room <= 0:
            raise quota.exceeded(who.tier, kind, used, "none left for an upload without Content-Length")
        return Body(None, _within(body.chunks, room, lambda: quota.exceeded(who.tier, kind, used, "the body passed what is left")))

    async def _precheck_count(self, who: Caller, created: int) -> None:
        limit = self.settings.max_records_per_user
        if created and await self.store.record_count(who.id) + created > limit:
            raise errors.QuotaExceeded(f"this server keeps at most {limit} records per user", extra={"max_records": limit})

    # -- records ----------------------------------------------------------------------------------

    async def create_record(self, who: Caller, table: str, checksum: str, body: Body) -> Record:
        self._check_length(body, self.settings.max_record_bytes)
        await self._precheck_count(who, 1)
        body = await self._precheck_quota(who, "cloud", body)
        staged = await self._receive(body, checksum, self.settings.max_record_bytes)
        return await self.keeper.commit(staged, lambda: self.store.insert_record(
            who.id, who.tier, table, checksum, staged.size, self.settings.max_records_per_user))

    async def replace_record(self, who: Caller, record_id: str, checksum: str, body: Body, if_match_header: str | None) -> Record:
        self._check_length(body, self.settings.max_record_bytes)
        precondition = if_match(if_match_header)
        current = await self.record(who, record_id)
        if precondition is not None and not precondition(current.checksum):
            raise errors.PreconditionFailed("the record has changed since that ETag (If-Match)")
        body = await self._precheck_quota(who, "cloud", body, freed=current.size_bytes)
        staged = await self._receive(body, checksum, self.settings.max_record_bytes)
        record, old = await self.keeper.commit(staged, lambda: self.store.replace_record(
            who.id, who.tier, record_id, checksum, staged.size, precondition))
        if old != checksum:
            await self.keeper.release([old])
        return record

    async def write_batch(self, who: Caller, items: Sequence[BatchItem]) -> list[Record]:
        """Create and replace records all at once, or not at all (see the module docstring)."""
        decoded = await asyncio.to_thread(decode_batch, items, self.settings.max_record_bytes)
        writes = [w for w, _ in decoded]
        await self._precheck_batch(who, writes)
        records, old = await self.keeper.commit_many(
            [(w.checksum, data) for w, data in decoded],
            lambda: self.store.write_records(who.id, who.tier, writes, self.settings.max_records_per_user),
        )
        kept = {r.checksum for r in records}
        await self.keeper.release([c for c in old if c not in kept])
        return records

    async def _precheck_batch(self, who: Caller, writes: Sequence[RecordWrite]) -> None:
        """Before any object is written: the ids, preconditions, record count and quota the
        transaction checks again (authoritatively, against concurrent writes)."""
        current = await self.store.live_records(who.id, [w.record_id for w in writes if w.record_id])
        growth = batch_growth(writes, current)
        await self._precheck_count(who, sum(1 for w in writes if w.record_id is None))
        quota.check(who.tier, "cloud", await self.store.usage(who.id, "cloud"), growth)

    async def record(self, who: Caller, record_id: str) -> Record:
        record = await self.store.get_record(who.id, record_id)
        if record is None:  # missing and someone else's answer the same
            raise errors.NotFound("no such record")
        return record

    async def list_records(self, who: Caller, table: str | None, page: int, limit: int) -> tuple[list[Record], int]:
        return await self.store.list_records(who.id, table, (page - 1) * limit, limit)

    async def delete_record(self, who: Caller, record_id: str, if_match_header: str | None) -> None:
        old = await self.store.delete_record(who.id, who.tier, record_id, if_match(if_match_header))
        await self.keeper.release([old])

    async def changes(self, who: Caller, since: int, limit: int,
                      include_data: bool = False) -> tuple[list[tuple[Record, bytes | None]], int, bool]:
        """Records changed after cursor `since`, oldest change first, each with its bytes when
        `include_data` and it is live and at most INLINE_DATA_BYTES (else None); the cursor to
        ask next; whether more changes are waiting. With data, a page ends early rather than
        inline more than INLINE_PAGE_BYTES. CursorExpired when deletions after `since` were
        forgotten (tombstone retention): the device must start again from 0."""
        rows, purged = await self.store.changes(who.id, since, limit + 1)
        if 0 < since < purged:
            raise errors.CursorExpired(
                f"deletions up to cursor {purged} are older than the retention period and were forgotten; "
                "sync again from since=0 (records absent from that full feed no longer exist)"
            )
        more = len(rows) > limit
        rows = rows[:limit]
        data: list[bytes | None] = [None] * len(rows)
        if include_data:
            inline, budget = [], INLINE_PAGE_BYTES
            for n, r in enumerate(rows):
                if r.checksum is None or r.size_bytes > INLINE_DATA_BYTES:
                    continue
                if r.size_bytes > budget:
                    rows, more = rows[:n], True  # n >= 1: the first inlined record always fits
                    break
                budget -= r.size_bytes
                inline.append(n)
            # A missing object (replaced or deleted since the rows were read) stays None: the
            # client fetches it alone, and a later change of the feed says what became of it.
            for n, blob in zip(inline, await self.blobs.read_many([rows[n].checksum for n in inline])):
                data[n] = blob
        return list(zip(rows, data)), (rows[-1].seq if rows else since), more

    async def purge_tombstones(self, now: dt.datetime | None = None) -> int:
        """Forget tombstones older than the retention period (in short write transactions)."""
        retention = self.settings.tombstone_retention
        if not retention:
            return 0
        cutoff = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=retention)
        deleted_before = cutoff.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        total = 0
        while True:
            purged = await self.store.purge_tombstones(deleted_before, PURGE_BATCH)
            total += purged
            if purged < PURGE_BATCH:
                return total

    # -- backups ----------------------------------------------------------------------------------

    async def put_backup(self, who: Caller, version: str, timestamp: str, checksum: str, body: Body) -> Backup:
        self._check_length(body, self.settings.max_backup_bytes)
        retention = self.settings.backup_retention
        freed = await self.store.prunable_backup_bytes(who.id, retention)
        body = await self._precheck_quota(who, "backup", body, freed=freed)
        staged = await self._receive(body, checksum, self.settings.max_backup_bytes)
        backup, pruned = await self.keeper.commit(staged, lambda: self.store.insert_backup(
            who.id, who.tier, version, timestamp, checksum, staged.size, retention))
        await self.keeper.release(pruned)
        return backup

    async def latest_backup(self, who: Caller) -> Backup:
        backup = await self.store.latest_backup(who.id)
        if backup is None:
            raise errors.NotFound("no backup yet")
        return backup

    async def backup(self, who: Caller, backup_id: str) -> Backup:
        backup = await self.store.get_backup(who.id, backup_id)
        if backup is None:
            raise errors.NotFound("no such backup")
        return backup

    async def backups(self, who: Caller) -> list[Backup]:
        return await self.store.list_backups(who.id)

    async def delete_backup(self, who: Caller, backup_id: str) -> None:
        old = await self.store.delete_backup(who.id, who.tier, backup_id)
        await self.keeper.release([old])
