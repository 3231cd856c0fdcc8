"""The active-batch store and the console session store, on both backends: SQLite (a real file)
and PostgreSQL (a real server). The tier's batch cap holds under concurrent starts (connections
of their own on PostgreSQL, as several nodes would make them); sessions hold across stores on
one database (another node) and expire."""

from __future__ import annotations

import asyncio
import time

import pytest

from adiuva_server import errors
from adiuva_server.chat.batches import SQLiteBatchStore
from adiuva_server.chat.postgres import PostgresBatchStore
from adiuva_server.console.postgres import PostgresConsoleSessions
from adiuva_server.console.store import SQLiteConsoleSessions
from adiuva_server.db import Database
from adiuva_server.db.postgres import PgDatabase
from tests.test_marketplace_store import Backend, backend_kind  # noqa: F401 (a fixture)

STALE = 3600


@pytest.fixture
async def backend(backend_kind, tmp_path):
    kind, url = backend_kind
    if kind == "sqlite":
        db = await Database.open(tmp_path / "store.db")
        yield Backend("sqlite", db, None)
        await db.close()
        return
    db = await PgDatabase.open(url)
    yield Backend("postgresql", db, None)
    await db.close()


def batches(backend):
    return SQLiteBatchStore(backend.db) if backend.name == "sqlite" else PostgresBatchStore(backend.db, STALE)


def sessions(backend):
    return SQLiteConsoleSessions(backend.db) if backend.name == "sqlite" else PostgresConsoleSessions(backend.db)


async def test_the_batch_cap_holds_under_concurrent_starts(backend):
    ada, bob = await backend.add_user(), await backend.add_user()
    nodes = [batches(backend) for _ in range(3)]  # three processes' stores on one database
    results = await asyncio.gather(*(nodes[i % 3].start(ada, f"plan-{i}", 2) for i in range(24)),
                                   return_exceptions=True)
    started = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, errors.ActiveBatchLimit)]
    assert (len(started), len(refused)) == (2, 22)
    assert await nodes[0].start(bob, "plan-b", 2)  # another user's cap is their own
    await nodes[1].finish(started[0], "done")
    third = await nodes[2].start(ada, "plan-again", 2)  # a slot freed
    with pytest.raises(errors.ActiveBatchLimit):
        await nodes[0].start(ada, "plan-over", 2)
    assert await nodes[0].start(ada, "uncapped", None)
    recent = await nodes[0].recent(ada)
    assert [b.plan_id for b in recent][:2] == ["uncapped", "plan-again"]  # newest first, insertion order on ties
    assert {b.id: b.status for b in recent}[started[0]] == "done"
    await nodes[0].finish(third, "failed")
    await nodes[0].finish(third, "done")  # finished once: the first outcome stays
    assert {b.id: b.status for b in await nodes[0].recent(ada)}[third] == "failed"


async def test_batches_left_by_a_dead_process_stop_counting(backend):
    ada = await backend.add_user()
    store = batches(backend)
    ids = [await store.start(ada, f"p{i}", 2) for i in range(2)]
    old = int(time.time()) - STALE - 10  # as if started before the longest possible run
    if backend.name == "sqlite":
        await backend.db.execute_write("UPDATE chat_batches SET started_at = ?", (old,))
    else:
        await backend.db.execute("UPDATE chat_batches SET started_at = $1", old)
    if backend.name == "postgresql":  # other nodes' old leftovers no longer block the user
        assert await store.start(ada, "p-new", 2)
    assert await store.interrupt_running() >= 2
    statuses = {b.id: b.status for b in await store.recent(ada)}
    assert [statuses[i] for i in ids] == ["interrupted", "interrupted"]


async def test_console_sessions_hold_across_nodes_and_expire(backend):
    ada = await backend.add_user()
    one, two = sessions(backend), sessions(backend)
    now = int(time.time())
    cookie, session = await one.start(ada, 3, now, 60)
    assert await two.get(cookie, now + 1) == session  # another node sees it
    assert await two.get(cookie, now + 61) is None  # expired
    assert await two.get("not-a-session", now) is None
    await two.end(cookie)
    assert await one.get(cookie, now + 1) is None
    # Expired sessions are removed when the next one starts; a deleted user's go with them.
    stale, _ = await one.start(ada, 3, now - 100, 10)
    fresh, _ = await one.start(ada, 3, now, 60)
    count = "SELECT count(*) FROM console_sessions"
    rows = (await backend.db.fetchone(count))[0] if backend.name == "sqlite" else await backend.db.fetchval(count)
    assert rows == 1
    await backend.delete_user(ada)
    assert await one.get(fresh, now) is None
