"""The admin's reads across features on PostgreSQL (DATABASE_URL): the same contract as
`SQLiteAdminStore` (admin/store.py), on the same tables and, where the dialects agree, the same SQL."""

from __future__ import annotations

from typing import Any

from adiuva_server.admin.store import _WITH_USAGE, COUNTS_SQL, TOTALS_SQL, Counts, Totals, UserWithUsage, _like, _with_usage
from adiuva_server.db.postgres import PgDatabase


class PostgresAdminStore:
    def __init__(self, db: PgDatabase) -> None:
        self.db = db

    async def users(self, q: str | None, offset: int, limit: int) -> tuple[list[UserWithUsage], int]:
        where, params = ("WHERE u.email LIKE $1 ESCAPE '\\'", [_like(q.lower())]) if q else ("", [])
        n = len(params)

        async def read(conn: Any) -> tuple[list[Any], int]:
            rows = await conn.fetch(f"{_WITH_USAGE} {where} ORDER BY u.created_at, u.email LIMIT ${n + 1} OFFSET ${n + 2}",
                                    *params, limit, offset)
            return rows, await conn.fetchval(f"SELECT count(*) FROM users u {where}", *params)

        # One snapshot for the page and the total (read-only serializable: retried on conflicts).
        rows, total = await self.db.transaction(read, serializable=True, readonly=True)
        return [_with_usage(r) for r in rows], total

    async def user(self, user_id: str) -> UserWithUsage | None:
        row = await self.db.fetchrow(f"{_WITH_USAGE} WHERE u.id = $1", user_id)
        return None if row is None else _with_usage(row)

    async def counts(self) -> Counts:
        return Counts(*await self.db.fetchrow(COUNTS_SQL))

    async def totals(self) -> Totals:
        return Totals(*await self.db.fetchrow(TOTALS_SQL))

    async def database_bytes(self) -> int:
        """The whole database, as PostgreSQL counts it (tables, indexes, TOAST)."""
        return await self.db.fetchval("SELECT pg_database_size(current_database())")

    async def user_objects(self, conn: Any, user_id: str) -> list[str]:
        """Inside the deleting transaction, on its asyncpg connection."""
        rows = await conn.fetch(
            "SELECT checksum FROM storage_records WHERE user_id = $1 AND checksum IS NOT NULL "
            "UNION SELECT checksum FROM storage_backups WHERE user_id = $1",
            user_id,
        )
        return [r[0] for r in rows]

    async def scrub_deleted(self, user_id: str) -> bool:
        """Nothing for this server to do: the deleted rows' space and WAL are PostgreSQL's to
        reclaim (autovacuum; an operator's WAL archive, if any, keeps its history)."""
        return True
