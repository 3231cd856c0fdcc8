"""Storage metadata in SQLite: records, the change feed, backups, and which objects rows
reference. Every write is one short transaction on the single writer, with the quota counted
in it; no transaction ever waits on the network (bodies are on disk before we get here)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adiuva_server import errors, quota
from adiuva_server.db import Database

# SQLite's default limit on host parameters is 32766; stay far below it.
IN_BATCH = 500


def utc_now() -> tuple[str, int]:
    now = dt.datetime.now(dt.UTC)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z"), int(now.timestamp())


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    table: str
    checksum: str | None  # None: deleted (a tombstone in the change feed)
    size_bytes: int
    seq: int
    created_at: str
    updated_at: str
    deleted_at: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> Record:
        return cls(row["id"], row["table_name"], row["checksum"], row["size_bytes"], row["seq"],
                   row["created_at"], row["updated_at"], row["deleted_at"])


@dataclass(frozen=True, slots=True)
class Backup:
    id: str
    version: str
    timestamp: str
    checksum: str
    size_bytes: int
    created_at: str
    created_unix: int
    shares_second: bool = False  # with an earlier backup of this user: its date is no validator

    @classmethod
    def from_row(cls, row: Any) -> Backup:
        return cls(row["id"], row["version"], row["backup_timestamp"], row["checksum"], row["size_bytes"],
                   row["created_at"], row["created_unix"], bool(row["shares_second"]))


@dataclass(frozen=True, slots=True)
class RecordWrite:
    """One item of a batch: a new record (`record_id` None) or the replacement of one."""

    table: str
    checksum: str
    size: int
    record_id: str | None = None
    precondition: Callable[[str], bool] | None = None


_RECORD = "id, table_name, checksum, size_bytes, seq, created_at, updated_at, deleted_at"
_BACKUP = "id, version, backup_timestamp, checksum, size_bytes, created_at, created_unix, shares_second"


async def _one(conn: Any, sql: str, params: Sequence[Any]) -> Any:
    async with conn.execute(sql, params) as cur:
        return await cur.fetchone()


async def _next_seq(conn: Any, user_id: str) -> int:
    """The next position in `user_id`'s change feed: a counter of their own, so the gaps in
    one user's cursors say nothing about other users' writes."""
    (seq,) = await _one(
        conn,
        "INSERT INTO storage_record_counts (user_id, records, last_seq) VALUES (?, 0, 1) "
        "ON CONFLICT (user_id) DO UPDATE SET last_seq = last_seq + 1 RETURNING last_seq",
        (user_id,),
    )
    return seq


def batch_growth(writes: Sequence[RecordWrite], current: dict[str, Record]) -> int:
    """The bytes `writes` add (a replacement counts its difference), given the live records
    they replace (`current`, by id): NotFound or PreconditionFailed naming the first bad item."""
    growth = 0
    for i, w in enumerate(writes):
        if w.record_id is None:
            growth += w.size
            continue
        old = current.get(w.record_id)
        if old is None:  # missing and someone else's answer the same
            raise errors.NotFound(f"records[{i}]: no such record", extra={"index": i})
        if w.precondition is not None and not w.precondition(old.checksum):
            raise errors.PreconditionFailed(f"records[{i}]: the record has changed since that ETag (if_match)",
                                            extra={"index": i})
        growth += w.size - old.size_bytes
    return growth


async def _live_records(conn: Any, user_id: str, record_ids: Sequence[str]) -> list[Record]:
    found: list[Record] = []
    for i in range(0, len(record_ids), IN_BATCH):
        batch = list(record_ids[i:i + IN_BATCH])
        rows = await conn.execute_fetchall(
            f"SELECT {_RECORD} FROM storage_records WHERE user_id = ? AND checksum IS NOT NULL "
            f"AND id IN ({','.join('?' * len(batch))})",
            (user_id, *batch),
        )
        found.extend(Record.from_row(r) for r in rows)
    return found


async def charge(conn: Any, user_id: str, tier: str, kind: str, delta: int) -> int:
    """Inside a write transaction (SQLite's single writer: the read and the write cannot be
    interleaved): check the quota for a growth of `delta` bytes of `kind` (negative to release)
    and record it. Returns the new usage. The vector store charges its payloads here too."""
    async with conn.execute("SELECT bytes FROM storage_usage WHERE user_id = ? AND kind = ?", (user_id, kind)) as cur:
        row = await cur.fetchone()
    used = row[0] if row else 0
    quota.check(tier, kind, used, delta)
    new = max(0, used + delta)
    await conn.execute(
        "INSERT INTO storage_usage (user_id, kind, bytes) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id, kind) DO UPDATE SET bytes = excluded.bytes",
        (user_id, kind, new),
    )
    return new


# What each feature charges, recomputed from its rows: records and vectors ("cloud"), desktop
# backups ("backup"). A new feature that charges usage adds its source here. The same SQL on
# both backends (sums cast: PostgreSQL's sum of bigint is numeric).
ACTUAL_USAGE_SQL = """
    SELECT user_id, kind, CAST(SUM(bytes) AS BIGINT) AS bytes FROM (
        SELECT user_id, 'cloud' AS kind, size_bytes AS bytes FROM storage_records WHERE checksum IS NOT NULL
        UNION ALL
        SELECT user_id, 'backup', size_bytes FROM storage_backups
        UNION ALL
        SELECT c.user_id, 'cloud', length(i.payload) + 4 * i.dimension
          FROM vector_items i JOIN vector_collections c ON c.id = i.collection_id
    ) charged GROUP BY user_id, kind
"""

# (user_id, kind, counted, actual) wherever storage_usage disagrees with the rows.
USAGE_DRIFT_SQL = f"""
    WITH actual(user_id, kind, bytes) AS ({ACTUAL_USAGE_SQL})
    SELECT u.user_id, u.kind, u.bytes, COALESCE(a.bytes, 0) FROM storage_usage u
      LEFT JOIN actual a ON a.user_id = u.user_id AND a.kind = u.kind
     WHERE u.bytes != COALESCE(a.bytes, 0)
    UNION ALL
    SELECT a.user_id, a.kind, 0, a.bytes FROM actual a
     WHERE a.bytes != 0 AND NOT EXISTS (
         SELECT 1 FROM storage_usage u WHERE u.user_id = a.user_id AND u.kind = a.kind)
"""


# Every object some row points at, with its size (also read from backup snapshots).
REFERENCED_OBJECTS_SQL = (
    "SELECT checksum, size_bytes FROM storage_records WHERE checksum IS NOT NULL "
    "UNION SELECT checksum, size_bytes FROM storage_backups"
)


class StorageStore(Protocol):
    """The storage metadata the service needs; SQLite is the embedded implementation. Writes
    that change a user's bytes count them against `tier`'s quota in the same transaction and
    raise QuotaExceeded, NotFound or PreconditionFailed with nothing changed."""

    async def usage(self, user_id: str, kind: str) -> int: ...
    async def record_count(self, user_id: str) -> int: ...
    async def get_record(self, user_id: str, record_id: str) -> Record | None: ...
    async def list_records(self, user_id: str, table: str | None, offset: int, limit: int) -> tuple[list[Record], int]: ...
    async def changes(self, user_id: str, since: int, limit: int) -> tuple[list[Record], int]:
        """Up to `limit` records changed after `since`, and the user's highest forgotten position."""
    async def purge_tombstones(self, deleted_before: str, batch: int) -> int:
        """Forget up to `batch` tombstones deleted before `deleted_before` (ISO 8601 UTC)."""
    async def insert_record(self, user_id: str, tier: str, table: str, checksum: str, size: int, max_records: int) -> Record: ...
    async def live_records(self, user_id: str, record_ids: Sequence[str]) -> dict[str, Record]: ...
    async def write_records(self, user_id: str, tier: str, writes: Sequence[RecordWrite],
                            max_records: int) -> tuple[list[Record], list[str]]:
        """All of `writes` in one transaction, or none (errors carry the failing item's index);
        returns the records in order and the checksums the replaced ones had."""
    async def replace_record(self, user_id: str, tier: str, record_id: str, checksum: str, size: int,
                             precondition: Callable[[str], bool] | None) -> tuple[Record, str]: ...
    async def delete_record(self, user_id: str, tier: str, record_id: str, precondition: Callable[[str], bool] | None) -> str: ...
    async def latest_backup(self, user_id: str) -> Backup | None: ...
    async def get_backup(self, user_id: str, backup_id: str) -> Backup | None: ...
    async def list_backups(self, user_id: str) -> list[Backup]: ...
    async def prunable_backup_bytes(self, user_id: str, retention: int) -> int: ...
    async def insert_backup(self, user_id: str, tier: str, version: str, timestamp: str, checksum: str, size: int,
                            retention: int) -> tuple[Backup, list[str]]: ...
    async def delete_backup(self, user_id: str, tier: str, backup_id: str) -> str: ...
    async def referenced(self, digests: Sequence[str]) -> set[str]: ...
    async def referenced_objects(self) -> list[tuple[str, int]]: ...
    async def usage_drift(self) -> list[tuple[str, str, int, int]]: ...


class SQLiteStorageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- reads ----------------------------------------------------------------------------------

    async def usage(self, user_id: str, kind: str) -> int:
        row = await self.db.fetchone("SELECT bytes FROM storage_usage WHERE user_id = ? AND kind = ?", (user_id, kind))
        return row[0] if row else 0

    async def record_count(self, user_id: str) -> int:
        row = await self.db.fetchone("SELECT records FROM storage_record_counts WHERE user_id = ?", (user_id,))
        return row[0] if row else 0

    async def get_record(self, user_id: str, record_id: str) -> Record | None:
        row = await self.db.fetchone(
            f"SELECT {_RECORD} FROM storage_records WHERE id = ? AND user_id = ? AND checksum IS NOT NULL",
            (record_id, user_id),
        )
        return None if row is None else Record.from_row(row)

    async def live_records(self, user_id: str, record_ids: Sequence[str]) -> dict[str, Record]:
        """Those of `record_ids` that are the user's live records, by id."""
        async with self.db.reader() as conn:
            return {r.id: r for r in await _live_records(conn, user_id, record_ids)}

    async def list_records(self, user_id: str, table: str | None, offset: int, limit: int) -> tuple[list[Record], int]:
        where = "user_id = ? AND checksum IS NOT NULL" + (" AND table_name = ?" if table else "")
        params: list[Any] = [user_id] + ([table] if table else [])
        async with self.db.reader() as conn:  # one snapshot for the page and the total
            await conn.execute("BEGIN")
            rows = await conn.execute_fetchall(
                f"SELECT {_RECORD} FROM storage_records WHERE {where} ORDER BY rowid LIMIT ? OFFSET ?",
                (*params, limit, offset),
            )
            (total,) = await _one(conn, f"SELECT COUNT(*) FROM storage_records WHERE {where}", params)
            await conn.rollback()
        return [Record.from_row(r) for r in rows], total

    async def changes(self, user_id: str, since: int, limit: int) -> tuple[list[Record], int]:
        async with self.db.reader() as conn:  # one snapshot: a purge cannot fall in between
            await conn.execute("BEGIN")
            rows = await conn.execute_fetchall(
                f"SELECT {_RECORD} FROM storage_records WHERE user_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (user_id, since, limit),
            )
            purged = await _one(conn, "SELECT purged_seq FROM storage_record_counts WHERE user_id = ?", (user_id,))
            await conn.rollback()
        return [Record.from_row(r) for r in rows], purged[0] if purged else 0

    async def purge_tombstones(self, deleted_before: str, batch: int) -> int:
        async with self.db.write() as conn:
            rows = await conn.execute_fetchall(
                "SELECT id, user_id, seq FROM storage_records WHERE checksum IS NULL AND deleted_at < ? "
                "ORDER BY deleted_at LIMIT ?",
                (deleted_before, batch),
            )
            highest: dict[str, int] = {}
            for _, user_id, seq in rows:
                highest[user_id] = max(seq, highest.get(user_id, 0))
            await conn.executemany(
                "UPDATE storage_record_counts SET purged_seq = max(purged_seq, ?) WHERE user_id = ?",
                [(seq, user_id) for user_id, seq in highest.items()],
            )
            await conn.executemany("DELETE FROM storage_records WHERE id = ?", [(r[0],) for r in rows])
        return len(rows)

    async def latest_backup(self, user_id: str) -> Backup | None:
        row = await self.db.fetchone(
            f"SELECT {_BACKUP} FROM storage_backups WHERE user_id = ? ORDER BY rowid DESC LIMIT 1", (user_id,)
        )
        return None if row is None else Backup.from_row(row)

    async def get_backup(self, user_id: str, backup_id: str) -> Backup | None:
        row = await self.db.fetchone(
            f"SELECT {_BACKUP} FROM storage_backups WHERE id = ? AND user_id = ?", (backup_id, user_id)
        )
        return None if row is None else Backup.from_row(row)

    async def list_backups(self, user_id: str) -> list[Backup]:
        rows = await self.db.fetchall(
            f"SELECT {_BACKUP} FROM storage_backups WHERE user_id = ? ORDER BY rowid DESC", (user_id,)
        )
        return [Backup.from_row(r) for r in rows]

    async def prunable_backup_bytes(self, user_id: str, retention: int) -> int:
        """Bytes that the next backup would free: all but the newest `retention - 1`."""
        row = await self.db.fetchone(
            "SELECT COALESCE(SUM(size_bytes), 0) FROM (SELECT size_bytes FROM storage_backups "
            "WHERE user_id = ? ORDER BY rowid DESC LIMIT -1 OFFSET ?)",
            (user_id, retention - 1),
        )
        return row[0]

    async def referenced(self, digests: Sequence[str]) -> set[str]:
        """Which of `digests` some record or backup points at (in one snapshot)."""
        found: set[str] = set()
        async with self.db.reader() as conn:
            await conn.execute("BEGIN")
            for i in range(0, len(digests), IN_BATCH):
                batch = list(digests[i:i + IN_BATCH])
                marks = ",".join("?" * len(batch))
                rows = await conn.execute_fetchall(
                    f"SELECT checksum FROM storage_records WHERE checksum IN ({marks}) "
                    f"UNION SELECT checksum FROM storage_backups WHERE checksum IN ({marks})",
                    (*batch, *batch),
                )
                found.update(r[0] for r in rows)
            await conn.rollback()
        return found

    async def referenced_objects(self) -> list[tuple[str, int]]:
        """Every referenced object with its size, for the consistency check."""
        rows = await self.db.fetchall(REFERENCED_OBJECTS_SQL)
        return [(r[0], r[1]) for r in rows]

    async def usage_drift(self) -> list[tuple[str, str, int, int]]:
        """(user_id, kind, counted, actual) wherever the usage counters disagree with the rows."""
        return [(r[0], r[1], r[2], r[3]) for r in await self.db.fetchall(USAGE_DRIFT_SQL)]

    # -- record writes --------------------------------------------------------------------------

    async def insert_record(self, user_id: str, tier: str, table: str, checksum: str, size: int, max_records: int) -> Record:
        now, _ = utc_now()
        record_id = str(uuid.uuid4())
        async with self.db.write() as conn:
            row = await _one(conn, "SELECT records FROM storage_record_counts WHERE user_id = ?", (user_id,))
            count = row[0] if row else 0
            if count >= max_records:
                raise errors.QuotaExceeded(
                    f"this server keeps at most {max_records} records per user",
                    extra={"max_records": max_records},
                )
            await charge(conn, user_id, tier, "cloud", size)
            seq = await _next_seq(conn, user_id)
            await conn.execute(
                "INSERT INTO storage_records (id, user_id, table_name, checksum, size_bytes, seq, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (record_id, user_id, table, checksum, size, seq, now, now),
            )
            await conn.execute(
                "INSERT INTO storage_record_counts (user_id, records) VALUES (?, 1) "
                "ON CONFLICT (user_id) DO UPDATE SET records = records + 1",
                (user_id,),
            )
        return Record(record_id, table, checksum, size, seq, now, now)

    async def write_records(self, user_id: str, tier: str, writes: Sequence[RecordWrite],
                            max_records: int) -> tuple[list[Record], list[str]]:
        now, _ = utc_now()
        async with self.db.write() as conn:
            current = {r.id: r for r in await _live_records(conn, user_id, [w.record_id for w in writes if w.record_id])}
            growth = batch_growth(writes, current)
            created = sum(1 for w in writes if w.record_id is None)
            row = await _one(conn, "SELECT records FROM storage_record_counts WHERE user_id = ?", (user_id,))
            if created and (row[0] if row else 0) + created > max_records:
                raise errors.QuotaExceeded(
                    f"this server keeps at most {max_records} records per user; the batch would create {created} more",
                    extra={"max_records": max_records},
                )
            await charge(conn, user_id, tier, "cloud", growth)
            # A block of feed positions, one per item in request order.
            (last,) = await _one(
                conn,
                "INSERT INTO storage_record_counts (user_id, records, last_seq) VALUES (?, ?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET records = records + excluded.records, "
                "last_seq = last_seq + excluded.last_seq RETURNING last_seq",
                (user_id, created, len(writes)),
            )
            first = last - len(writes) + 1
            records: list[Record] = []
            inserts, updates = [], []
            for i, w in enumerate(writes):
                seq = first + i
                if w.record_id is None:
                    rid = str(uuid.uuid4())
                    inserts.append((rid, user_id, w.table, w.checksum, w.size, seq, now, now))
                    records.append(Record(rid, w.table, w.checksum, w.size, seq, now, now))
                else:
                    old = current[w.record_id]
                    updates.append((w.checksum, w.size, seq, now, w.record_id))
                    records.append(Record(old.id, old.table, w.checksum, w.size, seq, old.created_at, now))
            await conn.executemany(
                "INSERT INTO storage_records (id, user_id, table_name, checksum, size_bytes, seq, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", inserts)
            await conn.executemany(
                "UPDATE storage_records SET checksum = ?, size_bytes = ?, seq = ?, updated_at = ? WHERE id = ?", updates)
        return records, [r.checksum for r in current.values() if r.checksum]

    async def _live_record(self, conn: Any, user_id: str, record_id: str, precondition: Callable[[str], bool] | None) -> Any:
        row = await _one(
            conn,
            f"SELECT {_RECORD} FROM storage_records WHERE id = ? AND user_id = ? AND checksum IS NOT NULL",
            (record_id, user_id),
        )
        if row is None:
            raise errors.NotFound("no such record")
        if precondition is not None and not precondition(row["checksum"]):
            raise errors.PreconditionFailed("the record has changed since that ETag (If-Match)")
        return row

    async def replace_record(
        self, user_id: str, tier: str, record_id: str, checksum: str, size: int,
        precondition: Callable[[str], bool] | None,
    ) -> tuple[Record, str]:
        """Returns the new record and the checksum it had before."""
        now, _ = utc_now()
        async with self.db.write() as conn:
            old = await self._live_record(conn, user_id, record_id, precondition)
            await charge(conn, user_id, tier, "cloud", size - old["size_bytes"])
            seq = await _next_seq(conn, user_id)
            await conn.execute(
                "UPDATE storage_records SET checksum = ?, size_bytes = ?, seq = ?, updated_at = ? WHERE id = ?",
                (checksum, size, seq, now, record_id),
            )
        return Record(record_id, old["table_name"], checksum, size, seq, old["created_at"], now), old["checksum"]

    async def delete_record(self, user_id: str, tier: str, record_id: str, precondition: Callable[[str], bool] | None) -> str:
        """Turn the record into a tombstone; returns the checksum it had."""
        now, _ = utc_now()
        async with self.db.write() as conn:
            old = await self._live_record(conn, user_id, record_id, precondition)
            await charge(conn, user_id, tier, "cloud", -old["size_bytes"])
            seq = await _next_seq(conn, user_id)
            await conn.execute(
                "UPDATE storage_records SET checksum = NULL, size_bytes = 0, seq = ?, updated_at = ?, deleted_at = ? "
                "WHERE id = ?",
                (seq, now, now, record_id),
            )
            await conn.execute(
                "UPDATE storage_record_counts SET records = records - 1 WHERE user_id = ?", (user_id,)
            )
        return old["checksum"]

    # -- backup writes --------------------------------------------------------------------------

    async def insert_backup(
        self, user_id: str, tier: str, version: str, timestamp: str, checksum: str, size: int, retention: int,
    ) -> tuple[Backup, list[str]]:
        """Insert a backup and drop the oldest beyond `retention`, counting the quota for the
        net change. Returns the backup and the checksums of the dropped ones."""
        now, unix = utc_now()
        backup_id = str(uuid.uuid4())
        async with self.db.write() as conn:
            # Last-Modified (whole seconds, never later than now) cannot tell this backup from
            # one of the user's that arrived in the same second: mark it, so its date is not
            # used as a validator (read before pruning, which may drop the other one).
            (previous,) = await _one(
                conn, "SELECT MAX(created_unix) FROM storage_backups WHERE user_id = ?", (user_id,)
            )
            shares_second = previous is not None and previous >= unix
            if shares_second:  # the earlier one cannot be told from this one by date either
                await conn.execute("UPDATE storage_backups SET shares_second = 1 WHERE user_id = ? AND created_unix >= ?",
                                   (user_id, unix))
            pruned = await conn.execute_fetchall(
                "SELECT id, checksum, size_bytes FROM storage_backups WHERE user_id = ? "
                "ORDER BY rowid DESC LIMIT -1 OFFSET ?",
                (user_id, retention - 1),
            )
            freed = sum(r["size_bytes"] for r in pruned)
            await charge(conn, user_id, tier, "backup", size - freed)
            await conn.executemany("DELETE FROM storage_backups WHERE id = ?", [(r["id"],) for r in pruned])
            await conn.execute(
                f"INSERT INTO storage_backups ({_BACKUP}, user_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (backup_id, version, timestamp, checksum, size, now, unix, int(shares_second), user_id),
            )
        backup = Backup(backup_id, version, timestamp, checksum, size, now, unix, shares_second)
        return backup, [r["checksum"] for r in pruned]

    async def delete_backup(self, user_id: str, tier: str, backup_id: str) -> str:
        async with self.db.write() as conn:
            row = await _one(
                conn, "SELECT checksum, size_bytes FROM storage_backups WHERE id = ? AND user_id = ?", (backup_id, user_id)
            )
            if row is None:
                raise errors.NotFound("no such backup")
            await charge(conn, user_id, tier, "backup", -row["size_bytes"])
            await conn.execute("DELETE FROM storage_backups WHERE id = ?", (backup_id,))
        return row["checksum"]
