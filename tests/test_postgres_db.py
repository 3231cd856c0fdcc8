"""The PostgreSQL façade against a real PostgreSQL: migrations once per cluster, whole
transactions as functions, retries on serialization failures, 503 when the server is gone."""

from __future__ import annotations

import asyncio

import pytest

from adiuva_server import errors
from adiuva_server.config import Settings
from adiuva_server.db.postgres import PgDatabase, database as pg


@pytest.fixture
def two_migrations(monkeypatch):
    bundled = [
        (1, "0001_a.sql", "CREATE TABLE a (id integer PRIMARY KEY, n integer NOT NULL DEFAULT 0);"
                          " INSERT INTO a (id) VALUES (1);"),
        # Slow on purpose: a second node starting meanwhile must wait for it, not apply it too.
        (2, "0002_b.sql", "SELECT pg_sleep(0.3); ALTER TABLE a ADD COLUMN b text;"),
    ]
    monkeypatch.setattr(pg, "migrations", lambda: bundled)
    return bundled


async def test_migrations_run_once_when_nodes_start_together(pg_url, two_migrations):
    dbs = await asyncio.gather(*(PgDatabase.open(pg_url, min_size=1, max_size=2) for _ in range(4)))
    try:
        rows = await dbs[0].fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        assert [(r["version"], r["name"]) for r in rows] == [(1, "0001_a.sql"), (2, "0002_b.sql")]
        assert await dbs[1].fetchval("SELECT count(*) FROM a") == 1
        # Reopening applies nothing.
        again = await PgDatabase.open(pg_url, min_size=1, max_size=1)
        assert await again.fetchval("SELECT count(*) FROM schema_migrations") == 2
        await again.close()
    finally:
        for db in dbs:
            await db.close()


async def test_a_migration_numbered_below_an_applied_one_is_applied_too(pg_url, two_migrations, monkeypatch):
    # Numbers are reserved per feature: 0002 may ship after a database has 0001 and 0003.
    monkeypatch.setattr(pg, "migrations", lambda: [two_migrations[0], (3, "0003_c.sql", "CREATE TABLE c (x int);")])
    db = await PgDatabase.open(pg_url, min_size=1, max_size=1)
    await db.close()
    monkeypatch.setattr(pg, "migrations", lambda: [*two_migrations, (3, "0003_c.sql", "CREATE TABLE c (x int);")])
    db = await PgDatabase.open(pg_url, min_size=1, max_size=1)
    try:
        versions = [r[0] for r in await db.fetch("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [1, 2, 3]
        assert await db.fetchval("SELECT count(*) FROM information_schema.columns WHERE table_name = 'a' "
                                 "AND column_name = 'b'") == 1
    finally:
        await db.close()


async def test_a_newer_schema_refuses_to_start(pg_url, two_migrations, monkeypatch):
    db = await PgDatabase.open(pg_url, min_size=1, max_size=1)
    await db.close()
    monkeypatch.setattr(pg, "migrations", lambda: two_migrations[:1])
    with pytest.raises(RuntimeError, match="newer than this server"):
        await PgDatabase.open(pg_url, min_size=1, max_size=1)


async def test_a_transaction_is_all_or_nothing(pg_url, two_migrations):
    db = await PgDatabase.open(pg_url, min_size=1, max_size=2)
    try:
        async def half(conn):
            await conn.execute("UPDATE a SET n = n + 1 WHERE id = 1")
            raise ValueError("changed my mind")

        with pytest.raises(ValueError):
            await db.transaction(half)
        assert await db.fetchval("SELECT n FROM a WHERE id = 1") == 0
    finally:
        await db.close()


async def test_serializable_conflicts_are_retried_until_every_writer_counts(pg_url, two_migrations):
    """Read-then-write increments under SERIALIZABLE: concurrent ones conflict; the façade retries
    them, so every one of 20 lands exactly once."""
    db = await PgDatabase.open(pg_url, min_size=2, max_size=10)
    attempts = 0
    try:
        async def increment(conn):
            nonlocal attempts
            attempts += 1
            n = await conn.fetchval("SELECT n FROM a WHERE id = 1")
            await asyncio.sleep(0.01)  # widen the race
            await conn.execute("UPDATE a SET n = $1 WHERE id = 1", n + 1)

        await asyncio.gather(*(db.transaction(increment, serializable=True) for _ in range(20)))
        assert await db.fetchval("SELECT n FROM a WHERE id = 1") == 20
        assert attempts > 20  # there were conflicts, and they were retried
    finally:
        await db.close()


async def test_an_advisory_lock_has_one_holder(pg_url, two_migrations):
    a = await PgDatabase.open(pg_url, min_size=1, max_size=2)
    b = await PgDatabase.open(pg_url, min_size=1, max_size=2)
    try:
        held = await a.try_lock(42)
        assert held is not None
        assert await b.try_lock(42) is None
        await a.unlock(held, 42)
        again = await b.try_lock(42)
        assert again is not None
        await b.unlock(again, 42)
    finally:
        await a.close()
        await b.close()


async def test_an_unreachable_server_is_a_503_problem_not_a_crash(pg_url, two_migrations, postgres_server):
    db = await PgDatabase.open(pg_url, min_size=1, max_size=2)
    try:
        await asyncio.to_thread(postgres_server.halt)
        try:
            for call in (lambda: db.fetchval("SELECT 1"),
                         lambda: db.transaction(lambda conn: conn.execute("UPDATE a SET n = n + 1"))):
                with pytest.raises(errors.DatabaseUnavailable) as caught:
                    await call()
                assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "2"
        finally:
            await asyncio.to_thread(postgres_server.resume)
        # The pool reconnects by itself; the refused write changed nothing.
        assert await db.fetchval("SELECT n FROM a WHERE id = 1") == 0
    finally:
        await db.close()


def test_database_url_must_be_postgresql_and_is_never_echoed(tmp_path):
    with pytest.raises(errors.ConfigError) as caught:
        Settings.from_env({"ADIUVA_DATA_DIR": str(tmp_path), "DATABASE_URL": "mysql://u:s3cret@h/db"})
    assert "s3cret" not in str(caught.value) and "DATABASE_URL" in str(caught.value)
    s = Settings.from_env({"ADIUVA_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgresql://u:s3cret@db:5432/adiuva",
                           "ADIUVA_SINGLE_NODE": "true"})
    assert s.backend == "postgresql" and "s3cret" not in repr(s)
    assert Settings.from_env({"ADIUVA_DATA_DIR": str(tmp_path)}).backend == "sqlite"


def test_a_shared_database_without_shared_blobs_or_limits_refuses_to_start(tmp_path):
    """Split state: PostgreSQL with local blobs or in-process limits, on several nodes."""
    from tests.conftest import run_cli

    url = "postgresql://u:s3cret@127.0.0.1:1/adiuva"
    env = {"ADIUVA_DATA_DIR": str(tmp_path), "DATABASE_URL": url}
    for extra, missing in (({}, "S3_BUCKET and REDIS_URL are not"), ({"S3_BUCKET": "blobs"}, "REDIS_URL is not"),
                           ({"REDIS_URL": "redis://127.0.0.1:1"}, "S3_BUCKET is not")):
        with pytest.raises(errors.ConfigError) as caught:
            Settings.from_env({**env, **extra})
        assert missing in str(caught.value) and "ADIUVA_SINGLE_NODE=true" in str(caught.value)
        assert "s3cret" not in str(caught.value)
    shared = {**env, "S3_BUCKET": "blobs", "REDIS_URL": "redis://127.0.0.1:1"}
    with pytest.raises(errors.ConfigError, match="JWT_SECRET is not"):
        Settings.from_env(shared)  # tokens of one node would fail on the next
    both = Settings.from_env({**shared, "JWT_SECRET": "s" * 32})
    assert both.backend == "postgresql"
    # The real command: exit 2 with the message, before anything is opened.
    done = run_cli(tmp_path, "serve", DATABASE_URL=url)
    assert done.returncode == 2, done.stderr
    assert "S3_BUCKET and REDIS_URL are not" in done.stderr and "s3cret" not in done.stderr + done.stdout


async def test_a_node_that_waited_for_another_nodes_migration_gets_the_new_types(pg_url):
    """Its pool's connections were opened before pgvector's type existed: after the migration
    (made by another node) they must bind vectors in the binary codec, not as text."""
    early = await PgDatabase.open(pg_url, min_size=2, max_size=2, migrate=False)
    other = await PgDatabase.open(pg_url)  # this node migrates (creates the vector type)
    try:
        await early.migrate()  # nothing left to apply here
        got = await asyncio.gather(*(early.fetchval("SELECT $1::vector::text", [1.0, 2.5]) for _ in range(4)))
        assert got == ["[1,2.5]"] * 4
    finally:
        await other.close()
        await early.close()
