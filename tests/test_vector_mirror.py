"""The in-memory numpy mirror of large collections (vectors/mirror.py): exact results, never
stale, never another user's, bounded memory. Real server on a socket, real SQLite file."""

from __future__ import annotations

import numpy as np
import pytest

from adiuva_server.keys import VECTORS
from adiuva_server.vectors.mirror import MirrorEntry, VectorMirror
from tests.conftest import make_settings, register, run_cli
from tests.test_vectors import VECTORS as DELETE_URL
from tests.test_vectors import brute_force, item, search, upsert

MIN = 40  # collections of at least this many vectors are mirrored in these tests


@pytest.fixture
def settings(data_dir):
    return make_settings(
        data_dir, default_tier="pro", vector_max_batch=200, vector_max_payload_bytes=4096,
        vector_cache_min_vectors=MIN, vector_cache_bytes=1024**2,
        rate_limits={"free": 10_000, "pro": 10_000, "power": 10_000, "team": 10_000},
    )


def store_of(client):
    return client.app[VECTORS].store


async def user_id(client, acct) -> str:
    return (await (await client.get("/api/v1/auth/me", headers=acct.headers)).json())["id"]


async def warm(client, acct, name: str = "default") -> bool:
    """Load the caller's collection into the mirror now; True when a current copy is there."""
    store = store_of(client)
    coll = await store.get_collection(await user_id(client, acct), name)
    return await store.warm(coll)


def mirrored(client) -> set:
    return set(store_of(client).mirror.keys())


@pytest.mark.parametrize("metric", ["l2", "cosine"])
async def test_mirrored_search_equals_numpy_brute_force(client, account, metric):
    rng = np.random.default_rng(11)
    data = rng.standard_normal((150, 24)).astype(np.float32)
    await upsert(client, account, [item(f"v{i}", row) for i, row in enumerate(data)], metric=metric)
    assert await warm(client, account)
    for q in rng.standard_normal((5, 24)).astype(np.float32):
        ids, dists = brute_force(data, q, 10, metric)
        body = await search(client, account, q, top_k=10)
        assert [m["id"] for m in body["matches"]] == [f"v{i}" for i in ids]
        np.testing.assert_allclose([m["distance"] for m in body["matches"]], dists, rtol=1e-4, atol=1e-5)
        assert body["matches"][0]["payload"]  # payloads come back verbatim
    assert len(mirrored(client)) == 1


async def test_upsert_and_delete_are_seen_at_once(client, account):
    rng = np.random.default_rng(12)
    data = rng.standard_normal((60, 8)).astype(np.float32)
    await upsert(client, account, [item(f"v{i}", row, payload=b"old") for i, row in enumerate(data)], metric="l2")
    assert await warm(client, account)
    q = np.full(8, 5.0, dtype=np.float32)
    before = (await search(client, account, q, top_k=3))["matches"]

    # Replace v0 with the query itself: the very next search must return it first, new payload.
    await upsert(client, account, [item("v0", q, payload=b"new")])
    first = (await search(client, account, q, top_k=3))["matches"][0]
    assert (first["id"], first["distance"]) == ("v0", 0.0)
    assert first["payload"] == "bmV3"  # base64 of b"new"
    assert await warm(client, account)  # the mirror again, at the new version
    first = (await search(client, account, q, top_k=3))["matches"][0]
    assert (first["id"], first["distance"], first["payload"]) == ("v0", 0.0, "bmV3")

    # Delete it: gone at once, from the mirror too.
    resp = await client.delete(DELETE_URL, json={"ids": ["v0"]}, headers=account.headers)
    assert resp.status == 200, await resp.text()
    after = (await search(client, account, q, top_k=3))["matches"]
    assert "v0" not in [m["id"] for m in after]
    assert await warm(client, account)
    again = (await search(client, account, q, top_k=3))["matches"]  # numpy (float64 re-scoring)
    assert [(m["id"], m["payload"]) for m in again] == [(m["id"], m["payload"]) for m in after]  # sqlite-vec
    np.testing.assert_allclose([m["distance"] for m in again], [m["distance"] for m in after], rtol=1e-5)
    assert [m["id"] for m in after[:2]] == [m["id"] for m in before if m["id"] != "v0"][:2]


async def test_users_never_see_each_other_through_the_mirror(client, account):
    other = await register(client, "bob@example.org")
    rng = np.random.default_rng(13)
    a = rng.standard_normal((50, 6)).astype(np.float32)
    # Same collection name, same vectors, different payloads.
    await upsert(client, account, [item(f"v{i}", row, payload=b"alice") for i, row in enumerate(a)])
    await upsert(client, other, [item(f"v{i}", row, payload=b"bob") for i, row in enumerate(a)])
    assert await warm(client, account) and await warm(client, other)
    assert len(mirrored(client)) == 2
    for q in a[:3]:
        assert {m["payload"] for m in (await search(client, account, q))["matches"]} == {"YWxpY2U="}
        assert {m["payload"] for m in (await search(client, other, q))["matches"]} == {"Ym9i"}


async def test_reused_collection_ids_never_match_an_old_copy(client, account):
    """Collection ids are reused by SQLite after the last one is dropped; versions are not."""
    rng = np.random.default_rng(14)
    old = rng.standard_normal((50, 4)).astype(np.float32)
    await upsert(client, account, [item(f"o{i}", row) for i, row in enumerate(old)], metric="l2")
    assert await warm(client, account)
    (key,) = mirrored(client)
    resp = await client.delete(DELETE_URL, json={"ids": [f"o{i}" for i in range(50)]}, headers=account.headers)
    assert resp.status == 200  # the collection is dropped with its last vector

    new = rng.standard_normal((50, 4)).astype(np.float32)
    await upsert(client, account, [item(f"n{i}", row) for i, row in enumerate(new)], metric="l2")
    coll = await store_of(client).get_collection(await user_id(client, account), "default")
    assert (coll.user_id, coll.id) == key  # the id was reused: only the version tells them apart
    ids, _ = brute_force(new, new[0], 5, "l2")
    assert [m["id"] for m in (await search(client, account, new[0], top_k=5))["matches"]] == [f"n{i}" for i in ids]
    assert await warm(client, account)
    assert [m["id"] for m in (await search(client, account, new[0], top_k=5))["matches"]] == [f"n{i}" for i in ids]


async def test_deleted_user_is_never_served_from_the_mirror(client, account, data_dir):
    other = await register(client, "bob@example.org")
    rng = np.random.default_rng(15)
    data = rng.standard_normal((50, 4)).astype(np.float32)
    await upsert(client, account, [item(f"a{i}", row) for i, row in enumerate(data)])
    await upsert(client, other, [item(f"b{i}", row) for i, row in enumerate(data)])
    store = store_of(client)
    alice = await store.get_collection(await user_id(client, account), "default")
    assert await warm(client, account) and await warm(client, other)

    result = run_cli(data_dir, "user", "delete", account.email, "--yes")  # another process
    assert result.returncode == 0, result.stderr
    # A caller holding the old collection object still gets nothing: the version is read with
    # the user id inside the search's own transaction.
    assert await store.search(alice, data[0].tobytes(), 5) == []
    assert {m["id"][0] for m in (await search(client, other, data[0]))["matches"]} == {"b"}


async def test_collections_over_the_budget_stay_in_sqlite_vec(client, account):
    # 1 MiB budget: 700 x 384 float32 is ~1.1 MB, so it is never mirrored, and search still works.
    rng = np.random.default_rng(16)
    data = rng.standard_normal((700, 384)).astype(np.float32)
    for start in range(0, 700, 200):
        await upsert(client, account, [item(f"v{i}", data[i]) for i in range(start, min(700, start + 200))], metric="l2")
    assert not await warm(client, account)
    ids, _ = brute_force(data, data[3], 5, "l2")
    assert [m["id"] for m in (await search(client, account, data[3], top_k=5))["matches"]] == [f"v{i}" for i in ids]
    assert mirrored(client) == set()


def test_top_k_is_exact_where_the_expansion_alone_is_not():
    """|x|^2 - 2 x.q in float32 loses the small differences between far-off near neighbours;
    the error bound and the float64 re-scoring keep the result exact."""
    rng = np.random.default_rng(17)
    n, d = 5000, 64
    base = np.full(d, 1000.0, dtype=np.float32)
    x = (base + rng.standard_normal((n, d)).astype(np.float32) * 1e-2).astype(np.float32)
    entry = MirrorEntry.build(1, np.arange(n) * 7 + 3, x)
    for q in (base + rng.standard_normal((20, d)).astype(np.float32) * 1e-2).astype(np.float32):
        exact = np.linalg.norm(x.astype(np.float64) - q.astype(np.float64), axis=1)
        want = np.argsort(exact, kind="stable")[:10]
        rowids, d2 = entry.top_k(q, 10)
        assert rowids.tolist() == (want * 7 + 3).tolist()
        np.testing.assert_allclose(np.sqrt(d2), exact[want], rtol=1e-9)
    assert entry.top_k(x[0], n + 5)[0].shape == (n,)  # k larger than the collection


def test_lru_by_bytes_and_versions():
    rng = np.random.default_rng(18)

    def entry(version: int, n: int = 100) -> MirrorEntry:
        return MirrorEntry.build(version, np.arange(n), rng.standard_normal((n, 16)).astype(np.float32))

    one = entry(1).nbytes
    mirror = VectorMirror(max_bytes=2 * one + 10, min_vectors=1)
    assert mirror.put(("u1", 1), entry(1)) and mirror.put(("u2", 2), entry(1))
    assert mirror.get(("u1", 1), 1) is not None  # u1 is now the most recently used
    assert mirror.put(("u3", 3), entry(1))
    assert set(mirror.keys()) == {("u1", 1), ("u3", 3)} and mirror.nbytes <= mirror.max_bytes
    assert mirror.get(("u1", 1), 2) is None  # another version: dropped, never served
    assert ("u1", 1) not in mirror.keys()
    assert mirror.put(("u3", 3), entry(5)) and not mirror.put(("u3", 3), entry(4))  # never go back
    assert not mirror.put(("big", 9), entry(1, n=1000))  # larger than the whole budget
    assert not VectorMirror(0, 1).enabled
