"""The SQLite layer: works on a Python whose sqlite3 cannot load extensions, loads sqlite-vec
on every connection, migrates once even when two processes start together."""

from __future__ import annotations

import asyncio
import sqlite3

from adiuva_server.db import Database
from adiuva_server.db.database import migrations


async def test_sqlite_vec_is_loaded_on_every_connection(tmp_path):
    db = await Database.open(tmp_path / "a.db")
    try:
        assert (await db.fetchone("SELECT vec_version()"))[0].startswith("v")
        assert db.lookup("SELECT vec_version()")[0].startswith("v")
        async with db.write() as conn:
            async with conn.execute("SELECT vec_length(vec_f32('[1, 2, 3]'))") as cur:
                assert (await cur.fetchone())[0] == 3
        for pragma, expected in [("journal_mode", "wal"), ("foreign_keys", 1), ("busy_timeout", 10000)]:
            assert (await db.fetchone(f"PRAGMA {pragma}"))[0] == expected
    finally:
        await db.close()


async def test_migrations_run_once_even_concurrently(tmp_path):
    path = tmp_path / "a.db"
    dbs = await asyncio.gather(*[Database.open(path) for _ in range(4)])
    for db in dbs:
        await db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == migrations()[-1][0]
    again = await Database.open(path)
    await again.close()


async def test_a_failed_write_changes_nothing(tmp_path):
    db = await Database.open(tmp_path / "a.db")
    try:
        try:
            async with db.write() as conn:
                await conn.execute(
                    "INSERT INTO users (id, email, password_hash, created_at) VALUES ('1', 'a@b', 'h', 'now')")
                raise RuntimeError("half way")
        except RuntimeError:
            pass
        assert (await db.fetchone("SELECT count(*) FROM users"))[0] == 0
    finally:
        await db.close()


async def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "a.db"
    await (await Database.open(path)).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    try:
        await Database.open(path)
    except RuntimeError as exc:
        assert "newer than this server" in str(exc)
    else:
        raise AssertionError("opened a database from the future")
