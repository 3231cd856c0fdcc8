"""Console sessions on PostgreSQL (migration postgres/0007): the same rows as SQLite's, so a
session started on one node holds on every node."""

from __future__ import annotations

import secrets

import asyncpg

from adiuva_server.console.store import ConsoleSession, session_hash
from adiuva_server.db.postgres import PgDatabase


class PostgresConsoleSessions:
    def __init__(self, db: PgDatabase) -> None:
        self.db = db

    async def start(self, user_id: str, session_version: int, now: int, lifetime: int) -> tuple[str, ConsoleSession]:
        """A new session: returns the cookie's value (never stored) and the session."""
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)

        async def write(conn: asyncpg.Connection) -> None:
            await conn.execute("DELETE FROM console_sessions WHERE expires_at <= $1", now)
            await conn.execute(
                "INSERT INTO console_sessions (id_hash, user_id, session_version, csrf_token, created_at, expires_at) "
                "VALUES ($1, $2, $3, $4, $5, $6)", session_hash(session_id), user_id, session_version, csrf, now,
                now + lifetime)

        await self.db.transaction(write)
        return session_id, ConsoleSession(user_id, session_version, csrf)

    async def get(self, session_id: str, now: int) -> ConsoleSession | None:
        row = await self.db.fetchrow(
            "SELECT user_id, session_version, csrf_token FROM console_sessions WHERE id_hash = $1 AND expires_at > $2",
            session_hash(session_id), now)
        return None if row is None else ConsoleSession(row[0], row[1], row[2])

    async def end(self, session_id: str) -> None:
        await self.db.execute("DELETE FROM console_sessions WHERE id_hash = $1", session_hash(session_id))
