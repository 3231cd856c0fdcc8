"""Console sessions in the database (so they survive a restart and hold on every node).
No SQL for console sessions lives outside this module."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Protocol

from adiuva_server.db import Database


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    user_id: str
    session_version: int
    csrf_token: str


def session_hash(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).digest()


class ConsoleSessions(Protocol):
    """SQLiteConsoleSessions here; PostgresConsoleSessions (console/postgres.py) on DATABASE_URL."""

    async def start(self, user_id: str, session_version: int, now: int, lifetime: int) -> tuple[str, ConsoleSession]: ...
    async def get(self, session_id: str, now: int) -> ConsoleSession | None: ...
    async def end(self, session_id: str) -> None: ...


class SQLiteConsoleSessions:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def start(self, user_id: str, session_version: int, now: int, lifetime: int) -> tuple[str, ConsoleSession]:
        """A new session: returns the cookie's value (never stored) and the session."""
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        async with self.db.write() as conn:
            await conn.execute("DELETE FROM console_sessions WHERE expires_at <= ?", (now,))
            await conn.execute(
                "INSERT INTO console_sessions (id_hash, user_id, session_version, csrf_token, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (session_hash(session_id), user_id, session_version, csrf, now, now + lifetime))
        return session_id, ConsoleSession(user_id, session_version, csrf)

    async def get(self, session_id: str, now: int) -> ConsoleSession | None:
        row = await self.db.fetchone(
            "SELECT user_id, session_version, csrf_token FROM console_sessions WHERE id_hash = ? AND expires_at > ?",
            (session_hash(session_id), now))
        return None if row is None else ConsoleSession(row[0], row[1], row[2])

    async def end(self, session_id: str) -> None:
        await self.db.execute_write("DELETE FROM console_sessions WHERE id_hash = ?", (session_hash(session_id),))
