"""Storage metadata on PostgreSQL (migration postgres/0002), for many server processes at once.

The same contract as `SQLiteStorageStore` (storage/store.py), kept under READ COMMITTED by
row locks instead of SQLite's one writer. Every method is one transaction (`PgDatabase.transaction`)
that awaits nothing but the database:

- record writes (insert, batch, replace, delete) first upsert the user's
  `storage_record_counts` row, which draws their feed positions and counts their new records in
  the same statement and keeps the row locked until commit. So a user's record writes run one
  at a time on all nodes: the record cap is checked on the count that statement returns, feed
  positions are unique and grow in commit order (a reader at cursor s never later finds a
  commit below s), and a replaced or deleted record, locked `FOR UPDATE` next, cannot change
  between its If-Match check and the write.
- the quota: one atomic upsert adds the bytes to the user's `storage_usage` row and returns the
  total, checked before commit (over the quota: raise, all rolls back). Backup writes lock that
  row (kind 'backup') first, since pruning reads the user's backups before it charges.
- reads that need one snapshot (a page and its total, the feed and its purged position) are
  one statement each, which READ COMMITTED runs on one snapshot.
Locks are always taken in the order counter row, record rows, usage row (backups: usage row,
backup rows), so writers of one user queue rather than deadlock.

Built by the composition root (`compose.postgres_stores`): `PostgresStorageStore(pg)` on the shared pool
in place of `SQLiteStorageStore(db)` when `settings.backend == "postgresql"`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

from adiuva_server import errors, quota
from adiuva_server.db.postgres import PgDatabase
from adiuva_server.storage.store import USAGE_DRIFT_SQL, Backup, Record, RecordWrite, batch_growth, utc_now

_RECORD = "id, table_name, checksum, size_bytes, seq, created_at, updated_at, deleted_at"
_BACKUP = "id, version, backup_timestamp, checksum, size_bytes, created_at, created_unix, shares_second"
_LIVE = "user_id = $1 AND checksum IS NOT NULL"


async def _draw(conn: Any, user_id: str, positions: int, created: int) -> tuple[int, int]:
    """Lock the user's counter row (until commit), take `positions` feed positions and count
    `created` new records: (live records now, the last position taken)."""
    row = await conn.fetchrow(
        "INSERT INTO storage_record_counts (user_id, records, last_seq) VALUES ($1, $2, $3) "
        "ON CONFLICT (user_id) DO UPDATE SET records = storage_record_counts.records + excluded.records, "
        "last_seq = storage_record_counts.last_seq + excluded.last_seq RETURNING records, last_seq",
        user_id, created, positions,
    )
    return row[0], row[1]


async def charge(conn: Any, user_id: str, tier: str, kind: str, delta: int) -> None:
    """Inside a write transaction: add `delta` bytes of `kind` (negative to release) and refuse
    growth past the tier's quota. One atomic upsert, so two writers cannot both pass the check
    on the same old total; raising rolls the whole transaction back."""
    if delta == 0:
        return
    used = await conn.fetchval(
        "INSERT INTO storage_usage (user_id, kind, bytes) VALUES ($1, $2, greatest($3::bigint, 0)) "
        "ON CONFLICT (user_id, kind) DO UPDATE SET bytes = greatest(storage_usage.bytes + $3::bigint, 0) "
        "RETURNING bytes",
        user_id, kind, delta,
    )
    if delta > 0:
        quota.check(tier, kind, used - delta, delta)


async def _lock_usage(conn: Any, user_id: str, kind: str) -> None:
    """Lock the user's usage row of `kind` until commit (made if missing)."""
    await conn.execute(
        "INSERT INTO storage_usage (user_id, kind, bytes) VALUES ($1, $2, 0) "
        "ON CONFLICT (user_id, kind) DO UPDATE SET bytes = storage_usage.bytes",
        user_id, kind,
    )


async def _locked_record(conn: Any, user_id: str, record_id: str, precondition: Callable[[str], bool] | None) -> Any:
    row = await conn.fetchrow(
        f"SELECT {_RECORD} FROM storage_records WHERE id = $2 AND {_LIVE} FOR UPDATE", user_id, record_id
    )
    if row is None:
        raise errors.NotFound("no such record")
    if precondition is not None and not precondition(row["checksum"]):
        raise errors.PreconditionFailed("the record has changed since that ETag (If-Match)")
    return row


class PostgresStorageStore:
    def __init__(self, db: PgDatabase) -> None:
        self.db = db

    # -- reads ----------------------------------------------------------------------------------

    async def usage(self, user_id: str, kind: str) -> int:
        used = await self.db.fetchval("SELECT bytes FROM storage_usage WHERE user_id = $1 AND kind = $2", user_id, kind)
        return used or 0

    async def record_count(self, user_id: str) -> int:
        count = await self.db.fetchval("SELECT records FROM storage_record_counts WHERE user_id = $1", user_id)
        return count or 0

    async def get_record(self, user_id: str, record_id: str) -> Record | None:
        row = await self.db.fetchrow(f"SELECT {_RECORD} FROM storage_records WHERE id = $2 AND {_LIVE}",
                                     user_id, record_id)
        return None if row is None else Record.from_row(row)

    async def live_records(self, user_id: str, record_ids: Sequence[str]) -> dict[str, Record]:
        """Those of `record_ids` that are the user's live records, by id."""
        rows = await self.db.fetch(f"SELECT {_RECORD} FROM storage_records WHERE {_LIVE} AND id = ANY($2::text[])",
                                   user_id, list(record_ids))
        return {r["id"]: Record.from_row(r) for r in rows}

    async def list_records(self, user_id: str, table: str | None, offset: int, limit: int) -> tuple[list[Record], int]:
        where = _LIVE + (" AND table_name = $4" if table else "")
        args: list[Any] = [user_id, limit, offset] + ([table] if table else [])
        rows = await self.db.fetch(  # one statement: the page and the total from one snapshot
            f"SELECT t.total, p.* FROM (SELECT count(*) AS total FROM storage_records WHERE {where}) t "
            f"LEFT JOIN LATERAL (SELECT {_RECORD} FROM storage_records WHERE {where} "
            f"ORDER BY n LIMIT $2 OFFSET $3) p ON true",
            *args,
        )
        return [Record.from_row(r) for r in rows if r["id"] is not None], rows[0]["total"]

    async def changes(self, user_id: str, since: int, limit: int) -> tuple[list[Record], int]:
        rows = await self.db.fetch(  # one statement: a purge cannot fall in between
            "SELECT c.purged, f.* FROM (SELECT coalesce((SELECT purged_seq FROM storage_record_counts "
            "WHERE user_id = $1), 0) AS purged) c "
            f"LEFT JOIN LATERAL (SELECT {_RECORD} FROM storage_records WHERE user_id = $1 AND seq > $2 "
            "ORDER BY seq LIMIT $3) f ON true",
            user_id, since, limit,
        )
        return [Record.from_row(r) for r in rows if r["id"] is not None], rows[0]["purged"]

    async def purge_tombstones(self, deleted_before: str, batch: int) -> int:
        # One statement; SKIP LOCKED: two purges at once forget different tombstones. It locks
        # tombstones before counter rows, but no writer ever waits on a committed tombstone.
        return await self.db.fetchval(
            "WITH gone AS (DELETE FROM storage_records WHERE id IN ("
            "  SELECT id FROM storage_records WHERE checksum IS NULL AND deleted_at < $1"
            "  ORDER BY deleted_at LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING user_id, seq), "
            "highest AS (SELECT user_id, max(seq) AS seq FROM gone GROUP BY user_id), "
            "moved AS (UPDATE storage_record_counts c SET purged_seq = greatest(c.purged_seq, h.seq) "
            "  FROM highest h WHERE c.user_id = h.user_id) "
            "SELECT count(*) FROM gone",
            deleted_before, batch,
        )

    async def latest_backup(self, user_id: str) -> Backup | None:
        row = await self.db.fetchrow(
            f"SELECT {_BACKUP} FROM storage_backups WHERE user_id = $1 ORDER BY n DESC LIMIT 1", user_id
        )
        return None if row is None else Backup.from_row(row)

    async def get_backup(self, user_id: str, backup_id: str) -> Backup | None:
        row = await self.db.fetchrow(
            f"SELECT {_BACKUP} FROM storage_backups WHERE id = $1 AND user_id = $2", backup_id, user_id
        )
        return None if row is None else Backup.from_row(row)

    async def list_backups(self, user_id: str) -> list[Backup]:
        rows = await self.db.fetch(f"SELECT {_BACKUP} FROM storage_backups WHERE user_id = $1 ORDER BY n DESC", user_id)
        return [Backup.from_row(r) for r in rows]

    async def prunable_backup_bytes(self, user_id: str, retention: int) -> int:
        """Bytes that the next backup would free: all but the newest `retention - 1`."""
        return await self.db.fetchval(
            "SELECT coalesce(sum(size_bytes), 0)::bigint FROM (SELECT size_bytes FROM storage_backups "
            "WHERE user_id = $1 ORDER BY n DESC OFFSET $2) old",
            user_id, max(0, retention - 1),
        )

    async def referenced(self, digests: Sequence[str]) -> set[str]:
        """Which of `digests` some record or backup points at (one statement: one snapshot)."""
        rows = await self.db.fetch(
            "SELECT checksum FROM storage_records WHERE checksum = ANY($1::text[]) "
            "UNION SELECT checksum FROM storage_backups WHERE checksum = ANY($1::text[])",
            list(digests),
        )
        return {r[0] for r in rows}

    async def referenced_objects(self) -> list[tuple[str, int]]:
        """Every referenced object with its size, for the consistency check."""
        rows = await self.db.fetch(
            "SELECT checksum, size_bytes FROM storage_records WHERE checksum IS NOT NULL "
            "UNION SELECT checksum, size_bytes FROM storage_backups"
        )
        return [(r[0], r[1]) for r in rows]

    async def usage_drift(self) -> list[tuple[str, str, int, int]]:
        """(user_id, kind, counted, actual) wherever the usage counters disagree with the rows."""
        return [(r[0], r[1], r[2], r[3]) for r in await self.db.fetch(USAGE_DRIFT_SQL)]

    # -- record writes --------------------------------------------------------------------------

    async def insert_record(self, user_id: str, tier: str, table: str, checksum: str, size: int, max_records: int) -> Record:
        now, _ = utc_now()
        record_id = str(uuid.uuid4())

        async def write(conn: Any) -> int:
            records, seq = await _draw(conn, user_id, 1, 1)
            if records > max_records:
                raise errors.QuotaExceeded(
                    f"this server keeps at most {max_records} records per user",
                    extra={"max_records": max_records},
                )
            await charge(conn, user_id, tier, "cloud", size)
            await conn.execute(
                "INSERT INTO storage_records (id, user_id, table_name, checksum, size_bytes, seq, created_at, updated_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                record_id, user_id, table, checksum, size, seq, now,
            )
            return seq

        seq = await self.db.transaction(write)
        return Record(record_id, table, checksum, size, seq, now, now)

    async def write_records(self, user_id: str, tier: str, writes: Sequence[RecordWrite],
                            max_records: int) -> tuple[list[Record], list[str]]:
        now, _ = utc_now()
        created = sum(1 for w in writes if w.record_id is None)
        new_ids = [str(uuid.uuid4()) for _ in writes]

        async def write(conn: Any) -> tuple[list[Record], list[str]]:
            # A block of feed positions, one per item in request order.
            records_now, last = await _draw(conn, user_id, len(writes), created)
            replaced = [w.record_id for w in writes if w.record_id]
            rows = await conn.fetch(
                f"SELECT {_RECORD} FROM storage_records WHERE {_LIVE} AND id = ANY($2::text[]) FOR UPDATE",
                user_id, replaced,
            ) if replaced else []
            current = {r["id"]: Record.from_row(r) for r in rows}
            growth = batch_growth(writes, current)
            if created and records_now > max_records:
                raise errors.QuotaExceeded(
                    f"this server keeps at most {max_records} records per user; the batch would create {created} more",
                    extra={"max_records": max_records},
                )
            await charge(conn, user_id, tier, "cloud", growth)
            first = last - len(writes) + 1
            out: list[Record] = []
            inserts, updates = [], []
            for i, w in enumerate(writes):
                seq = first + i
                if w.record_id is None:
                    inserts.append((new_ids[i], user_id, w.table, w.checksum, w.size, seq, now))
                    out.append(Record(new_ids[i], w.table, w.checksum, w.size, seq, now, now))
                else:
                    old = current[w.record_id]
                    updates.append((w.checksum, w.size, seq, now, w.record_id))
                    out.append(Record(old.id, old.table, w.checksum, w.size, seq, old.created_at, now))
            if inserts:
                await conn.executemany(
                    "INSERT INTO storage_records (id, user_id, table_name, checksum, size_bytes, seq, created_at, "
                    "updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7)", inserts)
            if updates:
                await conn.executemany(
                    "UPDATE storage_records SET checksum = $1, size_bytes = $2, seq = $3, updated_at = $4 WHERE id = $5",
                    updates)
            return out, [r.checksum for r in current.values() if r.checksum]

        return await self.db.transaction(write)

    async def replace_record(
        self, user_id: str, tier: str, record_id: str, checksum: str, size: int,
        precondition: Callable[[str], bool] | None,
    ) -> tuple[Record, str]:
        """Returns the new record and the checksum it had before."""
        now, _ = utc_now()

        async def write(conn: Any) -> tuple[Record, str]:
            _, seq = await _draw(conn, user_id, 1, 0)
            old = await _locked_record(conn, user_id, record_id, precondition)
            await charge(conn, user_id, tier, "cloud", size - old["size_bytes"])
            await conn.execute(
                "UPDATE storage_records SET checksum = $1, size_bytes = $2, seq = $3, updated_at = $4 WHERE id = $5",
                checksum, size, seq, now, record_id,
            )
            return Record(record_id, old["table_name"], checksum, size, seq, old["created_at"], now), old["checksum"]

        return await self.db.transaction(write)

    async def delete_record(self, user_id: str, tier: str, record_id: str, precondition: Callable[[str], bool] | None) -> str:
        """Turn the record into a tombstone; returns the checksum it had."""
        now, _ = utc_now()

        async def write(conn: Any) -> str:
            _, seq = await _draw(conn, user_id, 1, 0)
            old = await _locked_record(conn, user_id, record_id, precondition)
            await charge(conn, user_id, tier, "cloud", -old["size_bytes"])
            await conn.execute(
                "UPDATE storage_records SET checksum = NULL, size_bytes = 0, seq = $1, updated_at = $2, deleted_at = $2 "
                "WHERE id = $3",
                seq, now, record_id,
            )
            await conn.execute("UPDATE storage_record_counts SET records = records - 1 WHERE user_id = $1", user_id)
            return old["checksum"]

        return await self.db.transaction(write)

    # -- backup writes --------------------------------------------------------------------------

    async def insert_backup(
        self, user_id: str, tier: str, version: str, timestamp: str, checksum: str, size: int, retention: int,
    ) -> tuple[Backup, list[str]]:
        """Insert a backup and drop the oldest beyond `retention`, counting the quota for the
        net change. Returns the backup and the checksums of the dropped ones."""
        backup_id = str(uuid.uuid4())

        async def write(conn: Any) -> tuple[Backup, list[str]]:
            await _lock_usage(conn, user_id, "backup")  # the user's backups, one writer at a time
            now, unix = utc_now()  # read under the lock: a later writer never has an earlier second
            # Last-Modified (whole seconds, never later than now) cannot tell this backup from
            # one of the user's that arrived in the same second: mark it, so its date is not
            # used as a validator (read before pruning, which may drop the other one).
            previous = await conn.fetchval("SELECT max(created_unix) FROM storage_backups WHERE user_id = $1", user_id)
            shares_second = previous is not None and previous >= unix
            if shares_second:  # the earlier one cannot be told from this one by date either
                await conn.execute("UPDATE storage_backups SET shares_second = true WHERE user_id = $1 AND created_unix >= $2",
                                   user_id, unix)
            pruned = await conn.fetch(
                "SELECT id, checksum, size_bytes FROM storage_backups WHERE user_id = $1 ORDER BY n DESC OFFSET $2",
                user_id, max(0, retention - 1),
            )
            await charge(conn, user_id, tier, "backup", size - sum(r["size_bytes"] for r in pruned))
            if pruned:
                await conn.execute("DELETE FROM storage_backups WHERE id = ANY($1::text[])", [r["id"] for r in pruned])
            await conn.execute(
                f"INSERT INTO storage_backups ({_BACKUP}, user_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                backup_id, version, timestamp, checksum, size, now, unix, shares_second, user_id,
            )
            return Backup(backup_id, version, timestamp, checksum, size, now, unix, shares_second), \
                [r["checksum"] for r in pruned]

        return await self.db.transaction(write)

    async def delete_backup(self, user_id: str, tier: str, backup_id: str) -> str:
        async def write(conn: Any) -> str:
            await _lock_usage(conn, user_id, "backup")
            row = await conn.fetchrow(
                "DELETE FROM storage_backups WHERE id = $1 AND user_id = $2 RETURNING checksum, size_bytes",
                backup_id, user_id,
            )
            if row is None:
                raise errors.NotFound("no such backup")
            await charge(conn, user_id, tier, "backup", -row["size_bytes"])
            return row["checksum"]

        return await self.db.transaction(write)
