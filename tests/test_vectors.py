"""The vector store as the desktop client uses it: real server on a socket, real SQLite file,
results checked against a numpy brute force over the same data."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest

from adiuva_server import tiers
from adiuva_server.db import connect
from adiuva_server.keys import AUTH
from tests.conftest import make_settings, register, run_cli

UPSERT = "/api/v1/storage/vectors/upsert"
SEARCH = "/api/v1/storage/vectors/search"
VECTORS = "/api/v1/storage/vectors"
MAX_BATCH = 64


@pytest.fixture
def settings(data_dir):
    return make_settings(
        data_dir, default_tier="pro", vector_max_batch=MAX_BATCH, vector_max_payload_bytes=4096,
        vector_max_request_bytes=2 * 1024 * 1024,
        rate_limits={"free": 10_000, "pro": 10_000, "power": 10_000, "team": 10_000},
    )


def item(vid: str, values, payload: bytes | None = None) -> dict:
    payload = payload if payload is not None else f"sealed:{vid}".encode()
    return {"id": vid, "values": [float(x) for x in values], "payload": base64.b64encode(payload).decode(),
            "checksum": hashlib.sha256(payload).hexdigest()}


async def upsert(client, acct, items, status=200, **extra):
    resp = await client.post(UPSERT, json={"vectors": items, **extra}, headers=acct.headers)
    body = await resp.json()
    assert resp.status == status, body
    return body


async def search(client, acct, values, top_k=10, status=200, **extra):
    resp = await client.post(SEARCH, json={"values": [float(x) for x in values], "top_k": top_k, **extra},
                             headers=acct.headers)
    body = await resp.json()
    assert resp.status == status, body
    return body


def brute_force(data: np.ndarray, q: np.ndarray, k: int, metric: str) -> tuple[list[int], np.ndarray]:
    x, q = data.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        d = np.linalg.norm(x - q, axis=1)
    else:
        d = 1.0 - (x @ q) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q))
    order = np.argsort(d, kind="stable")[:k]
    return order.tolist(), d[order]


def cloud_usage(data_dir, email: str) -> int:
    conn = connect(data_dir / "adiuva.db", readonly=True)
    try:
        row = conn.execute(
            "SELECT bytes FROM storage_usage s JOIN users u ON u.id = s.user_id WHERE u.email = ? AND kind = 'cloud'",
            (email,),
        ).fetchone()
        return row[0] if row else 0
    finally:
        conn.close()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
async def test_search_equals_numpy_brute_force(client, account, metric):
    rng = np.random.default_rng(4)
    data = rng.standard_normal((300, 24)).astype(np.float32)
    for start in range(0, len(data), MAX_BATCH):
        chunk = data[start:start + MAX_BATCH]
        await upsert(client, account, [item(f"v{start + i}", row) for i, row in enumerate(chunk)], metric=metric)
    for q in rng.standard_normal((5, 24)).astype(np.float32):
        body = await search(client, account, q, top_k=10)
        ids, dists = brute_force(data, q, 10, metric)
        assert [m["id"] for m in body["matches"]] == [f"v{i}" for i in ids]
        np.testing.assert_allclose([m["distance"] for m in body["matches"]], dists, rtol=1e-4, atol=1e-5)
        first = body["matches"][0]
        assert base64.b64decode(first["payload"]) == f"sealed:{first['id']}".encode()
        assert first["checksum"] == hashlib.sha256(base64.b64decode(first["payload"])).hexdigest()


async def test_upsert_replaces_same_id_and_charges_quota_once(client, account, data_dir):
    first = await upsert(client, account, [item("a", [1, 0, 0]), item("b", [0, 1, 0])], metric="l2")
    assert (first["inserted"], first["replaced"], first["count"]) == (2, 0, 2)
    used = cloud_usage(data_dir, account.email)
    assert used == len(b"sealed:a") + len(b"sealed:b") + 2 * 3 * 4

    again = await upsert(client, account, [item("a", [0, 0, 5], b"new bytes")])
    assert (again["inserted"], again["replaced"], again["count"]) == (0, 1, 2)
    assert cloud_usage(data_dir, account.email) == used - len(b"sealed:a") + len(b"new bytes")

    matches = (await search(client, account, [0, 0, 5], top_k=5))["matches"]
    assert [m["id"] for m in matches] == ["a", "b"]
    assert matches[0]["distance"] == 0.0 and base64.b64decode(matches[0]["payload"]) == b"new bytes"


async def test_users_never_see_each_other(client, account):
    other = await register(client, "bob@example.org")
    await upsert(client, account, [item("same-id", [1, 1]), item("ada-only", [2, 2])])
    await upsert(client, other, [item("same-id", [-1, -1], b"bob's")])

    # Ada's vectors are the nearest to the query: a filter applied after the k-NN (sqlite-vec's
    # behaviour for joined tables) would leave Bob with nothing; his partition alone is searched.
    bob = (await search(client, other, [1, 1], top_k=1))["matches"]
    assert [(m["id"], base64.b64decode(m["payload"])) for m in bob] == [("same-id", b"bob's")]
    assert len((await search(client, other, [1, 1]))["matches"]) == 1
    # Bob deleting ids that only Ada holds deletes nothing of hers.
    resp = await client.delete(VECTORS, json={"ids": ["same-id", "ada-only"]}, headers=other.headers)
    assert (await resp.json())["deleted"] == 1
    assert {m["id"] for m in (await search(client, account, [1, 1]))["matches"]} == {"same-id", "ada-only"}
    assert (await search(client, other, [1, 1]))["matches"] == []
    # A different dimension in Bob's (now empty) collection is fine; Ada's stays 2-d.
    await upsert(client, other, [item("x", [1, 2, 3])])
    await search(client, account, [1, 2, 3], status=400)


def _raw(values_json: str) -> bytes:
    p = base64.b64encode(b"p").decode()
    return (f'{{"vectors": [{{"id": "a", "values": [1, 2], "payload": "{p}", "checksum": '
            f'"{hashlib.sha256(b"p").hexdigest()}"}}, {{"id": "bad", "values": {values_json}, '
            f'"payload": "{p}", "checksum": "{hashlib.sha256(b"p").hexdigest()}"}}]}}').encode()


@pytest.mark.parametrize(
    "values_json, code",
    [("[1, NaN]", "invalid_vector"), ("[Infinity, 1]", "invalid_vector"), ("[1e39, 1]", "invalid_vector"),
     ("[-1e400, 1]", "invalid_vector"), ("[]", "invalid_vector"), ("[1, 2, 3]", "dimension_mismatch"),
     # float32 sums of squares must stay finite and normal: a norm of 0 or inf broke searches
     ("[1e-30, 0]", "invalid_vector"), ("[3e38, 3e38]", "invalid_vector"),
     # numbers only: no booleans or strings taken for numbers
     ("[true, 1]", "validation_error"), ('["1", 1]', "validation_error")],
)
async def test_bad_values_are_400_and_nothing_is_written(client, account, data_dir, values_json, code):
    resp = await client.post(UPSERT, data=_raw(values_json), headers={**account.headers, "Content-Type": "application/json"})
    body = await resp.json()
    assert (resp.status, body["code"]) == (422 if code == "validation_error" else 400, code), body
    assert resp.content_type == "application/problem+json"
    assert (await search(client, account, [1, 2]))["matches"] == []  # vector "a" was not written either
    assert cloud_usage(data_dir, account.email) == 0


async def test_bad_batches_change_nothing(client, account, data_dir):
    await upsert(client, account, [item("keep", [1, 0, 0])], metric="l2")
    used = cloud_usage(data_dir, account.email)
    good = item("new", [0, 1, 0])
    bad_b64 = {**item("b", [0, 0, 1]), "payload": "not base64!!"}
    wrong_sum = {**item("c", [0, 0, 1]), "checksum": hashlib.sha256(b"other").hexdigest()}
    too_big = item("d", [0, 0, 1], b"x" * 4097)
    cases = [
        ({"vectors": [good, bad_b64]}, 400, "invalid_vector"),
        ({"vectors": [good, wrong_sum]}, 400, "checksum_mismatch"),
        ({"vectors": [good, item("e", [1, 2])]}, 400, "dimension_mismatch"),
        ({"vectors": [good, good]}, 400, "invalid_vector"),
        ({"vectors": [good, too_big]}, 413, "payload_too_large"),
        ({"vectors": [item(f"n{i}", [i, 1, 1]) for i in range(MAX_BATCH + 1)]}, 400, "invalid_vector"),
        ({"vectors": []}, 400, "invalid_vector"),
        ({"vectors": [good], "metric": "cosine"}, 400, "metric_mismatch"),
        ({"vectors": [{**good, "checksum": "abc"}]}, 422, "validation_error"),
        ({"vectors": [{**good, "values": ["x"]}]}, 422, "validation_error"),
        ({"vectors": [good], "collection": "../etc"}, 422, "validation_error"),
    ]
    for payload, status, code in cases:
        resp = await client.post(UPSERT, json=payload, headers=account.headers)
        body = await resp.json()
        assert (resp.status, body["code"]) == (status, code), (payload, body)
    matches = (await search(client, account, [0, 1, 0]))["matches"]
    assert [m["id"] for m in matches] == ["keep"]
    assert cloud_usage(data_dir, account.email) == used


async def test_search_bounds(client, account, settings):
    await upsert(client, account, [item("a", [1, 0])])
    assert len((await search(client, account, [1, 0], top_k=settings.vector_max_top_k))["matches"]) == 1
    for top_k, status in ((0, 422), (settings.vector_max_top_k + 1, 400)):
        body = await search(client, account, [1, 0], top_k=top_k, status=status)
        assert "top_k" in body["detail"]
    assert (await search(client, account, [1, 0, 0], status=400))["code"] == "dimension_mismatch"
    assert (await search(client, account, [0, 0], status=400))["code"] == "invalid_vector"  # cosine of zero
    assert (await search(client, account, [], status=400))["code"] == "invalid_vector"
    assert (await search(client, account, [1, 0], collection="none"))["matches"] == []


async def test_any_dimension_from_1_to_4096(client, account):
    await upsert(client, account, [item("one", [3.0]), item("two", [-1.0])], collection="d1", metric="l2")
    assert [m["id"] for m in (await search(client, account, [2.0], collection="d1"))["matches"]] == ["one", "two"]
    big = np.random.default_rng(1).standard_normal((2, 4096)).astype(np.float32)
    await upsert(client, account, [item("p", big[0]), item("q", big[1])], collection="d4096", metric="l2")
    matches = (await search(client, account, big[1], collection="d4096"))["matches"]
    assert [m["id"] for m in matches] == ["q", "p"] and matches[0]["distance"] == 0.0
    body = await upsert(client, account, [item("too-long", [1.0] * 4097)], collection="d4097", status=400)
    assert body["code"] == "invalid_vector"


async def test_upsert_body_limit_is_its_own(client, account):
    # Larger than the app's 1 MiB JSON limit, within ADIUVA_VECTOR_MAX_REQUEST_BYTES (2 MiB here).
    rows = np.random.default_rng(2).standard_normal((MAX_BATCH, 1024)).astype(np.float32)
    items = [item(f"r{i}", r) for i, r in enumerate(rows)]
    assert 1024 * 1024 < len(json.dumps({"vectors": items})) < 2 * 1024 * 1024
    assert (await upsert(client, account, items))["count"] == MAX_BATCH
    resp = await client.post(UPSERT, data=b" " * (2 * 1024 * 1024 + 1),
                             headers={**account.headers, "Content-Type": "application/json"})
    assert resp.status == 413 and (await resp.json())["code"] == "payload_too_large"


async def test_quota_counts_payload_and_embedding_bytes(client, account, data_dir, monkeypatch):
    monkeypatch.setitem(tiers.LIMITS["pro"], "cloud_bytes", 1000)
    per_vector = 100 + 4 * 4
    await upsert(client, account, [item(f"v{i}", [i, 1, 1, 1], b"x" * 100) for i in range(5)])
    assert cloud_usage(data_dir, account.email) == 5 * per_vector
    body = await upsert(client, account, [item(f"w{i}", [i, 2, 2, 2], b"y" * 100) for i in range(5)], status=402)
    assert body["code"] == "quota_exceeded"
    assert cloud_usage(data_dir, account.email) == 5 * per_vector
    assert len((await search(client, account, [1, 1, 1, 1]))["matches"]) == 5
    resp = await client.delete(VECTORS, json={"ids": ["v0", "v1", "unknown"]}, headers=account.headers)
    assert (await resp.json())["deleted"] == 2
    assert cloud_usage(data_dir, account.email) == 3 * per_vector


async def test_free_tier_has_no_cloud_storage(client):
    free = await register(client, "free@example.org")
    await client.app[AUTH].store.update_user(free.email, tier="free")
    body = await upsert(client, free, [item("a", [1.0])], status=402)
    assert body["code"] == "quota_exceeded"


async def test_cli_user_delete_deletes_their_vectors(client, account, data_dir):
    other = await register(client, "bob@example.org")
    await upsert(client, account, [item(f"a{i}", [i, 1, 0, 0]) for i in range(10)])
    await upsert(client, other, [item("b", [0, 1, 0, 0])])
    result = run_cli(data_dir, "user", "delete", account.email, "--yes")
    assert result.returncode == 0, result.stderr
    conn = connect(data_dir / "adiuva.db", readonly=True)
    try:
        assert [tuple(r) for r in conn.execute("SELECT item_id FROM vector_items")] == [("b",)]
        assert conn.execute("SELECT count(*) FROM vector_collections").fetchone()[0] == 1
    finally:
        conn.close()
    assert [m["id"] for m in (await search(client, other, [0, 1, 0, 0]))["matches"]] == ["b"]


async def test_routes_are_in_the_openapi_document(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    assert {"/api/v1/storage/vectors/upsert", "/api/v1/storage/vectors/search", "/api/v1/storage/vectors"} <= set(doc["paths"])


async def test_acknowledged_upsert_survives_kill_9(server_process):
    import signal

    import aiohttp

    server = server_process(ADIUVA_DEFAULT_TIER="pro")
    async with aiohttp.ClientSession(server.url) as http:
        r = await http.post("/api/v1/auth/register", json={"email": "kill@example.org", "password": "correct horse battery"})
        tokens = await r.json()
        headers = {"Authorization": f"Bearer {tokens['access_token']}"}
        r = await http.post(UPSERT, json={"vectors": [item("kept", [0.5, 0.25])]}, headers=headers)
        assert r.status == 200, await r.text()
    server.stop(signal.SIGKILL)

    again = server_process(ADIUVA_DEFAULT_TIER="pro")
    async with aiohttp.ClientSession(again.url) as http:
        r = await http.post(SEARCH, json={"values": [0.5, 0.25]}, headers=headers)
        assert [m["id"] for m in (await r.json())["matches"]] == ["kept"]


def test_vector_limits_come_from_the_environment():
    from adiuva_server.config import Settings
    from adiuva_server.errors import ConfigError

    s = Settings.from_env({"ADIUVA_VECTOR_MAX_TOP_K": "500", "ADIUVA_VECTOR_MAX_BATCH": "10",
                           "ADIUVA_VECTOR_MAX_PAYLOAD_BYTES": "0", "ADIUVA_VECTOR_MAX_REQUEST_BYTES": "2097152"})
    assert (s.vector_max_top_k, s.vector_max_batch, s.vector_max_payload_bytes, s.vector_max_request_bytes) == (
        500, 10, 0, 2 * 1024 * 1024)
    with pytest.raises(ConfigError, match="ADIUVA_VECTOR_MAX_TOP_K"):
        Settings.from_env({"ADIUVA_VECTOR_MAX_TOP_K": "4097"})  # sqlite-vec caps k at 4096


async def test_queries_outside_float32_limits_are_400_not_500(client, account):
    await upsert(client, account, [item("a", [1, 0, 0, 0])])
    for values in ([1e-30, 0, 0, 0], [1e16, 0, 0, 0]):
        await search(client, account, values, status=400)
    resp = await client.post(SEARCH, json={"values": [1, 0, 0, 0], "top_k": True}, headers=account.headers)
    assert resp.status == 422
    assert [m["id"] for m in (await search(client, account, [1e-14, 0, 0, 0]))["matches"]] == ["a"]


# -- values_b64: base64 of little-endian float32 beside JSON numbers (issue 15) ---------------

def b64(values) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def item_b64(vid: str, values, payload: bytes | None = None) -> dict:
    out = item(vid, [0.0], payload)
    del out["values"]
    return {**out, "values_b64": b64(values)}


@pytest.mark.parametrize("metric", ["l2", "cosine"])
async def test_values_b64_round_trip_equals_json_numbers(client, account, metric):
    rng = np.random.default_rng(21)
    data = rng.standard_normal((100, 16)).astype(np.float32)
    # Both encodings in one batch, and in separate collections: the same vectors either way.
    await upsert(client, account, [item_b64(f"v{i}", r) if i % 2 else item(f"v{i}", r) for i, r in enumerate(data[:50])],
                 metric=metric, collection="mixed")
    await upsert(client, account, [item_b64(f"v{i}", r) for i, r in enumerate(data[50:], 50)], metric=metric,
                 collection="mixed")
    for start in (0, 50):
        await upsert(client, account, [item(f"v{i}", r) for i, r in enumerate(data[start:start + 50], start)],
                     metric=metric, collection="json")
    for q in rng.standard_normal((4, 16)).astype(np.float32):
        ids, dists = brute_force(data, q, 10, metric)
        resp = await client.post(SEARCH, json={"values_b64": b64(q), "top_k": 10, "collection": "mixed"},
                                 headers=account.headers)
        by_b64 = (await resp.json())["matches"]
        by_json = (await search(client, account, q, collection="json"))["matches"]
        assert [m["id"] for m in by_b64] == [m["id"] for m in by_json] == [f"v{i}" for i in ids]
        assert [m["distance"] for m in by_b64] == [m["distance"] for m in by_json]
        np.testing.assert_allclose([m["distance"] for m in by_b64], dists, rtol=1e-5, atol=1e-6)
    # The stored vector is exactly the float32 sent: itself at distance 0.
    resp = await client.post(SEARCH, json={"values_b64": b64(data[7]), "top_k": 1, "collection": "mixed"},
                             headers=account.headers)
    assert [(m["id"], m["distance"]) for m in (await resp.json())["matches"]] == [("v7", 0.0)]


def _b64_of(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "vector, status, code",
    [
        ({"values_b64": "not base64!"}, 400, "invalid_vector"),
        ({"values_b64": _b64_of(b"\x00" * 6)}, 400, "invalid_vector"),  # not 4 bytes a value
        ({"values_b64": ""}, 400, "invalid_vector"),  # no values
        ({"values_b64": _b64_of(np.array([1, np.nan], "<f4").tobytes())}, 400, "invalid_vector"),
        ({"values_b64": _b64_of(np.array([np.inf, 1], "<f4").tobytes())}, 400, "invalid_vector"),
        ({"values_b64": _b64_of(np.array([1e16, 1], "<f4").tobytes())}, 400, "invalid_vector"),  # > 1e15
        ({"values_b64": _b64_of(np.array([1e-30, 0], "<f4").tobytes())}, 400, "invalid_vector"),  # cosine zero
        ({"values_b64": _b64_of(np.ones(4097, "<f4").tobytes())}, 400, "invalid_vector"),
        ({"values_b64": _b64_of(np.ones(3, "<f4").tobytes())}, 400, "dimension_mismatch"),
        ({"values_b64": _b64_of(np.ones(2, "<f4").tobytes()), "values": [1.0, 2.0]}, 422, "validation_error"),
        ({}, 422, "validation_error"),  # neither
        ({"values_b64": 12}, 422, "validation_error"),
    ],
)
async def test_bad_values_b64_are_problems_and_nothing_is_written(client, account, data_dir, vector, status, code):
    p = b"p"
    good = item_b64("a", [1.0, 2.0], p)
    bad = {"id": "bad", "payload": base64.b64encode(p).decode(), "checksum": hashlib.sha256(p).hexdigest(), **vector}
    resp = await client.post(UPSERT, json={"vectors": [good, bad]}, headers=account.headers)
    body = await resp.json()
    assert (resp.status, body["code"]) == (status, code), body
    assert resp.content_type == "application/problem+json"
    if status == 400:
        assert body["errors"][0]["loc"][:3] == ["body", "vectors", 1]
    assert (await search(client, account, [1, 2]))["matches"] == []  # vector "a" was not written either
    assert cloud_usage(data_dir, account.email) == 0
    # The same value as a query is refused the same way (status and code).
    await upsert(client, account, [good])
    query = {k: v for k, v in vector.items()}
    resp = await client.post(SEARCH, json={**query, "top_k": 3}, headers=account.headers)
    assert (resp.status, (await resp.json())["code"]) == (status, code)


async def test_values_b64_is_in_the_openapi_document(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    text = json.dumps(doc)
    assert "values_b64" in text and "little-endian float32" in text
    schemas = doc["components"]["schemas"]
    for name in ("VectorIn", "SearchRequest"):
        assert {"values", "values_b64"} <= set(schemas[name]["properties"]), name


# -- exactness at every size, isolation, size on disk (issue 15) ------------------------------

def _exact(data: np.ndarray, q: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """float64 brute force over the float32 vectors as stored (l2)."""
    d = np.linalg.norm(data.astype(np.float64) - q.astype(np.float64), axis=1)
    order = np.argsort(d, kind="stable")[:k]
    return [f"v{i}" for i in order], d[order]


async def _fill(client, acct, data: np.ndarray, collection: str = "default", metric: str = "l2",
                payload: bytes | None = None) -> None:
    for start in range(0, len(data), MAX_BATCH):
        rows = data[start:start + MAX_BATCH]
        await upsert(client, acct, [item_b64(f"v{start + i}", r, payload) for i, r in enumerate(rows)],
                     collection=collection, metric=metric)


async def _store_fill(client, acct, data: np.ndarray, collection: str = "default", metric: str = "l2") -> None:
    """Large collections straight through the store (the HTTP path is covered above)."""
    from adiuva_server.keys import VECTORS as SERVICE
    from adiuva_server.vectors.store import NewVector

    me = await (await client.get("/api/v1/auth/me", headers=acct.headers)).json()
    store = client.app[SERVICE].store
    for start in range(0, len(data), 1000):
        batch = []
        for i, r in enumerate(data[start:start + 1000], start):
            p = f"sealed:v{i}".encode()
            batch.append(NewVector(f"v{i}", r.astype(np.float32).tobytes(), p, hashlib.sha256(p).hexdigest()))
        await store.upsert(me["id"], "pro", collection, metric, data.shape[1], batch)


@pytest.mark.parametrize("n", [3, 500, 12_000])
async def test_search_is_exact_at_every_size(client, account, n):
    from adiuva_server.keys import VECTORS as SERVICE

    rng = np.random.default_rng(n)
    data = rng.standard_normal((n, 24)).astype(np.float32)
    await (_fill if n <= 500 else _store_fill)(client, account, data)
    store = client.app[SERVICE].store
    queries = rng.standard_normal((12, 24)).astype(np.float32)
    for i, q in enumerate(queries):
        if i == 1 and store._coarse is not None:
            await store._coarse  # from here on the quantized copy names the candidates
        body = await search(client, account, q, top_k=10)
        ids, dists = _exact(data, q, 10)
        assert [m["id"] for m in body["matches"]] == ids[: min(10, n)]
        np.testing.assert_allclose([m["distance"] for m in body["matches"]], dists, rtol=1e-12)
    (entry,) = [store.mirror.peek(k) for k in store.mirror.keys()]
    assert (entry.coarse is not None) == (n >= 8192)


async def test_users_are_isolated_on_every_search_path(client, account, settings):
    """Same collection name, same ids, same vectors: a large collection (quantized copy), a
    small one (in-memory copy) and one read from the database (cache off) never mix."""
    from adiuva_server.keys import VECTORS as SERVICE

    bob = await register(client, "bob@example.org")
    await client.app[AUTH].store.update_user(bob.email, tier="pro")
    rng = np.random.default_rng(23)
    data = rng.standard_normal((9000, 8)).astype(np.float32)
    await _store_fill(client, account, data)
    await _fill(client, bob, data[:40], payload=b"bob's")
    store = client.app[SERVICE].store
    for q in data[:3]:
        for _ in range(2):
            ada = (await search(client, account, q))["matches"]
            bobs = (await search(client, bob, q))["matches"]
            assert all(m["payload"] == base64.b64encode(f"sealed:{m['id']}".encode()).decode() for m in ada)
            assert {m["payload"] for m in bobs} == {base64.b64encode(b"bob's").decode()}
            assert [m["id"] for m in bobs] == _exact(data[:40], q, 10)[0]
            assert [m["id"] for m in ada] == _exact(data, q, 10)[0]
            if store._coarse is not None:
                await store._coarse
    mirror, store.mirror = store.mirror, None  # cache off: both read from the database
    try:
        assert {m["payload"] for m in (await search(client, bob, data[0]))["matches"]} == {base64.b64encode(b"bob's").decode()}
        assert [m["id"] for m in (await search(client, account, data[0]))["matches"]] == _exact(data, data[0], 10)[0]
    finally:
        store.mirror = mirror


async def test_many_small_users_cost_less_than_twice_the_raw_vectors(tmp_path):
    """200 users x 3 vectors of 384: the file grows by less than 2 x 1,536 B a vector (sqlite-vec
    chunks cost ~16.9 KB a vector here)."""
    from adiuva_server.auth.store import SQLiteAccountStore
    from adiuva_server.db import Database
    from adiuva_server.vectors.store import NewVector, SQLiteVectorStore

    path = tmp_path / "small.db"
    db = await Database.open(path, synchronous="normal")
    users = [(await SQLiteAccountStore(db).create_user(f"u{i}@example.org", "x", "team", False)).id for i in range(200)]
    await db.close()
    before = path.stat().st_size
    db = await Database.open(path, synchronous="normal")
    store, rng = SQLiteVectorStore(db), np.random.default_rng(24)
    p = b"p" * 32
    for uid in users:
        rows = rng.standard_normal((3, 384)).astype(np.float32)
        await store.upsert(uid, "team", "default", "cosine", 384,
                           [NewVector(f"v{i}", r.tobytes(), p, hashlib.sha256(p).hexdigest()) for i, r in enumerate(rows)])
    await db.close()  # checkpoints the WAL into the file
    per_vector = (path.stat().st_size - before) / 600
    assert per_vector < 2 * 1536, per_vector


async def test_interleaved_writers_read_back_exactly(client, account):
    """Three users writing in turns: each collection's rows are spread out (read by index, not
    by rowid range); each reads back exactly its own, from memory and from the database."""
    from adiuva_server.keys import VECTORS as SERVICE

    others = [await register(client, f"u{i}@example.org") for i in range(2)]
    for o in others:
        await client.app[AUTH].store.update_user(o.email, tier="pro")
    accts = [account, *others]
    rng = np.random.default_rng(25)
    data = [rng.standard_normal((80, 6)).astype(np.float32) for _ in accts]
    for start in range(0, 80, 10):
        for acct, x in zip(accts, data, strict=True):
            await upsert(client, acct, [item(f"v{i}", r, f"{acct.email}:{i}".encode())
                                        for i, r in enumerate(x[start:start + 10], start)], metric="l2")
    store = client.app[SERVICE].store
    for use_cache in (True, False):
        mirror = store.mirror
        store.mirror = mirror if use_cache else None
        try:
            for acct, x in zip(accts, data, strict=True):
                q = rng.standard_normal(6).astype(np.float32)
                matches = (await search(client, acct, q))["matches"]
                assert [m["id"] for m in matches] == _exact(x, q, 10)[0]
                assert {base64.b64decode(m["payload"]).split(b":")[0] for m in matches} == {acct.email.encode()}
        finally:
            store.mirror = mirror
