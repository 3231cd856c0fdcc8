"""The vector store contract on both backends: SQLite (`SQLiteVectorStore`) and PostgreSQL with
pgvector (`PostgresVectorStore`, on the real PostgreSQL of tests/servers_postgres.py). Each
"node" is a store on its own connection(s) to one database, with its own in-memory copies, as
several `adiuva serve` processes would be. Results are checked against a float64 brute force."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from adiuva_server import errors, tiers
from adiuva_server.db import Database
from adiuva_server.db.postgres import PgDatabase
from adiuva_server.db.postgres import database as pgdb
from adiuva_server.vectors.mirror import VectorMirror
from adiuva_server.vectors.postgres import PostgresVectorStore
from adiuva_server.vectors.store import Collection, NewVector, SQLiteVectorStore, unit_rows

BUDGET = 64 * 2**20

# Until the accounts migration (0001) lands on PostgreSQL, the tests make the two tables the
# vector migration relies on; test-only, never a migration.
_MINIMAL_ACCOUNTS = """
CREATE TABLE IF NOT EXISTS users (id text PRIMARY KEY, email text NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS storage_usage (
    user_id text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind    text NOT NULL,
    bytes   bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    PRIMARY KEY (user_id, kind)
);
"""


def _accounts_migration_bundled() -> bool:
    return any(version == 1 for version, _, _ in pgdb.migrations())


async def _create_minimal_accounts(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_MINIMAL_ACCOUNTS)
    finally:
        await conn.close()


@dataclass
class Backend:
    name: str
    where: str  # a file path (SQLite) or a URL (PostgreSQL)
    opened: list[Any] = field(default_factory=list)

    async def node(self, cached: bool = True) -> Any:
        """A store on its own connections, with its own in-memory copies (or none)."""
        mirror = VectorMirror(BUDGET, 1) if cached else None
        if self.name == "sqlite":
            db = await Database.open(self.where, synchronous="normal")
            store = SQLiteVectorStore(db, mirror)
        else:
            db = await PgDatabase.open(self.where, min_size=1, max_size=4)
            store = PostgresVectorStore(db, mirror)
        self.opened.append((store, db))
        return store

    async def add_user(self, store: Any, email: str) -> str:
        if self.name == "sqlite":
            from adiuva_server.auth.store import SQLiteAccountStore

            return (await SQLiteAccountStore(store.db).create_user(email, "x", "team", False)).id
        if importlib.util.find_spec("adiuva_server.auth.postgres") is not None and _accounts_migration_bundled():
            from adiuva_server.auth import postgres as pg_accounts  # the accounts helper's store

            return (await pg_accounts.PostgresAccountStore(store.db).create_user(email, "x", "team", False)).id
        uid = str(uuid.uuid4())
        await store.db.execute("INSERT INTO users (id, email) VALUES ($1, $2)", uid, email)
        return uid

    async def delete_user(self, store: Any, user_id: str) -> None:
        if self.name == "sqlite":
            async with store.db.write() as conn:
                await conn.execute("DELETE FROM users WHERE id = ?", (user_id,))
        else:
            await store.db.execute("DELETE FROM users WHERE id = $1", user_id)

    async def usage(self, store: Any, user_id: str) -> int:
        if self.name == "sqlite":
            row = await store.db.fetchone("SELECT bytes FROM storage_usage WHERE user_id = ? AND kind = 'cloud'", (user_id,))
            return row[0] if row else 0
        return await store.db.fetchval("SELECT bytes FROM storage_usage WHERE user_id = $1 AND kind = 'cloud'", user_id) or 0

    async def close(self) -> None:
        for store, db in reversed(self.opened):
            await store.close()
            await db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_where(request, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "vectors.db")
    return request.getfixturevalue("pg_where")


@pytest.fixture
async def backend(backend_where) -> AsyncIterator[Backend]:
    b = Backend(*backend_where)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def pg_where(pg_url) -> tuple[str, str]:
    if not _accounts_migration_bundled():
        asyncio.run(_create_minimal_accounts(pg_url))
    return "postgresql", pg_url


@pytest.fixture
async def pg_backend(pg_where) -> AsyncIterator[Backend]:
    b = Backend(*pg_where)
    try:
        yield b
    finally:
        await b.close()


def vectors(x: np.ndarray, prefix: str = "v", payload: bytes | None = None, start: int = 0) -> list[NewVector]:
    out = []
    for i, row in enumerate(x, start):
        p = payload if payload is not None else f"sealed:{prefix}{i}".encode()
        out.append(NewVector(f"{prefix}{i}", np.asarray(row, dtype=np.float32).tobytes(), p, hashlib.sha256(p).hexdigest()))
    return out


async def fill(store, user_id: str, x: np.ndarray, name: str = "default", metric: str = "l2", **kw) -> None:
    for start in range(0, len(x), 1000):
        await store.upsert(user_id, "team", name, metric, x.shape[1], vectors(x[start:start + 1000], start=start, **kw))


def exact(x: np.ndarray, q: np.ndarray, k: int, metric: str = "l2") -> tuple[list[str], np.ndarray]:
    """float64 brute force over the vectors as stored (cosine: unit float32 rows), ties by
    insertion order."""
    if metric == "cosine":
        x, q = unit_rows(x), unit_rows(q)
    d = np.linalg.norm(x.astype(np.float64) - q.astype(np.float64), axis=1)
    order = np.argsort(d, kind="stable")[:k]
    return [f"v{i}" for i in order], (d[order] ** 2 / 2 if metric == "cosine" else d[order])


async def search(store, user_id: str, q: np.ndarray, k: int = 10, name: str = "default"):
    """As the service does it: the collection first (per request), then the search."""
    coll = await store.get_collection(user_id, name)
    return [] if coll is None else await store.search(coll, np.asarray(q, dtype=np.float32).tobytes(), k)


def no_scan(store) -> None:
    """Make the database scan fail: a search must come from the in-memory copy."""
    async def refuse(*_a):
        raise AssertionError("searched the database, not the in-memory copy")

    if isinstance(store, PostgresVectorStore):
        store._scan = refuse


# -- exact results --------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("cached", [True, False], ids=["copy", "database"])
async def test_search_equals_float64_brute_force(backend, metric, cached):
    store = await backend.node(cached)
    ada = await backend.add_user(store, "ada@example.org")
    rng = np.random.default_rng(41)
    x = rng.standard_normal((1500, 24)).astype(np.float32)
    await fill(store, ada, x, metric=metric)
    if cached:
        assert await store.warm(await store.get_collection(ada, "default"))
        no_scan(store)
    for q in rng.standard_normal((8, 24)).astype(np.float32):
        for k in (1, 10, 100):
            got = await search(store, ada, q, k)
            ids, dists = exact(x, q, k, metric)
            assert [m.id for m in got] == ids
            np.testing.assert_allclose([m.distance for m in got], dists, rtol=1e-9, atol=1e-12)
            assert all(m.payload == f"sealed:{m.id}".encode() for m in got)


@pytest.mark.parametrize("cached", [True, False], ids=["copy", "database"])
@pytest.mark.parametrize("data", ["sphere", "offset"])
async def test_exact_where_float32_distances_are_not(backend, cached, data):
    """Distances that float32 cannot tell apart: every vector at distance 1 +- 1e-8 from the
    query (sphere; pgvector's float32 sums misorder them), or far from the origin and close
    together (offset; |x|^2 - 2 x.q in float32 misorders them). The answers still equal the
    float64 brute force."""
    store = await backend.node(cached)
    ada = await backend.add_user(store, "ada@example.org")
    rng = np.random.default_rng(42)
    n, d = 3000, 64
    if data == "sphere":
        x = unit_rows(rng.standard_normal((n, d)))
        queries = (rng.standard_normal((6, d)) * 1e-30).astype(np.float32)
    else:
        x = (1000.0 + rng.standard_normal((n, d)) * 1e-2).astype(np.float32)
        queries = (1000.0 + rng.standard_normal((6, d)) * 1e-2).astype(np.float32)
    await fill(store, ada, x)
    if cached:
        assert await store.warm(await store.get_collection(ada, "default"))
        no_scan(store)
    misordered = 0
    for q in queries:
        got = await search(store, ada, q, 10)
        ids, dists = exact(x, q, 10)
        assert [m.id for m in got] == ids
        np.testing.assert_allclose([m.distance for m in got], dists, rtol=1e-12)
        if backend.name == "postgresql":
            raw = await store.db.fetch("SELECT item_id FROM vector_items ORDER BY embedding <-> $1, vec_rowid LIMIT 10", q)
            misordered += [r[0] for r in raw] != ids
    if backend.name == "postgresql" and data == "sphere":
        assert misordered, "pgvector's float32 order was already exact: this data does not test the re-scoring"


async def test_ties_come_in_insertion_order(backend):
    store = await backend.node(cached=False)
    ada = await backend.add_user(store, "ada@example.org")
    x = np.repeat(np.random.default_rng(43).standard_normal((5, 8)).astype(np.float32), 40, axis=0)
    await fill(store, ada, x)
    for k in (1, 10, 60):
        assert [m.id for m in await search(store, ada, x[0], k)] == exact(x, x[0], k)[0]


# -- isolation ------------------------------------------------------------------------------

@pytest.mark.parametrize("cached", [True, False], ids=["copy", "database"])
async def test_users_never_see_each_other(backend, cached):
    store = await backend.node(cached)
    ada, bob = await backend.add_user(store, "ada@example.org"), await backend.add_user(store, "bob@example.org")
    rng = np.random.default_rng(44)
    x = rng.standard_normal((200, 8)).astype(np.float32)
    await fill(store, ada, x, payload=b"ada's")
    await fill(store, bob, x[:30], payload=b"bob's")  # same name, same ids, same vectors
    if cached:
        for uid in (ada, bob):
            assert await store.warm(await store.get_collection(uid, "default"))
    for q in x[:5]:
        assert {m.payload for m in await search(store, ada, q)} == {b"ada's"}
        bobs = await search(store, bob, q, 100)
        assert {m.payload for m in bobs} == {b"bob's"} and [m.id for m in bobs] == exact(x[:30], q, 100)[0]
    # Bob's own collection object, given Ada's collection id: nothing of hers.
    hers = await store.get_collection(ada, "default")
    forged = Collection(hers.id, "default", hers.dimension, hers.metric, hers.count, bob)
    assert await store.search(forged, x[0].tobytes(), 10) == []
    # Bob deleting ids that only Ada holds deletes nothing of hers.
    assert await store.delete(bob, "team", "default", ["v100", "v1"]) == 1
    assert len(await search(store, ada, x[0], 300)) == 200
    assert await backend.usage(store, ada) == 200 * (len(b"ada's") + 4 * 8)


async def test_a_deleted_user_is_never_served(backend):
    store = await backend.node()
    ada, bob = await backend.add_user(store, "ada@example.org"), await backend.add_user(store, "bob@example.org")
    x = np.random.default_rng(45).standard_normal((100, 4)).astype(np.float32)
    await fill(store, ada, x)
    await fill(store, bob, x)
    hers = await store.get_collection(ada, "default")
    assert await store.warm(hers)
    await backend.delete_user(store, ada)  # as the CLI or another node would
    assert await store.search(hers, x[0].tobytes(), 5) == []
    assert await store.get_collection(ada, "default") is None
    assert len(await search(store, bob, x[0], 5)) == 5


# -- writes: all or nothing, quotas, limits -------------------------------------------------

async def test_upserts_replace_by_id_and_charge_the_quota_once(backend):
    store = await backend.node()
    ada = await backend.add_user(store, "ada@example.org")
    first = await store.upsert(ada, "team", "default", "l2", 3, vectors([[1, 0, 0], [0, 1, 0]], payload=b"12345"))
    assert (first.inserted, first.replaced, first.collection.count) == (2, 0, 2)
    assert await backend.usage(store, ada) == 2 * (5 + 12)
    again = await store.upsert(ada, "team", "default", None, 3, vectors([[0, 0, 5]], payload=b"longer payload"))
    assert (again.inserted, again.replaced, again.collection.count) == (0, 1, 2)
    assert await backend.usage(store, ada) == (5 + 12) + (14 + 12)
    got = await search(store, ada, [0, 0, 5])
    assert [(m.id, m.distance, m.payload) for m in got][0] == ("v0", 0.0, b"longer payload")
    assert await store.delete(ada, "team", "default", ["v0", "nope"]) == 1
    assert await backend.usage(store, ada) == 5 + 12


async def test_refused_writes_change_nothing(backend, monkeypatch):
    store = await backend.node()
    ada = await backend.add_user(store, "ada@example.org")
    await store.upsert(ada, "team", "default", "l2", 4, vectors(np.eye(4)[:2], payload=b"x" * 100))
    used = await backend.usage(store, ada)
    coll = await store.get_collection(ada, "default")
    with pytest.raises(errors.DimensionMismatch):
        await store.upsert(ada, "team", "default", None, 3, vectors([[1, 2, 3]]))
    with pytest.raises(errors.MetricMismatch):
        await store.upsert(ada, "team", "default", "cosine", 4, vectors([[1, 2, 3, 4]]))
    monkeypatch.setitem(tiers.LIMITS["pro"], "cloud_bytes", used + 150)
    with pytest.raises(errors.QuotaExceeded):  # two of 116 bytes: over by one, so neither
        await store.upsert(ada, "pro", "default", None, 4, vectors(np.eye(4)[2:], prefix="n", payload=b"y" * 100))
    with pytest.raises(errors.QuotaExceeded):  # the free tier has no cloud storage
        await store.upsert(ada, "free", "other", None, 4, vectors(np.eye(4)[2:]))
    assert await backend.usage(store, ada) == used
    after = await store.get_collection(ada, "default")
    assert (after.count, await store.get_collection(ada, "other")) == (2, None)
    if backend.name == "postgresql":
        assert after.version == coll.version  # nothing written, nothing moved on
    assert sorted(m.id for m in await search(store, ada, [1, 0, 0, 0])) == ["v0", "v1"]


async def test_an_emptied_collection_frees_its_name(backend):
    store = await backend.node()
    ada = await backend.add_user(store, "ada@example.org")
    await store.upsert(ada, "team", "c", "l2", 2, vectors([[1, 2], [3, 4]]))
    assert await store.delete(ada, "team", "c", ["v0", "v1"]) == 2
    assert await store.get_collection(ada, "c") is None
    r = await store.upsert(ada, "team", "c", "cosine", 3, vectors([[1, 2, 3]]))
    assert (r.collection.dimension, r.collection.metric, r.inserted) == (3, "cosine", 1)
    assert [m.id for m in await search(store, ada, [1, 2, 3], name="c")] == ["v0"]
    assert await backend.usage(store, ada) == len(b"sealed:v0") + 12


# -- several nodes on one database ----------------------------------------------------------

async def test_a_write_on_one_node_counts_on_the_next_search_of_another(backend):
    a, b = await backend.node(), await backend.node()
    ada = await backend.add_user(a, "ada@example.org")
    rng = np.random.default_rng(46)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    await fill(a, ada, x)
    q = np.full(16, 3.0, dtype=np.float32)
    assert await b.warm(await b.get_collection(ada, "default"))  # b holds a copy
    assert [m.id for m in await search(b, ada, q)] == exact(x, q, 10)[0]

    await a.upsert(ada, "team", "default", None, 16, vectors([q], prefix="new", payload=b"from a"))
    first = (await search(b, ada, q))[0]
    assert (first.id, first.distance, first.payload) == ("new0", 0.0, b"from a")

    await a.upsert(ada, "team", "default", None, 16, vectors([q], prefix="new", payload=b"replaced on a"))
    assert (await search(b, ada, q))[0].payload == b"replaced on a"

    assert await a.delete(ada, "team", "default", ["new0", "v0"]) == 2
    got = await search(b, ada, q, 300)
    assert [m.id for m in got] == [i for i in exact(x, q, 300)[0] if i != "v0"]

    # b's own writes move its copy forward (no reload) and are seen by a at once.
    assert await b.warm(await b.get_collection(ada, "default"))
    await b.upsert(ada, "team", "default", None, 16, vectors([q * 2], prefix="b"))
    no_scan(b)
    assert (await search(b, ada, q * 2))[0].id == "b0"
    assert (await search(a, ada, q * 2))[0].id == "b0"


async def test_concurrent_writers_on_two_nodes_keep_count_and_quota(backend):
    a, b = await backend.node(), await backend.node()
    ada = await backend.add_user(a, "ada@example.org")
    rng = np.random.default_rng(47)
    batches = [rng.standard_normal((20, 8)).astype(np.float32) for _ in range(12)]
    # All into one collection that none of them has created yet.
    await asyncio.gather(*(
        (a if i % 2 else b).upsert(ada, "team", "default", "l2", 8, vectors(x, prefix=f"b{i}-", payload=b"p" * 10))
        for i, x in enumerate(batches)
    ))
    coll = await a.get_collection(ada, "default")
    assert coll.count == 240
    assert await backend.usage(a, ada) == 240 * (10 + 32)
    everything = np.concatenate(batches)
    got = await search(b, ada, everything[0], 240)
    assert len(got) == 240 and len({m.id for m in got}) == 240


async def test_a_restarted_node_answers_at_once_and_loads_in_the_background(backend):
    first = await backend.node()
    ada = await backend.add_user(first, "ada@example.org")
    rng = np.random.default_rng(48)
    x = rng.standard_normal((5000, 32)).astype(np.float32)
    await fill(first, ada, x)
    fresh = await backend.node()  # empty cache, as after a restart
    warming = fresh.start_warm_up()
    q = rng.standard_normal(32).astype(np.float32)
    assert [m.id for m in await search(fresh, ada, q)] == exact(x, q, 10)[0]  # whatever the warm-up's state
    await warming
    assert fresh.mirror.peek((ada, (await fresh.get_collection(ada, "default")).id)) is not None
    no_scan(fresh)
    assert [m.id for m in await search(fresh, ada, q)] == exact(x, q, 10)[0]


async def test_postgres_search_never_waits_for_a_copy(pg_backend):
    """On PostgreSQL a missing copy is loaded in the background: the search scans meanwhile
    (SQLite loads it within the search's own read transaction, on a reader thread)."""
    backend = pg_backend
    store = await backend.node()
    ada = await backend.add_user(store, "ada@example.org")
    x = np.random.default_rng(49).standard_normal((2000, 16)).astype(np.float32)
    await fill(store, ada, x)
    store.mirror.discard((ada, (await store.get_collection(ada, "default")).id))
    got = await search(store, ada, x[5])
    assert got[0].id == "v5" and store._loading  # answered; the load is under way
    await asyncio.gather(*store._loading.values())
    coll = await store.get_collection(ada, "default")
    assert store.mirror.peek((ada, coll.id)).version == coll.version


async def test_a_copy_catches_up_with_other_nodes_by_what_changed(pg_backend):
    """Node b's copy, stale after node a's inserts, replacements and deletes, is moved forward by
    reading only the rows written since its version (and all ids), then answers exactly."""
    backend = pg_backend
    a, b = await backend.node(), await backend.node()
    ada = await backend.add_user(a, "ada@example.org")
    rng = np.random.default_rng(51)
    live = {f"v{i}": r for i, r in enumerate(rng.standard_normal((3000, 16)).astype(np.float32))}
    await fill(a, ada, np.stack(list(live.values())))
    b.reload_backoff = 0.0  # every stale search starts a load (the test waits for each)
    assert await b.warm(await b.get_collection(ada, "default"))
    assert b.loads == {"full": 1, "delta": 0}
    for step in range(3):
        changed = {f"v{i}": r for i, r in zip(range(100 * step, 100 * step + 50),
                                              rng.standard_normal((50, 16)).astype(np.float32), strict=True)}
        added = {f"n{step}-{i}": r for i, r in enumerate(rng.standard_normal((20, 16)).astype(np.float32))}
        gone = [f"v{i}" for i in range(2000 + 10 * step, 2010 + 10 * step)]
        batch = [NewVector(k, v.tobytes(), b"p", hashlib.sha256(b"p").hexdigest()) for k, v in {**changed, **added}.items()]
        await a.upsert(ada, "team", "default", None, 16, batch)
        assert await a.delete(ada, "team", "default", gone) == 10
        live.update(changed)
        live.update(added)
        for k in gone:
            del live[k]
        ids, xs = list(live), np.stack(list(live.values()))
        q = rng.standard_normal(16).astype(np.float32)
        want = [ids[i] for i in np.argsort(np.linalg.norm(xs.astype(np.float64) - q, axis=1), kind="stable")[:20]]
        assert [m.id for m in await search(b, ada, q, 20)] == want  # stale copy: the database answers
        await asyncio.gather(*b._loading.values())  # b catches up meanwhile
        no_scan(b)
        assert [m.id for m in await search(b, ada, q, 20)] == want
        del b._scan  # the class's own again
    assert b.loads == {"full": 1, "delta": 3}


async def test_compose_builds_the_pgvector_store_for_a_database_url(pg_backend, tmp_path):
    backend = pg_backend
    from adiuva_server.compose import open_services
    from adiuva_server.config import Settings

    settings = Settings.from_env({"DATABASE_URL": backend.where, "ADIUVA_SINGLE_NODE": "true"},
                                 data_dir=tmp_path / "data", env="test")
    (tmp_path / "data").mkdir()
    settings = settings.with_secret()
    async with open_services(settings) as services:
        store = services.vectors.store
        assert isinstance(store, PostgresVectorStore)
        ada = await backend.add_user(store, "ada@example.org")
        await store.upsert(ada, "team", "default", "l2", 2, vectors([[1, 0], [0, 1]]))
        assert [m.id for m in await services.vectors.search(ada, "default", [1.0, 0.1], 1)] == ["v0"]


# -- the HTTP API on PostgreSQL ---------------------------------------------------------------

@pytest.fixture
async def pg_client(aiohttp_client, pg_where, data_dir):
    from adiuva_server.app import create_app
    from tests.conftest import make_settings

    settings = make_settings(data_dir, database_url=pg_where[1], single_node=True, default_tier="pro", vector_max_batch=64,
                             rate_limits={"free": 10_000, "pro": 10_000, "power": 10_000, "team": 10_000})
    return await aiohttp_client(create_app(settings))


async def pg_register(client, email: str):
    from adiuva_server.keys import VECTORS
    from tests.conftest import register

    from adiuva_server.keys import AUTH

    acct = await register(client, email)
    if client.app[AUTH].store.__class__.__name__ != "PostgresAccountStore":
        # The app's accounts are in SQLite (until compose puts them on PostgreSQL): mirror the id.
        me = await (await client.get("/api/v1/auth/me", headers=acct.headers)).json()
        extra = ", password_hash, created_at) VALUES ($1, $2, 'x', 'mirror')" if _accounts_migration_bundled() \
            else ") VALUES ($1, $2)"
        await client.app[VECTORS].store.db.execute(f"INSERT INTO users (id, email{extra}", me["id"], email)
    return acct


async def test_the_api_on_postgresql_is_exact_isolated_and_all_or_nothing(pg_client):
    from tests.test_vectors import brute_force, item, search as api_search, upsert as api_upsert

    client = pg_client
    ada, bob = await pg_register(client, "ada@example.org"), await pg_register(client, "bob@example.org")
    rng = np.random.default_rng(50)
    data = rng.standard_normal((200, 12)).astype(np.float32)
    for start in range(0, 200, 64):
        await api_upsert(client, ada, [item(f"v{i}", r) for i, r in enumerate(data[start:start + 64], start)])
    await api_upsert(client, bob, [item("v0", data[0], b"bob's")])
    for q in rng.standard_normal((4, 12)).astype(np.float32):
        for _ in range(2):  # the database's scan, then (loaded meanwhile) the copy
            body = await api_search(client, ada, q, top_k=10)
            ids, dists = brute_force(data, q, 10, "cosine")
            assert [m["id"] for m in body["matches"]] == [f"v{i}" for i in ids]
            np.testing.assert_allclose([m["distance"] for m in body["matches"]], dists, rtol=1e-5, atol=1e-6)
            await asyncio.sleep(0.05)
    assert [m["payload"] for m in (await api_search(client, bob, data[1]))["matches"]] == ["Ym9iJ3M="]
    # A bad vector in a batch: 400, nothing written (not even the good ones before it).
    bad = {**item("bad", data[0]), "values": [1.0] * 11}
    resp = await client.post("/api/v1/storage/vectors/upsert", json={"vectors": [item("new", data[0]), bad]},
                             headers=ada.headers)
    assert (resp.status, (await resp.json())["code"]) == (400, "dimension_mismatch")
    assert "new" not in [m["id"] for m in (await api_search(client, ada, data[0], top_k=100))["matches"]]
    resp = await client.delete("/api/v1/storage/vectors", json={"ids": ["v0", "v1"]}, headers=bob.headers)
    assert (await resp.json())["deleted"] == 1
    assert len((await api_search(client, ada, data[0], top_k=100))["matches"]) == 100
