"""Copy every table of one metadata backend into the other, row by row, column by column.

The PostgreSQL schema names its tables and columns as the SQLite one does (a rule of
`db/postgres/migrations/`), so one generic copy serves `adiuva migrate` (SQLite -> PostgreSQL)
and the logical server backup of a PostgreSQL server (PostgreSQL -> a SQLite file in the same
archive format, which restores into either backend). Values are converted by the target
column's type: 0/1 and booleans, float32 blobs and pgvector's `vector`, bytes and `bytea`.

Each copy is one transaction on PostgreSQL: a failed migration leaves the target as empty as it
was; an export reads one consistent snapshot (REPEATABLE READ, read only).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from adiuva_server.db import connect

PAGE = 1000
# SQLite tables with nothing to carry over: sqlite-vec's (the legacy layout, moved by migration
# 0009) and SQLite's own.
_SKIP_PREFIXES = ("sqlite_", "vec_f32_")
# Tables whose PostgreSQL counterpart keeps the same facts another way (a sequence, a trigger);
# they may be missing there.
DERIVED = frozenset({"vector_version_counter"})

Progress = Callable[[int], None]


class CopyError(Exception):
    """A copy that cannot be made faithfully (the detail says why); nothing was changed."""


# -- SQLite side ---------------------------------------------------------------------------------


def sqlite_tables(path: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """The data tables of a SQLite file, parents before children (foreign keys), each with its
    columns as (name, declared type)."""
    conn = connect(path, readonly=True)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND sql NOT LIKE 'CREATE VIRTUAL%' ORDER BY name")
            if not r[0].startswith(_SKIP_PREFIXES)]
        parents = {n: {r[2] for r in conn.execute(f'PRAGMA foreign_key_list("{n}")')} - {n} for n in names}
        columns = {n: [(r[1], (r[2] or "").upper()) for r in conn.execute(f'PRAGMA table_info("{n}")')] for n in names}
    finally:
        conn.close()
    ordered: list[str] = []
    while len(ordered) < len(names):
        ready = [n for n in names if n not in ordered and parents[n] <= set(ordered)]
        if not ready:
            raise CopyError(f"circular foreign keys among {sorted(set(names) - set(ordered))}")
        ordered.extend(ready)
    return [(n, columns[n]) for n in ordered]


def _has_rowid(conn: Any, table: str) -> bool:
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0] or ""
    return "WITHOUT ROWID" not in sql.upper()


def sqlite_count(path: Path, table: str) -> int:
    conn = connect(path, readonly=True)
    try:
        return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    finally:
        conn.close()


# -- PostgreSQL side -----------------------------------------------------------------------------


async def pg_columns(conn: Any) -> dict[str, dict[str, str]]:
    rows = await conn.fetch(
        "SELECT table_name, column_name, CASE WHEN data_type = 'USER-DEFINED' THEN udt_name ELSE data_type END AS t"
        " FROM information_schema.columns WHERE table_schema = current_schema()")
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        out.setdefault(r["table_name"], {})[r["column_name"]] = r["t"]
    return out


def _to_pg(value: Any, pg_type: str) -> Any:
    if value is None:
        return None
    if pg_type == "boolean":
        return bool(value)
    if pg_type == "vector":  # sent as text: '[0.1,0.2,...]'
        floats = np.frombuffer(value, dtype="<f4") if isinstance(value, (bytes, memoryview)) else value
        return "[" + ",".join(repr(float(x)) for x in floats) + "]"
    if pg_type == "bytea":
        return bytes(value)
    if pg_type in ("jsonb", "json"):
        return json.loads(value) if isinstance(value, (str, bytes)) else value
    if pg_type.startswith("timestamp"):
        if isinstance(value, (int, float)):
            return dt.datetime.fromtimestamp(value, dt.UTC)
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if pg_type in ("bigint", "integer", "smallint"):
        return int(value)
    if pg_type in ("double precision", "real", "numeric"):
        return float(value)
    return value


def _to_sqlite(value: Any, pg_type: str, declared: str) -> Any:
    if value is None:
        return None
    if pg_type == "boolean":
        return int(value)
    if pg_type == "vector":
        floats = value if not isinstance(value, str) else [float(x) for x in value.strip("[]").split(",") if x]
        return np.asarray(floats, dtype="<f4").tobytes()
    if pg_type in ("jsonb", "json"):
        return value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, dt.datetime):
        if "INT" in declared:
            return int(value.timestamp())
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    return value


def _cast(pg_type: str) -> str:
    return "::text::vector" if pg_type == "vector" else ""


# -- the two directions --------------------------------------------------------------------------


async def sqlite_to_pg(path: Path, pg: Any, progress: Progress | None = None) -> dict[str, int]:
    """Copy every table of the SQLite file at `path` into the (empty) PostgreSQL database of
    `pg` (a PgDatabase), in one transaction; returns rows copied per table."""
    tables = await asyncio.to_thread(sqlite_tables, path)

    async def copy(conn: Any) -> dict[str, int]:
        target = await pg_columns(conn)
        if "users" in target and await conn.fetchval("SELECT count(*) FROM users"):
            raise CopyError("the PostgreSQL database already has users; migrate into an empty database")
        copied: dict[str, int] = {}
        for table, cols in tables:
            if table not in target:
                if table in DERIVED:
                    continue
                raise CopyError(f"table {table} has no PostgreSQL counterpart (is the PostgreSQL schema current?)")
            missing = [c for c, _ in cols if c not in target[table]]
            if missing:
                raise CopyError(f"columns {missing} of {table} have no PostgreSQL counterpart")
            types = [target[table][c] for c, _ in cols]
            names = ", ".join(f'"{c}"' for c, _ in cols)
            params = ", ".join(f"${i + 1}{_cast(t)}" for i, t in enumerate(types))
            insert = f'INSERT INTO "{table}" ({names}) VALUES ({params})'
            # The rows carry their counters (install counts, rating sums): the triggers that keep
            # them must not count the copied rows again. Off for this transaction only.
            await conn.execute(f'ALTER TABLE "{table}" DISABLE TRIGGER USER')
            reader = connect(path, readonly=True)
            try:
                cursor = reader.execute(f'SELECT {names} FROM "{table}" ORDER BY rowid'
                                        if _has_rowid(reader, table) else f'SELECT {names} FROM "{table}"')
                n = 0
                while rows := await asyncio.to_thread(cursor.fetchmany, PAGE):
                    await conn.executemany(insert, [[_to_pg(v, t) for v, t in zip(row, types)] for row in rows])
                    n += len(rows)
                    if progress:
                        progress(len(rows))
            finally:
                reader.close()
            await conn.execute(f'ALTER TABLE "{table}" ENABLE TRIGGER USER')
            copied[table] = n
        await _reset_sequences(conn)
        return copied

    async with pg.pool.acquire() as conn:
        await conn.execute("SET statement_timeout = 0")
        try:
            async with conn.transaction():
                return await copy(conn)
        finally:
            await conn.execute("RESET statement_timeout")


async def pg_to_sqlite(pg: Any, path: Path, progress: Progress | None = None) -> dict[str, int]:
    """Copy every table of PostgreSQL into the SQLite file at `path` (already at the current
    schema, its tables empty), from one consistent snapshot; returns rows per table."""
    tables = await asyncio.to_thread(sqlite_tables, path)
    copied: dict[str, int] = {}
    writer = connect(path)
    try:
        await asyncio.to_thread(writer.execute, "PRAGMA foreign_keys = OFF")
        await asyncio.to_thread(writer.execute, "BEGIN IMMEDIATE")
        # Rows the SQLite migrations seed (e.g. counters) are replaced by the source's.
        for table, _ in reversed(tables):
            await asyncio.to_thread(writer.execute, f'DELETE FROM "{table}"')
        # The rows carry their counters: the triggers that keep them are dropped for the copy and
        # made again before the commit (DDL is transactional in SQLite).
        triggers = await asyncio.to_thread(_drop_triggers, writer)
        async with pg.pool.acquire() as conn:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                source = await pg_columns(conn)
                for table, cols in tables:
                    if table not in source:
                        if table in DERIVED:
                            continue
                        raise CopyError(f"table {table} is missing from PostgreSQL")
                    present = [(c, d) for c, d in cols if c in source[table]]
                    names = ", ".join(f'"{c}"' for c, _ in present)
                    types = [(source[table][c], d) for c, d in present]
                    select = ", ".join(f'"{c}"::text' if source[table][c] == "vector" else f'"{c}"' for c, _ in present)
                    insert = f'INSERT INTO "{table}" ({names}) VALUES ({", ".join("?" for _ in present)})'
                    n = 0
                    # A PostgreSQL-only `n` column keeps SQLite's insertion order (its rowid), which
                    # listings and "the latest backup" rely on.
                    order = ' ORDER BY "n"' if "n" in source[table] and "n" not in dict(cols) else ""
                    cursor = await conn.cursor(f'SELECT {select} FROM "{table}"{order}')
                    while rows := await cursor.fetch(PAGE):
                        values = [[_to_sqlite(v, t, d) for v, (t, d) in zip(row, types)] for row in rows]
                        await asyncio.to_thread(writer.executemany, insert, values)
                        n += len(rows)
                        if progress:
                            progress(len(rows))
                    copied[table] = n
        await asyncio.to_thread(_restore_triggers, writer, triggers)
        await asyncio.to_thread(writer.execute, "COMMIT")
    except BaseException:
        if writer.in_transaction:
            writer.execute("ROLLBACK")
        raise
    finally:
        writer.close()
    return copied


def _drop_triggers(writer: Any) -> list[tuple[str, str]]:
    triggers = writer.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").fetchall()
    for name, _ in triggers:
        writer.execute(f'DROP TRIGGER "{name}"')
    return triggers


def _restore_triggers(writer: Any, triggers: list[tuple[str, str]]) -> None:
    for _, sql in triggers:
        writer.execute(sql)
    # PostgreSQL draws vector versions from a sequence; SQLite's counter goes on from the
    # highest version copied.
    writer.execute("INSERT INTO vector_version_counter (id, value) "
                   "SELECT 1, coalesce(max(version), 0) FROM vector_collections")


async def pg_counts(pg: Any, tables: list[str]) -> dict[str, int]:
    return {t: await pg.fetchval(f'SELECT count(*) FROM "{t}"') for t in tables}


async def _reset_sequences(conn: Any) -> None:
    """Rows came with their ids: move each serial/identity sequence past the largest."""
    rows = await conn.fetch(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND (column_default LIKE 'nextval(%' OR is_identity = 'YES')")
    for r in rows:
        t, c = r["table_name"], r["column_name"]
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('\"{t}\"', '{c}'), coalesce((SELECT max(\"{c}\") FROM \"{t}\"), 0) + 1, false)")
