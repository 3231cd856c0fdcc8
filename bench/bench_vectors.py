"""Vector search benchmark (issue 4). Not a test: run it by hand.

    python bench/bench_vectors.py                      # full size: 100k target + 900k others
    python bench/bench_vectors.py --target 20000 --others 180000 --api-vectors 5000   # reduced

What it measures, all in one run on one SQLite file:
1. the target user's k-NN search through the store while the database holds only that user's
   vectors, against numpy brute force over the same vectors: "store" is the server's path (the
   in-memory numpy mirror of vectors/mirror.py once loaded, with the server's default settings),
   "sqlite-vec" the same store without the mirror;
2. the same search after other users have added `--others` vectors (cost must not grow);
3. a user with `--api-vectors` vectors searching through the HTTP API on a real socket;
4. file size per vector: for the whole file, and for 1,000 users holding 3 vectors each;
5. upsert rates: through the store (1000 per transaction) and through the API.

numpy baselines over the target's vectors, float32:
- "numpy" : the plain brute force, ||x - q|| for every row, then argpartition;
- "numpy-blas": |x|^2 - 2 x.q with |x|^2 precomputed (a matrix-vector product), the fastest
  exact numpy path; reported so the ratio is honest against both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adiuva_server.auth.store import SQLiteAccountStore  # noqa: E402
from adiuva_server.db import Database  # noqa: E402
from adiuva_server.config import Settings  # noqa: E402
from adiuva_server.vectors.mirror import VectorMirror  # noqa: E402
from adiuva_server.vectors.store import CHUNK_SIZE, NewVector, SQLiteVectorStore  # noqa: E402

BATCH = 1000


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def fmt(samples: list[float]) -> str:
    return f"p50 {pct(samples, 50) * 1e3:7.2f} ms  p95 {pct(samples, 95) * 1e3:7.2f} ms"


def payload_for(i: int) -> tuple[bytes, str]:
    p = i.to_bytes(8, "little") * 4  # 32 "encrypted" bytes
    return p, hashlib.sha256(p).hexdigest()


async def load(store: SQLiteVectorStore, user_id: str, n: int, dim: int, rng: np.random.Generator,
               metric: str, keep: bool = False) -> tuple[float, np.ndarray | None]:
    """Upsert n random vectors for user_id in batches; returns (seconds, the vectors if keep)."""
    kept = np.empty((n, dim), dtype=np.float32) if keep else None
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        rows = rng.standard_normal((min(BATCH, n - start), dim), dtype=np.float32)
        if kept is not None:
            kept[start:start + len(rows)] = rows
        batch = []
        for j, row in enumerate(rows):
            p, c = payload_for(start + j)
            batch.append(NewVector(f"v{start + j}", row.tobytes(), p, c))
        await store.upsert(user_id, "team", "default", metric, dim, batch)
    return time.perf_counter() - t0, kept


async def time_store(store, coll, queries, k) -> list[float]:
    await store.search(coll, queries[0].tobytes(), k)  # warm the page cache
    out = []
    for q in queries:
        t = time.perf_counter()
        await store.search(coll, q.tobytes(), k)
        out.append(time.perf_counter() - t)
    return out


def time_numpy(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[list[float], list[float]]:
    plain, blas = [], []
    norms = np.einsum("ij,ij->i", x, x)
    for q in queries:
        t = time.perf_counter()
        d = np.linalg.norm(x - q, axis=1)
        np.argsort(d[np.argpartition(d, k)[:k]])
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        d = norms - 2.0 * (x @ q)
        np.argsort(d[np.argpartition(d, k)[:k]])
        blas.append(time.perf_counter() - t)
    return plain, blas


def check_exact(store_ids: list[str], x: np.ndarray, q: np.ndarray, k: int) -> bool:
    d = np.linalg.norm(x - q, axis=1)
    return store_ids == [f"v{i}" for i in np.argsort(d)[:k]]


def file_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


async def small_users(tmp: Path, users: int, per_user: int, dim: int) -> tuple[int, float]:
    path = tmp / "small.db"
    db = await Database.open(path, synchronous="normal")
    accounts, store = SQLiteAccountStore(db), SQLiteVectorStore(db)
    base = file_bytes(path)
    rng = np.random.default_rng(7)
    for u in range(users):
        user = await accounts.create_user(f"small{u}@bench", "x", "team", False)
        await load(store, user.id, per_user, dim, rng, "cosine")
    await db.close()  # checkpoints the WAL
    return file_bytes(path) - base, (file_bytes(path) - base) / (users * per_user)


async def api_run(tmp: Path, n: int, dim: int, queries: np.ndarray, k: int) -> tuple[float, list[float]]:
    import aiohttp
    from aiohttp import web

    from adiuva_server.app import create_app
    from adiuva_server.config import Settings

    settings = Settings.from_env(
        {}, data_dir=tmp / "api", env="test", default_tier="team", sqlite_synchronous="normal",
        rate_limits={t: 10**9 for t in ("free", "pro", "power", "team")},
    )
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"{url}/auth/register", json={"email": "api@bench.example", "password": "bench password 1"})
            headers = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
            rng = np.random.default_rng(3)
            t0 = time.perf_counter()
            for start in range(0, n, 500):
                rows = rng.standard_normal((min(500, n - start), dim), dtype=np.float32)
                items = []
                for j, row in enumerate(rows):
                    p, c = payload_for(start + j)
                    items.append({"id": f"v{start + j}", "values": row.tolist(), "payload": base64.b64encode(p).decode(), "checksum": c})
                r = await http.post(f"{url}/storage/vectors/upsert", json={"vectors": items, "metric": "cosine"}, headers=headers)
                assert r.status == 200, await r.text()
            upload = time.perf_counter() - t0
            out = []
            for i, q in enumerate([queries[0], *queries]):
                body = {"values": q.tolist(), "top_k": k}
                t = time.perf_counter()
                r = await http.post(f"{url}/storage/vectors/search", json=body, headers=headers)
                matches = (await r.json())["matches"]
                if i:
                    out.append(time.perf_counter() - t)
                assert r.status == 200 and len(matches) == k
            return upload, out
    finally:
        await runner.cleanup()


async def main(a: argparse.Namespace) -> None:
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="adiuva-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    label = "FULL SIZE" if (a.target, a.others) == (100_000, 900_000) else "REDUCED SIZE"
    print(f"== bench_vectors [{label}] target={a.target} others={a.others} in {a.other_users} users "
          f"dim={a.dim} k={a.k} metric={a.metric} queries={a.queries} chunk_size={CHUNK_SIZE} cpus={os.cpu_count()}")
    path = tmp / "bench.db"
    db = await Database.open(path, synchronous="normal")
    mirror = VectorMirror(Settings.vector_cache_bytes, Settings.vector_cache_min_vectors)
    accounts, store, vec_store = SQLiteAccountStore(db), SQLiteVectorStore(db, mirror), SQLiteVectorStore(db)
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((a.queries, a.dim), dtype=np.float32)
    target = await accounts.create_user("target@bench", "x", "team", False)

    secs, x = await load(store, target.id, a.target, a.dim, rng, a.metric, keep=True)
    print(f"upsert via store  : {a.target / secs:9.0f} vectors/s ({a.target} in {secs:.1f} s, batches of {BATCH})")
    coll = await store.get_collection(target.id, "default")
    if a.metric == "cosine":  # the numpy baseline then works on the unit vectors, like the store
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    t0 = time.perf_counter()
    warm = await store.warm(coll)
    print(f"mirror load        : {time.perf_counter() - t0:.2f} s, in memory: {warm} ({mirror.nbytes / 1e6:.0f} MB)")
    exact = check_exact([m.id for m in await store.search(coll, queries[0].tobytes(), a.k)], x, queries[0], a.k)
    exact_vec = check_exact([m.id for m in await vec_store.search(coll, queries[0].tobytes(), a.k)], x, queries[0], a.k)
    alone = await time_store(store, coll, queries, a.k)
    alone_vec = await time_store(vec_store, coll, queries, a.k)
    plain, blas = time_numpy(x, queries, a.k)
    print(f"store, {a.target} total   : {fmt(alone)}   (top-{a.k} ids equal numpy's: {exact})")
    print(f"sqlite-vec only    : {fmt(alone_vec)}   (top-{a.k} ids equal numpy's: {exact_vec})")
    print(f"numpy brute force  : {fmt(plain)}")
    print(f"numpy-blas         : {fmt(blas)}")
    print(f"ratio store/numpy p50      : {pct(alone, 50) / pct(plain, 50):.2f}x  (target <= 2)")
    print(f"ratio store/numpy-blas p50 : {pct(alone, 50) / pct(blas, 50):.2f}x  (issue 4 target <= 2)")
    print(f"ratio sqlite-vec/numpy-blas p50 : {pct(alone_vec, 50) / pct(blas, 50):.2f}x")

    if a.others:
        per = a.others // a.other_users
        t0 = time.perf_counter()
        for u in range(a.other_users):
            other = await accounts.create_user(f"other{u}@bench", "x", "team", False)
            await load(store, other.id, per if u < a.other_users - 1 else a.others - per * u, a.dim, rng, a.metric)
        secs = time.perf_counter() - t0
        print(f"upsert via store  : {a.others / secs:9.0f} vectors/s ({a.others} more for {a.other_users} users in {secs:.1f} s)")
        crowded = await time_store(store, coll, queries, a.k)
        plain2, _ = time_numpy(x, queries, a.k)
        total = a.target + a.others
        print(f"store, {total} total  : {fmt(crowded)}")
        print(f"numpy brute force  : {fmt(plain2)}  (again, same moment)")
        print(f"ratio store/numpy p50      : {pct(crowded, 50) / pct(plain2, 50):.2f}x")
        print(f"ratio {total}-total / {a.target}-total p50 : {pct(crowded, 50) / pct(alone, 50):.2f}  (target <= 1.2)")
    await db.close()
    size = file_bytes(path)
    n = a.target + a.others
    print(f"file size          : {size / 1e6:.1f} MB for {n} vectors of dim {a.dim} = {size / n:.0f} B/vector "
          f"(raw float32 {4 * a.dim} B + 32 B payload)")

    if a.small_users:
        grown, per_vec = await small_users(tmp, a.small_users, 3, a.dim)
        print(f"small users        : {a.small_users} users x 3 vectors of dim {a.dim}: {grown / 1e6:.1f} MB, {per_vec:.0f} B/vector")

    if a.api_vectors:
        upload, e2e = await api_run(tmp, a.api_vectors, a.dim, queries, a.k)
        print(f"upsert via API     : {a.api_vectors / upload:9.0f} vectors/s (batches of 500, JSON over HTTP)")
        print(f"API search, {a.api_vectors} vectors: {fmt(e2e)}  end to end (target p50 < 10 ms)")
    if not a.dir and not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=int, default=100_000, help="vectors of the searched user")
    ap.add_argument("--others", type=int, default=900_000, help="vectors held by other users")
    ap.add_argument("--other-users", type=int, default=9, help="how many other users hold them")
    ap.add_argument("--small-users", type=int, default=1000, help="users with 3 vectors each (file size)")
    ap.add_argument("--api-vectors", type=int, default=10_000, help="vectors of the API user")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--metric", choices=("l2", "cosine"), default="l2")
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--dir", help="work directory (default: a temp dir, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    asyncio.run(main(ap.parse_args()))
