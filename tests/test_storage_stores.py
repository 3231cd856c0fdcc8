"""The storage metadata store's contract, on both backends: a real SQLite file and a real
PostgreSQL 18 (tests/servers_postgres.py). Records with their preconditions, the change feed
with its tombstones and purge, backups with retention, the quota and the record cap (over
them: the same domain error, nothing changed). The invariants under concurrent writers are
raced through separate stores (separate pools on PostgreSQL) on one database, and across two
OS processes: a user's bytes never pass the quota, feed positions are unique, leave no gap, and
commit in order (a reader following the feed misses no write)."""

from __future__ import annotations

import asyncio
import hashlib
import multiprocessing
import random
import re

import pytest

from adiuva_server import errors, tiers
from adiuva_server.auth.store import SQLiteAccountStore
from adiuva_server.db import Database
from adiuva_server.storage.store import RecordWrite, SQLiteStorageStore

NODES = 4
QUOTA = 1000  # bytes of the pro tier's cloud and backup storage in these tests
H = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"


def digest(x: object) -> str:
    return hashlib.sha256(str(x).encode()).hexdigest()


def etag(checksum: str):
    return lambda current: current == checksum


class Backend:
    """Stores on one database, each as a separate server process would have (own connections)."""

    def __init__(self, kind: str, where: str) -> None:
        self.kind, self.where = kind, where
        self.opened: list = []

    async def node(self):
        if self.kind == "sqlite":
            db = await Database.open(self.where)
            store = SQLiteStorageStore(db)
        else:
            from adiuva_server.db.postgres import PgDatabase
            from adiuva_server.storage.postgres import PostgresStorageStore

            db = await PgDatabase.open(self.where, min_size=1, max_size=8)
            store = PostgresStorageStore(db)
        self.opened.append(db)
        return store

    async def nodes(self, n: int = NODES) -> list:
        return [await self.node() for _ in range(n)]

    async def user(self, store, email: str = "ada@example.org") -> str:
        if self.kind == "sqlite":
            accounts = SQLiteAccountStore(store.db)
        else:
            from adiuva_server.auth.postgres import PostgresAccountStore

            accounts = PostgresAccountStore(store.db)
        return (await accounts.create_user(email, H, "pro", False)).id

    async def value(self, store, sql: str, *args):
        if self.kind == "sqlite":
            row = await store.db.fetchone(sql, args)
            return row[0] if row else None
        return await store.db.fetchval(re.sub(r"\?", lambda m, c=iter(range(1, 99)): f"${next(c)}", sql), *args)

    async def close(self) -> None:
        for db in reversed(self.opened):
            await db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_where(request, tmp_path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "adiuva.db")
    return "postgresql", request.getfixturevalue("pg_url")  # a synchronous fixture: asked for here


@pytest.fixture
async def backend(backend_where):
    b = Backend(*backend_where)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def store(backend):
    return await backend.node()


@pytest.fixture
async def ada(backend, store) -> str:
    return await backend.user(store)


@pytest.fixture(autouse=True)
def small_quota(monkeypatch):
    monkeypatch.setitem(tiers.LIMITS["pro"], "cloud_bytes", QUOTA)
    monkeypatch.setitem(tiers.LIMITS["pro"], "backup_bytes", QUOTA)


async def snapshot(backend, store, user_id: str) -> tuple:
    """Everything a failed write must leave as it was."""
    feed, purged = await store.changes(user_id, 0, 10_000)
    last = await backend.value(store, "SELECT last_seq FROM storage_record_counts WHERE user_id = ?", user_id)
    return (await store.usage(user_id, "cloud"), await store.usage(user_id, "backup"), await store.record_count(user_id),
            feed, purged, last, await store.list_backups(user_id))


# -- records -------------------------------------------------------------------------------------


async def test_records_are_inserted_read_listed_replaced_and_deleted(backend, store, ada):
    bob = await backend.user(store, "bob@example.org")
    a = await store.insert_record(ada, "pro", "notes", digest("a"), 10, 100)
    b = await store.insert_record(ada, "pro", "tasks", digest("b"), 20, 100)
    c = await store.insert_record(ada, "pro", "notes", digest("c"), 30, 100)
    assert (a.seq, b.seq, c.seq) == (1, 2, 3) and a.created_at == a.updated_at and a.deleted_at is None
    assert await store.get_record(ada, a.id) == a
    assert await store.get_record(bob, a.id) is None and await store.get_record(ada, "nope") is None
    assert (await store.usage(ada, "cloud"), await store.record_count(ada)) == (60, 3)
    assert (await store.usage(bob, "cloud"), await store.record_count(bob), await store.usage(ada, "backup")) == (0, 0, 0)

    assert await store.list_records(ada, None, 0, 10) == ([a, b, c], 3)  # insertion order
    assert await store.list_records(ada, None, 1, 1) == ([b], 3)
    assert await store.list_records(ada, "notes", 0, 10) == ([a, c], 2)
    assert await store.list_records(ada, "notes", 5, 10) == ([], 2)
    assert await store.list_records(bob, None, 0, 10) == ([], 0)
    assert await store.live_records(ada, [a.id, c.id, "nope"]) == {a.id: a, c.id: c}
    assert await store.live_records(bob, [a.id]) == {}

    with pytest.raises(errors.PreconditionFailed):
        await store.replace_record(ada, "pro", a.id, digest("a2"), 15, etag(digest("stale")))
    with pytest.raises(errors.NotFound):
        await store.replace_record(bob, "pro", a.id, digest("a2"), 15, None)
    new, old = await store.replace_record(ada, "pro", a.id, digest("a2"), 15, etag(digest("a")))
    assert old == digest("a")
    assert (new.id, new.table, new.checksum, new.size_bytes, new.seq, new.created_at) == \
        (a.id, "notes", digest("a2"), 15, 4, a.created_at)
    assert await store.get_record(ada, a.id) == new
    assert [r.id for r in (await store.list_records(ada, None, 0, 10))[0]] == [a.id, b.id, c.id]  # keeps its place
    assert await store.usage(ada, "cloud") == 65

    with pytest.raises(errors.PreconditionFailed):
        await store.delete_record(ada, "pro", b.id, etag(digest("a")))
    with pytest.raises(errors.NotFound):
        await store.delete_record(bob, "pro", b.id, None)
    assert await store.delete_record(ada, "pro", b.id, etag(digest("b"))) == digest("b")
    assert await store.get_record(ada, b.id) is None
    with pytest.raises(errors.NotFound):
        await store.delete_record(ada, "pro", b.id, None)
    with pytest.raises(errors.NotFound):  # a tombstone cannot be replaced
        await store.replace_record(ada, "pro", b.id, digest("b2"), 1, None)
    assert await store.list_records(ada, None, 0, 10) == ([new, c], 2)
    assert (await store.usage(ada, "cloud"), await store.record_count(ada)) == (45, 2)


async def test_a_batch_is_written_whole_or_not_at_all(backend, store, ada):
    a = await store.insert_record(ada, "pro", "notes", digest("a"), 10, 100)
    b = await store.insert_record(ada, "pro", "notes", digest("b"), 10, 100)
    records, replaced = await store.write_records(ada, "pro", [
        RecordWrite("notes", digest("n1"), 5),
        RecordWrite("notes", digest("a2"), 40, a.id, etag(digest("a"))),
        RecordWrite("tasks", digest("n2"), 7),
    ], 100)
    assert [r.seq for r in records] == [3, 4, 5] and replaced == [digest("a")]
    assert (records[1].id, records[1].created_at, records[1].size_bytes) == (a.id, a.created_at, 40)
    assert [await store.get_record(ada, r.id) for r in records] == records
    assert (await store.usage(ada, "cloud"), await store.record_count(ada)) == (62, 4)

    before = await snapshot(backend, store, ada)
    with pytest.raises(errors.PreconditionFailed) as failed:
        await store.write_records(ada, "pro", [RecordWrite("notes", digest("x"), 1),
                                               RecordWrite("notes", digest("b2"), 1, b.id, etag(digest("stale")))], 100)
    assert failed.value.extra["index"] == 1
    with pytest.raises(errors.NotFound) as failed:
        await store.write_records(ada, "pro", [RecordWrite("notes", digest("x"), 1, "nope")], 100)
    assert failed.value.extra["index"] == 0
    with pytest.raises(errors.QuotaExceeded) as failed:  # the cap on records
        await store.write_records(ada, "pro", [RecordWrite("notes", digest("x"), 1) for _ in range(2)], 5)
    assert failed.value.extra == {"max_records": 5}
    with pytest.raises(errors.QuotaExceeded):  # the cap on bytes
        await store.write_records(ada, "pro", [RecordWrite("notes", digest("x"), QUOTA - 62 + 1)], 100)
    assert await snapshot(backend, store, ada) == before
    # Replacing only is never refused by the record cap; shrinking frees bytes.
    _, replaced = await store.write_records(ada, "pro", [RecordWrite("notes", digest("b2"), 1, b.id, None)], 4)
    assert replaced == [digest("b")] and await store.usage(ada, "cloud") == 53


async def test_over_the_quota_or_the_cap_nothing_changes(backend, store, ada):
    a = await store.insert_record(ada, "pro", "notes", digest("a"), QUOTA - 10, 3)
    await store.insert_record(ada, "pro", "notes", digest("b"), 10, 3)
    before = await snapshot(backend, store, ada)
    with pytest.raises(errors.QuotaExceeded) as failed:
        await store.insert_record(ada, "pro", "notes", digest("c"), 1, 3)
    assert failed.value.extra == {"quota_bytes": QUOTA, "used_bytes": QUOTA}
    with pytest.raises(errors.QuotaExceeded):
        await store.replace_record(ada, "pro", a.id, digest("a2"), QUOTA - 9, None)
    with pytest.raises(errors.QuotaExceeded):  # free: no cloud bytes at all
        await store.insert_record(ada, "free", "notes", digest("c"), 1, 3)
    assert await snapshot(backend, store, ada) == before
    await store.insert_record(ada, "pro", "notes", digest("empty"), 0, 3)  # zero bytes still count as a record
    before = await snapshot(backend, store, ada)
    with pytest.raises(errors.QuotaExceeded) as failed:
        await store.insert_record(ada, "team", "notes", digest("c"), 0, 3)
    assert failed.value.extra == {"max_records": 3}
    assert await snapshot(backend, store, ada) == before
    # At the limit exactly is allowed; releasing is always allowed.
    await store.replace_record(ada, "pro", a.id, digest("a2"), QUOTA - 10, None)
    assert await store.usage(ada, "cloud") == QUOTA
    await store.delete_record(ada, "free", a.id, None)
    assert await store.usage(ada, "cloud") == 10


# -- the change feed -----------------------------------------------------------------------------


async def test_the_feed_has_every_change_and_tombstones_until_purged(backend, store, ada):
    bob = await backend.user(store, "bob@example.org")
    a = await store.insert_record(ada, "pro", "notes", digest("a"), 1, 100)
    b = await store.insert_record(ada, "pro", "notes", digest("b"), 1, 100)
    await store.insert_record(bob, "pro", "notes", digest("x"), 1, 100)
    assert (await store.insert_record(bob, "pro", "notes", digest("y"), 1, 100)).seq == 2  # a feed per user
    a2, _ = await store.replace_record(ada, "pro", a.id, digest("a2"), 2, None)
    await store.delete_record(ada, "pro", b.id, None)

    feed, purged = await store.changes(ada, 0, 100)
    assert purged == 0 and [(r.id, r.seq) for r in feed] == [(a.id, 3), (b.id, 4)]
    assert feed[0] == a2
    tomb = feed[1]
    assert (tomb.checksum, tomb.size_bytes, tomb.created_at) == (None, 0, b.created_at) and tomb.deleted_at
    assert await store.changes(ada, 3, 100) == ([tomb], 0)
    assert await store.changes(ada, 0, 1) == ([a2], 0)
    assert await store.changes(ada, 4, 100) == ([], 0)
    assert await store.changes("nobody", 0, 100) == ([], 0)

    assert await store.purge_tombstones("2000-01-01T00:00:00.000Z", 100) == 0  # none that old
    assert await store.purge_tombstones("9999-01-01T00:00:00.000Z", 100) == 1
    assert await store.changes(ada, 0, 100) == ([a2], 4)
    assert (await store.changes(bob, 0, 100))[1] == 0
    assert await store.purge_tombstones("9999-01-01T00:00:00.000Z", 100) == 0
    # Forgotten positions are never given out again.
    c = await store.insert_record(ada, "pro", "notes", digest("c"), 1, 100)
    assert c.seq == 5 and await store.changes(ada, 4, 100) == ([c], 4)


async def test_purge_goes_in_batches_and_keeps_the_highest_forgotten_position(backend, store, ada):
    bob = await backend.user(store, "bob@example.org")
    for who in (ada, bob):
        ids = [(await store.insert_record(who, "pro", "notes", digest((who, i)), 1, 100)).id for i in range(5)]
        for rid in ids:
            await store.delete_record(who, "pro", rid, None)
    assert await store.purge_tombstones("9999-01-01T00:00:00.000Z", 3) == 3
    assert await store.purge_tombstones("9999-01-01T00:00:00.000Z", 3) == 3
    assert await store.purge_tombstones("9999-01-01T00:00:00.000Z", 30) == 4
    assert await store.changes(ada, 0, 100) == ([], 10) and await store.changes(bob, 0, 100) == ([], 10)
    assert (await store.record_count(ada), await store.usage(ada, "cloud")) == (0, 0)


# -- backups -------------------------------------------------------------------------------------


async def test_backups_are_kept_up_to_the_retention_and_counted(backend, store, ada):
    bob = await backend.user(store, "bob@example.org")
    assert await store.latest_backup(ada) is None and await store.list_backups(ada) == []
    made = []
    for i in range(3):
        backup, pruned = await store.insert_backup(ada, "pro", "1", f"2026-01-0{i + 1}T00:00:00Z", digest(i), 100 + i, 3)
        assert pruned == []
        made.append(backup)
    assert await store.latest_backup(ada) == await store.get_backup(ada, made[2].id)
    assert [b.id for b in await store.list_backups(ada)] == [b.id for b in reversed(made)]
    assert await store.get_backup(bob, made[0].id) is None and await store.list_backups(bob) == []
    assert await store.usage(ada, "backup") == 303 and await store.usage(ada, "cloud") == 0
    assert await store.prunable_backup_bytes(ada, 3) == 100
    assert await store.prunable_backup_bytes(ada, 2) == 201
    assert await store.prunable_backup_bytes(bob, 3) == 0

    # The quota counts the net change: the pruned backup's bytes are freed in the same write.
    fourth, pruned = await store.insert_backup(ada, "pro", "2", "t", digest(3), QUOTA - 203, 3)
    assert pruned == [digest(0)] and await store.usage(ada, "backup") == QUOTA
    assert [b.id for b in await store.list_backups(ada)] == [fourth.id, made[2].id, made[1].id]
    assert fourth == await store.latest_backup(ada)
    before = await snapshot(backend, store, ada)
    with pytest.raises(errors.QuotaExceeded):
        await store.insert_backup(ada, "pro", "2", "t", digest(4), 102, 3)  # frees 101
    with pytest.raises(errors.QuotaExceeded):
        await store.insert_backup(ada, "free", "2", "t", digest(4), 1, 10)
    assert await snapshot(backend, store, ada) == before

    with pytest.raises(errors.NotFound):
        await store.delete_backup(bob, "pro", fourth.id)
    assert await store.delete_backup(ada, "pro", fourth.id) == digest(3)
    with pytest.raises(errors.NotFound):
        await store.delete_backup(ada, "pro", fourth.id)
    assert (await store.latest_backup(ada)).id == made[2].id and await store.usage(ada, "backup") == 203
    _, pruned = await store.insert_backup(ada, "pro", "3", "t", digest(5), 1, 1)  # retention 1: all others go
    assert sorted(pruned) == sorted([digest(1), digest(2)]) and await store.usage(ada, "backup") == 1


async def test_backups_in_one_second_are_marked(backend, store, ada):
    first, _ = await store.insert_backup(ada, "pro", "1", "t", digest(1), 1, 5)
    second, _ = await store.insert_backup(ada, "pro", "1", "t", digest(2), 1, 5)
    if first.created_unix != second.created_unix:
        pytest.skip("a second boundary fell between the two")
    assert (first.shares_second, second.shares_second) == (False, True)
    assert all(b.shares_second for b in await store.list_backups(ada))
    assert all(type(b.shares_second) is bool for b in await store.list_backups(ada))


# -- references ----------------------------------------------------------------------------------


async def test_referenced_objects_are_those_of_live_records_and_backups(backend, store, ada):
    a = await store.insert_record(ada, "pro", "notes", digest("a"), 10, 100)
    b = await store.insert_record(ada, "pro", "notes", digest("b"), 20, 100)
    await store.insert_backup(ada, "pro", "1", "t", digest("k"), 30, 3)
    await store.replace_record(ada, "pro", a.id, digest("a2"), 11, None)
    await store.delete_record(ada, "pro", b.id, None)
    many = [digest(i) for i in range(1200)]  # more than one SQLite batch
    assert await store.referenced([digest("a"), digest("a2"), digest("b"), digest("k"), *many]) == {digest("a2"), digest("k")}
    assert await store.referenced([]) == set()
    assert sorted(await store.referenced_objects()) == sorted([(digest("a2"), 11), (digest("k"), 30)])


# -- concurrent writers --------------------------------------------------------------------------


async def check_consistent(backend, store, user_id: str) -> None:
    """The counters agree with the rows: usage, count, the feed's positions."""
    feed, purged = await store.changes(user_id, 0, 100_000)
    live = [r for r in feed if r.checksum is not None]
    assert await store.usage(user_id, "cloud") == sum(r.size_bytes for r in live) <= QUOTA
    assert await store.record_count(user_id) == len(live)
    seqs = [r.seq for r in feed]
    assert len(set(seqs)) == len(seqs) == len(feed)
    last = await backend.value(store, "SELECT last_seq FROM storage_record_counts WHERE user_id = ?", user_id)
    assert max(seqs, default=0) <= (last or 0)


async def test_concurrent_writes_keep_the_quota_the_cap_and_the_feed(backend, store, ada):
    stores = await backend.nodes()
    results = await asyncio.gather(*(stores[i % NODES].insert_record(ada, "pro", "notes", digest(i), 90, 8)
                                     for i in range(24)), return_exceptions=True)
    made = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, errors.QuotaExceeded) for r in results if isinstance(r, BaseException))
    assert len(made) == 8  # the record cap (720 bytes: under the quota)
    assert sorted(r.seq for r in made) == list(range(1, 9))  # no position twice, none skipped
    await check_consistent(backend, store, ada)

    results = await asyncio.gather(*(stores[i % NODES].replace_record(ada, "pro", made[0].id, digest(("r", i)), 90 + 30 * i,
                                                                      etag(made[0].checksum))
                                     for i in range(8)), return_exceptions=True)
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1  # one If-Match on one ETag: one replacement
    assert all(isinstance(r, (errors.PreconditionFailed, errors.QuotaExceeded)) for r in results if isinstance(r, BaseException))
    results = await asyncio.gather(*(stores[i % NODES].delete_record(ada, "pro", made[1].id, None) for i in range(6)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    await check_consistent(backend, store, ada)


async def test_concurrent_backups_keep_the_quota_and_the_retention(backend, store, ada):
    stores = await backend.nodes()
    results = await asyncio.gather(*(stores[i % NODES].insert_backup(ada, "pro", "1", "t", digest(i), 150, 4)
                                     for i in range(16)), return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)]  # 4 x 150 always fits
    pruned = [d for _, p in results for d in p]
    kept = await store.list_backups(ada)
    assert len(kept) == 4 and len(pruned) == 12 and len(set(pruned)) == 12
    assert await store.usage(ada, "backup") == 600
    results = await asyncio.gather(*(stores[i % NODES].delete_backup(ada, "pro", kept[0].id) for i in range(4)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert await store.usage(ada, "backup") == 450


def _hammer_in_a_process(kind: str, where: str, user_id: str, seed: int, start, out) -> None:
    """Inserts and deletes on one user's records, as fast as two stores can: (writes that took a
    feed position, quota refusals)."""
    tiers.LIMITS["pro"]["cloud_bytes"] = QUOTA

    async def go() -> tuple[int, int]:
        rng = random.Random(seed)
        b = Backend(kind, where)
        stores = await b.nodes(2)
        mine: list[str] = []
        done = refused = 0

        async def worker(store) -> None:
            nonlocal done, refused
            for i in range(60):
                try:
                    if mine and rng.random() < 0.3:
                        await store.delete_record(user_id, "pro", mine.pop(rng.randrange(len(mine))), None)
                    else:
                        mine.append((await store.insert_record(user_id, "pro", "notes", digest((seed, i, rng.random())),
                                                               rng.randint(1, 120), 10_000)).id)
                    done += 1
                except errors.QuotaExceeded:
                    refused += 1

        start.wait()
        await asyncio.gather(*(worker(stores[i % 2]) for i in range(4)))
        await b.close()
        return done, refused

    try:
        out.put(asyncio.run(go()))
    except BaseException as exc:  # told to the test, which would otherwise wait for a result
        out.put(repr(exc))
        raise


async def test_two_processes_on_one_quota(backend, store, ada):
    """Two OS processes (four writers each) fill and drain one user's quota while this one
    follows the feed: the bytes never pass it, positions are unique and gapless, and a reader
    that only asks for what is after its cursor sees the last write of every record."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_hammer_in_a_process, args=(backend.kind, backend.where, ada, p, start, out))
             for p in range(2)]
    for p in procs:
        p.start()
    await asyncio.sleep(1.5)  # both import and connect, then write at once
    start.set()
    seen: dict[str, int] = {}
    cursor, highest_usage = 0, 0

    async def follow() -> None:
        nonlocal cursor, highest_usage
        feed, _ = await store.changes(ada, cursor, 1000)
        for r in feed:
            assert r.seq > cursor
            seen[r.id] = r.seq
            cursor = r.seq
        highest_usage = max(highest_usage, await store.usage(ada, "cloud"))

    while any(p.is_alive() for p in procs) and out.qsize() < len(procs):
        await follow()
        await asyncio.sleep(0.01)
    counts = [await asyncio.to_thread(out.get, True, 120) for _ in procs]
    assert all(isinstance(c, tuple) for c in counts), counts
    for p in procs:
        await asyncio.to_thread(p.join, 30)
        assert p.exitcode == 0
    await follow()

    done, refused = sum(c[0] for c in counts), sum(c[1] for c in counts)
    assert done + refused == 2 * 4 * 60 and refused > 0  # the quota was reached
    assert highest_usage <= QUOTA
    await check_consistent(backend, store, ada)
    feed, _ = await store.changes(ada, 0, 100_000)
    assert await backend.value(store, "SELECT last_seq FROM storage_record_counts WHERE user_id = ?", ada) == done
    assert seen == {r.id: r.seq for r in feed}  # following the feed missed nothing


# -- one schema, two engines ---------------------------------------------------------------------

STORAGE_TABLES = ("users", "storage_usage", "storage_records", "storage_record_counts", "storage_backups")


async def test_storage_copied_from_sqlite_reads_the_same_on_postgresql(tmp_path, pg_url):
    """The rule of db/postgres/migrations/: tables and columns named as SQLite's (plus `n`, the
    insertion order), values carried by ops/tablecopy.py's conversions: listings, the feed and
    the latest backup read the same, and writes go on from there."""
    from adiuva_server.db.postgres import PgDatabase
    from adiuva_server.ops import tablecopy
    from adiuva_server.storage.postgres import PostgresStorageStore

    lite_backend = Backend("sqlite", str(tmp_path / "adiuva.db"))
    lite = await lite_backend.node()
    ada = await lite_backend.user(lite)
    ids = [(await lite.insert_record(ada, "pro", "notes", digest(i), i, 100)).id for i in range(5, 0, -1)]
    await lite.delete_record(ada, "pro", ids[1], None)
    for i in range(3):
        await lite.insert_backup(ada, "pro", "1", "t", digest(("b", i)), 10, 2)
    expected = [await lite.list_records(ada, None, 0, 10), await lite.changes(ada, 0, 10), await lite.list_backups(ada),
                await lite.latest_backup(ada), await lite.usage(ada, "cloud"), await lite.usage(ada, "backup"),
                await lite.record_count(ada)]
    await lite_backend.close()

    sqlite_cols = dict(tablecopy.sqlite_tables(tmp_path / "adiuva.db"))
    pg = await PgDatabase.open(pg_url)
    try:
        async with pg.pool.acquire() as conn:
            pg_cols = await tablecopy.pg_columns(conn)
            for table in STORAGE_TABLES:
                names = [c for c, _ in sqlite_cols[table]]
                assert set(pg_cols[table]) - set(names) <= {"n"}, table
                assert set(names) <= set(pg_cols[table]), table
                types = [pg_cols[table][c] for c in names]
                reader = tablecopy.connect(tmp_path / "adiuva.db", readonly=True)
                order = " ORDER BY rowid" if tablecopy._has_rowid(reader, table) else ""
                rows = reader.execute(f"SELECT {', '.join(names)} FROM {table}{order}").fetchall()
                reader.close()
                await conn.executemany(
                    f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join(f'${i + 1}' for i in range(len(names)))})",
                    [[tablecopy._to_pg(v, t) for v, t in zip(row, types)] for row in rows])
            await tablecopy._reset_sequences(conn)
        store = PostgresStorageStore(pg)
        got = [await store.list_records(ada, None, 0, 10), await store.changes(ada, 0, 10), await store.list_backups(ada),
               await store.latest_backup(ada), await store.usage(ada, "cloud"), await store.usage(ada, "backup"),
               await store.record_count(ada)]
        assert got == expected
        more = await store.insert_record(ada, "pro", "notes", digest("more"), 1, 100)
        assert more.seq == 7 and (await store.list_records(ada, None, 0, 10))[0][-1] == more
        newest, _ = await store.insert_backup(ada, "pro", "1", "t", digest("newest"), 10, 2)
        assert await store.latest_backup(ada) == newest
    finally:
        await pg.close()
