"""What the admin reads across features (users with their usage, the server's counts) and what
a user's deletion must collect first. Account writes stay in auth/store.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adiuva_server.auth.store import User
from adiuva_server.db import Database


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


_WITH_USAGE = """
    SELECT u.id, u.email, u.tier, u.is_admin, u.disabled, u.session_version, u.created_at, '' AS password_hash,
           COALESCE((SELECT records FROM storage_record_counts c WHERE c.user_id = u.id), 0) AS records,
           COALESCE((SELECT bytes FROM storage_usage s WHERE s.user_id = u.id AND s.kind = 'cloud'), 0) AS cloud,
           COALESCE((SELECT bytes FROM storage_usage s WHERE s.user_id = u.id AND s.kind = 'backup'), 0) AS backup,
           COALESCE((SELECT SUM(count) FROM vector_collections v WHERE v.user_id = u.id), 0) AS vectors
      FROM users u
"""


def _with_usage(row: Any) -> UserWithUsage:
    return UserWithUsage(User.from_row(row), Usage(row["records"], row["cloud"], row["backup"], row["vectors"]))


def _like(q: str) -> str:
    """A LIKE pattern matching `q` literally anywhere (ESCAPE '\\')."""
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class SQLiteAdminStore:
    def __init__(self, db: Database) -> None:
        self.db = db

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
        row = await self.db.fetchone(
            "SELECT (SELECT count(*) FROM users), "
            "(SELECT COALESCE(SUM(records), 0) FROM storage_record_counts), "
            "(SELECT COALESCE(SUM(count), 0) FROM vector_collections), "
            "(SELECT COALESCE(SUM(bytes), 0) FROM storage_usage WHERE kind = 'cloud'), "
            "(SELECT COALESCE(SUM(bytes), 0) FROM storage_usage WHERE kind = 'backup')"
        )
        return Counts(*row)


async def user_objects(conn: Any, user_id: str) -> list[str]:
    """Inside the deleting transaction: every object the user's records and backups point at."""
    async with conn.execute(
        "SELECT checksum FROM storage_records WHERE user_id = ? AND checksum IS NOT NULL "
        "UNION SELECT checksum FROM storage_backups WHERE user_id = ?",
        (user_id, user_id),
    ) as cur:
        return [r[0] for r in await cur.fetchall()]
