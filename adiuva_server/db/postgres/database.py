"""The PostgreSQL façade (DATABASE_URL=postgresql://...), the twin of `db/database.py`.

- One asyncpg pool per process. Reads: `fetch`, `fetchrow`, `fetchval` on any pooled connection.
- Writes: `transaction(fn)` runs `await fn(conn)` as one whole transaction, handed over as a
  function (Datasette's `execute_write_fn`), so no caller holds a connection across network
  I/O. READ COMMITTED by default: invariants are kept by the statements themselves (atomic
  `UPDATE ... WHERE`, unique constraints, `SELECT ... FOR UPDATE` row locks). `serializable=True`
  for the rare transaction that needs it; serialization failures and deadlocks are retried
  with jittered back-off, so `fn` must have no side effects outside the database.
- Migrations: the SQL files in `db/postgres/migrations/` (one folder per backend, as Vaultwarden
  does), applied at start by whichever node gets the migration advisory lock first; the others
  wait on the lock and then find nothing to do. Each file in its own transaction.
- PostgreSQL unreachable (a restart, a failover): every call raises `ServiceUnavailable`
  (503 problem+json with Retry-After) instead of a 500; the pool reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

import asyncpg

from adiuva_server import errors

log = logging.getLogger(__name__)

T = TypeVar("T")
Record = asyncpg.Record
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# pg_advisory_lock keys (bigint), one per purpose, in one place.
MIGRATION_LOCK = 0x0AD1_0001
# Serialization failures and deadlocks retried this many times (jittered, capped back-off), then
# a 503: a transaction that cannot get through under contention must not become a 500.
RETRIES = 16
# How long a statement may run before PostgreSQL cancels it (a request must not hang on a lock
# forever); a migration may take longer.
STATEMENT_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT = 10.0
RETRY_AFTER = 2

# What "PostgreSQL is not there right now" looks like from asyncpg: refused or dropped
# connections, a server starting or shutting down, too many clients.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)
_RETRYABLE = (asyncpg.SerializationError, asyncpg.DeadlockDetectedError)


def pg_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, _UNAVAILABLE)


def rows_changed(status: str) -> int:
    """Rows affected, from asyncpg's command tag ("UPDATE 3", "INSERT 0 1", "DELETE 0")."""
    return int(status.rsplit(" ", 1)[-1])


def migrations() -> list[tuple[int, str, str]]:
    """The bundled PostgreSQL migrations, (version, file name, SQL), in order."""
    found = []
    for entry in resources.files("adiuva_server.db.postgres.migrations").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two PostgreSQL migrations share a number: {versions}")
    return found


class PgDatabase:
    """Open with `await PgDatabase.open(url)`; close with `await db.close()`."""

    backend = "postgresql"

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool = pool
        self._url = url

    async def connect_listener(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool, for LISTEN (held for the process's life)."""
        return await asyncpg.connect(self._url, timeout=CONNECT_TIMEOUT,
                                     server_settings={"application_name": "adiuva-listener"})

    @classmethod
    async def open(cls, url: str, *, min_size: int = 2, max_size: int = 20, migrate: bool = True) -> PgDatabase:
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, timeout=CONNECT_TIMEOUT,
            server_settings={"statement_timeout": str(STATEMENT_TIMEOUT_MS), "application_name": "adiuva"},
            init=_prepare,
        )
        db = cls(pool, url)
        try:
            if migrate:
                await db.migrate()
        except BaseException:
            await pool.close()
            raise
        return db

    async def close(self) -> None:
        await self.pool.close()

    # -- reads ------------------------------------------------------------------------------

    async def fetch(self, sql: str, *args: Any) -> list[Record]:
        return await self._call(lambda conn: conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Record | None:
        return await self._call(lambda conn: conn.fetchrow(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._call(lambda conn: conn.fetchval(sql, *args))

    async def execute(self, sql: str, *args: Any) -> str:
        """One statement in its own (implicit) transaction."""
        return await self._call(lambda conn: conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self.transaction(lambda conn: conn.executemany(sql, rows))

    # -- writes -----------------------------------------------------------------------------

    async def transaction(self, fn: Callable[[asyncpg.Connection], Awaitable[T]], *,
                          serializable: bool = False, readonly: bool = False) -> T:
        """Run `fn(conn)` in one transaction; commit when it returns, roll back when it raises.
        Retried on serialization failures and deadlocks (so `fn` may run more than once)."""
        isolation = "serializable" if serializable else "read_committed"
        for attempt in range(RETRIES):
            try:
                async with self.pool.acquire() as conn:
                    async with conn.transaction(isolation=isolation, readonly=readonly):
                        return await fn(conn)
            except _RETRYABLE as exc:
                if attempt == RETRIES - 1:
                    log.warning("transaction gave up after %d conflicts", RETRIES)
                    raise errors.DatabaseUnavailable("The database is too busy right now; nothing was changed. "
                                                     "Try again shortly.", retry_after=RETRY_AFTER) from exc
                await asyncio.sleep(random.uniform(0, min(0.25, 0.005 * 2**attempt)))
            except _UNAVAILABLE as exc:
                raise _unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def _call(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            async with self.pool.acquire() as conn:
                return await fn(conn)
        except _UNAVAILABLE as exc:
            raise _unavailable(exc) from exc

    # -- cluster coordination ---------------------------------------------------------------

    async def try_lock(self, key: int) -> asyncpg.Connection | None:
        """A session advisory lock on a connection of its own: the connection, holding the lock,
        or None when another session holds it. Give it back with `unlock`. A node that dies
        loses its session, so the lock is freed by PostgreSQL itself."""
        conn = await self.pool.acquire()
        try:
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                return conn
        except BaseException:
            await self.pool.release(conn)
            raise
        await self.pool.release(conn)
        return None

    async def unlock(self, conn: asyncpg.Connection, key: int) -> None:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            await self.pool.release(conn)

    # -- schema -----------------------------------------------------------------------------

    async def migrate(self) -> int:
        """Apply bundled migrations not yet applied, once per cluster: under an advisory lock,
        each file in its own transaction, recorded in `schema_migrations`."""
        bundled = migrations()
        latest = bundled[-1][0] if bundled else 0
        async with self.pool.acquire() as conn:
            await conn.execute("SET statement_timeout = 0")
            await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
                # Every bundled version not recorded, not only those above the highest: numbers
                # are reserved per feature, so one may land after a higher one was applied.
                done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                if current > latest:
                    raise RuntimeError(
                        f"database schema version {current} is newer than this server ({latest}); upgrade adiuva"
                    )
                for version, name, sql in bundled:
                    if version in done:
                        continue
                    log.info("applying PostgreSQL migration %s", name)
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
                await conn.execute("RESET statement_timeout")
        # New types (pgvector's) may have been made meanwhile, by this node or by another one that
        # held the lock while this one waited: connections opened before them reconnect to get
        # their codecs (a node starting beside the migrating one once bound vectors as text).
        await self.pool.expire_connections()
        return latest


async def _prepare(conn: asyncpg.Connection) -> None:
    """Every pooled connection: JSON as Python objects both ways; pgvector's `vector` (once
    migration 0003 has created it) in its binary form both ways (vectors/postgres.py)."""
    import json

    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    schema = await conn.fetchval("SELECT typnamespace::regnamespace::text FROM pg_type WHERE typname = 'vector'")
    if schema is not None:
        from adiuva_server.vectors.postgres import decode_vector, encode_vector

        await conn.set_type_codec("vector", encoder=encode_vector, decoder=decode_vector, format="binary",
                                  schema=schema)


def _unavailable(exc: BaseException) -> errors.ServiceUnavailable:
    log.warning("PostgreSQL unavailable: %s", type(exc).__name__)
    return errors.DatabaseUnavailable(retry_after=RETRY_AFTER)
