"""What the admin reads across features (users with their usage, the server's counts and
totals, the database's size) and what a user's deletion must collect first and scrub after.
Account writes stay in auth/store.py. `AdminStore` is the interface; `SQLiteAdminStore` the
embedded implementation, `PostgresAdminStore` (admin/postgres.py) the shared one."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adiuva_server.auth.store import User
from adiuva_server.db import Database
from adiuva_server.vectors import snapshots


@dataclass(frozen=True, slots=True)
class Usage:
    records: int
    storage_bytes: int  # records and vectors ("cloud")
    backup_bytes: int
    vectors: int


@dataclass(frozen=True, slots=True)
class UserWithUsage:
    user: User
    usage: Usage


@dataclass(frozen=True, slots=True)
class Counts:
    users: int
    records: int
    vectors: int
    storage_bytes: int
    backup_bytes: int


@dataclass(frozen=True, slots=True)
class Totals:
    """What /metrics exports of the stored data (one snapshot)."""
    users: int
    records: int
    record_bytes: int
    backups: int
    backup_bytes: int
    vectors: int


class AdminStore(Protocol):
    async def users(self, q: str | None, offset: int, limit: int) -> tuple[list[UserWithUsage], int]: ...
    async def user(self, user_id: str) -> UserWithUsage | None: ...
    async def counts(self) -> Counts: ...
    async def totals(self) -> Totals: ...
    async def database_bytes(self) -> int: ...
    async def user_objects(self, conn: Any, user_id: str) -> list[str]:
        """Passed as `inside=` to the account store's delete: runs inside the deleting transaction
        (on that backend's connection) and returns every object the user's rows point at."""
        ...
    async def scrub_deleted(self, user_id: str) -> bool:
        """After a user's deletion: remove what the backend keeps of the deleted rows beyond the
        rows themselves. False when some of it could not be removed yet."""
        ...


# Both backends: one statement, one snapshot.
TOTALS_SQL = """
SELECT (SELECT count(*) FROM users),
       (SELECT count(*) FROM storage_records WHERE checksum IS NOT NULL),
       (SELECT CAST(coalesce(sum(size_bytes), 0) AS BIGINT) FROM storage_records WHERE checksum IS NOT NULL),
       (SELECT count(*) FROM storage_backups),
       (SELECT CAST(coalesce(sum(size_bytes), 0) AS BIGINT) FROM storage_backups),
       (SELECT CAST(coalesce(sum(count), 0) AS BIGINT) FROM vector_collections)
"""

COUNTS_SQL = """
SELECT (SELECT count(*) FROM users),
       (SELECT CAST(COALESCE(SUM(records), 0) AS BIGINT) FROM storage_record_counts),
       (SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM vector_collections),
       (SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM storage_usage WHERE kind = 'cloud'),
       (SELECT CAST(COALESCE(SUM(bytes), 0) AS BIGINT) FROM storage_usage WHERE kind = 'backup')
"""


def read_totals(conn: Any) -> tuple[int, ...]:
    """On a plain sqlite3 connection, in a worker thread (the scrape never waits on the loop)."""
    return tuple(conn.execute(TOTALS_SQL).fetchone())


_WITH_USAGE = """
    SELECT u.id, u.email, u.tier, u.is_admin, u.disabled, u.session_version, u.created_at, '' AS password_hash,
           COALESCE((SELECT records FROM storage_record_counts c WHERE c.user_id = u.id), 0) AS records,
           COALESCE((SELECT bytes FROM storage_usage s WHERE s.user_id = u.id AND s.kind = 'cloud'), 0) AS cloud,
           COALESCE((SELECT bytes FROM storage_usage s WHERE s.user_id = u.id AND s.kind = 'backup'), 0) AS backup,
           CAST(COALESCE((SELECT SUM(count) FROM vector_collections v WHERE v.user_id = u.id), 0) AS BIGINT) AS vectors
      FROM users u
"""


def _with_usage(row: Any) -> UserWithUsage:
    return UserWithUsage(User.from_row(row), Usage(row["records"], row["cloud"], row["backup"], row["vectors"]))


def _like(q: str) -> str:
    """A LIKE pattern matching `q` literally anywhere (ESCAPE '\\')."""
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class SQLiteAdminStore:
    """`snapshot_dir`: the vector store's snapshot files (vectors/snapshots.py), which hold a
    deleted user's vectors until scrubbed."""

    def __init__(self, db: Database, snapshot_dir: Path | None = None) -> None:
        self.db = db
        self.snapshot_dir = snapshot_dir

    async def users(self, q: str | None, offset: int, limit: int) -> tuple[list[UserWithUsage], int]:
        where, params = ("WHERE u.email LIKE ? ESCAPE '\\'", [_like(q.lower())]) if q else ("", [])
        async with self.db.reader() as conn:  # one snapshot for the page and the total
            await conn.execute("BEGIN")
            rows = await conn.execute_fetchall(
                f"{_WITH_USAGE} {where} ORDER BY u.created_at, u.email LIMIT ? OFFSET ?", (*params, limit, offset)
            )
            async with conn.execute(f"SELECT count(*) FROM users u {where}", params) as cur:
                (total,) = await cur.fetchone()
            await conn.rollback()
        return [_with_usage(r) for r in rows], total

    async def user(self, user_id: str) -> UserWithUsage | None:
        row = await self.db.fetchone(f"{_WITH_USAGE} WHERE u.id = ?", (user_id,))
        return None if row is None else _with_usage(row)

    async def counts(self) -> Counts:
        return Counts(*await self.db.fetchone(COUNTS_SQL))

    async def totals(self) -> Totals:
        return Totals(*await self.db.run_read(read_totals))

    async def database_bytes(self) -> int:
        """The SQLite file and its WAL."""
        def size() -> int:
            total = 0
            for path in (self.db.path, Path(f"{self.db.path}-wal")):
                try:
                    total += path.stat().st_size
                except FileNotFoundError:
                    pass
            return total

        return await asyncio.to_thread(size)

    async def user_objects(self, conn: Any, user_id: str) -> list[str]:
        async with conn.execute(
            "SELECT checksum FROM storage_records WHERE user_id = ? AND checksum IS NOT NULL "
            "UNION SELECT checksum FROM storage_backups WHERE user_id = ?",
            (user_id, user_id),
        ) as cur:
            return [r[0] for r in await cur.fetchall()]

    async def scrub_deleted(self, user_id: str) -> bool:
        """The vector snapshot files of the user, then the page images the WAL still holds
        (checkpointed and truncated; secure_delete already zeroed the pages in the file)."""
        if self.snapshot_dir is not None:
            await asyncio.to_thread(snapshots.delete_user, self.snapshot_dir, user_id)
        return await self.db.checkpoint_truncate()
