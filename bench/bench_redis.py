"""Shared state on Redis (issue 11). Not a test; prints ratios against a baseline measured in the
same run, because absolute times drift on shared machines.

1. Requests/s of an authenticated, rate-limited GET /api/v1/auth/me on a server whose rate-limit
   store is Redis (REDIS_URL, a local redis-server started here) against the same server with the
   in-memory store: two `adiuva serve` processes started the same way, driven by the same load
   generator, alternating M-R-M-R-M. 8 accounts per server, 4 connections each; every tier's
   limit raised (ADIUVA_RATE_LIMITS) so that every request is counted and answered 200. Also
   the CPU time spent per request (the server; with Redis, the server and redis-server), which
   a loaded machine distorts less than requests/s.
2. Publish-to-receive latency of a change notice over Redis pub/sub (two client connections, as
   two server processes), against a round trip (PING) on the same connection.

    python bench/bench_redis.py [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loadgen  # noqa: E402

ACCOUNTS = 8
CONNECTIONS_EACH = 4
LIMITS = "free=1000000,pro=1000000,power=1000000,team=1000000"


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str]:
    port = loadgen.free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--bind", "127.0.0.1",
                             "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return proc, f"redis://127.0.0.1:{port}/0"


def register(url: str, email: str) -> str:
    req = urllib.request.Request(url + "/api/v1/auth/register", json.dumps({"email": email, "password": "bench password"}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as resp:
        return json.load(resp)["access_token"]


def cpu_seconds(*pids: int) -> float:
    """User + system CPU time the processes used so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def load(url: str, tokens: list[str], seconds: float, pids: tuple[int, ...] = ()) -> dict:
    """loadgen.run's closed loop, with each connection on one of several accounts; with `pids`,
    also the CPU those processes spent per answered request."""
    ok, other, latencies = 0, 0, []
    deadline = time.perf_counter() + seconds

    async def worker(token: str) -> None:
        nonlocal ok, other
        host, port, req = loadgen.request_bytes(url + "/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (t0 := time.perf_counter()) < deadline:
                writer.write(req)
                status = await loadgen._read_response(reader)
                latencies.append(time.perf_counter() - t0)
                ok, other = (ok + 1, other) if status == 200 else (ok, other + 1)
        finally:
            writer.close()

    start, cpu = time.perf_counter(), [cpu_seconds(p) for p in pids]
    await asyncio.gather(*[worker(t) for t in tokens for _ in range(CONNECTIONS_EACH)])
    elapsed, cpu = time.perf_counter() - start, [cpu_seconds(p) - c for p, c in zip(pids, cpu)]
    latencies.sort()
    return {"rps": ok / elapsed, "non_200": other, "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(len(latencies) * 0.99)] * 1e3, "cpu_us": [c / max(ok, 1) * 1e6 for c in cpu]}


async def notice_latency(redis_url: str, n: int = 500) -> tuple[list[float], list[float]]:
    from adiuva_server.cluster.redis import RedisNotifier, connect

    pub_client, sub_client = connect(redis_url), connect(redis_url)
    publisher, subscriber = RedisNotifier(pub_client), RedisNotifier(sub_client)
    arrived, received = asyncio.Event(), [0.0]

    def heard(_: str) -> None:
        received[0] = time.perf_counter()
        arrived.set()

    await subscriber.subscribe("bench", heard)
    notices, pings = [], []
    try:
        for _ in range(n):
            arrived.clear()
            t0 = time.perf_counter()
            await publisher.publish("bench", '{"user": "u"}')
            await arrived.wait()
            notices.append(received[0] - t0)
            t0 = time.perf_counter()
            await pub_client.ping()
            pings.append(time.perf_counter() - t0)
    finally:
        await publisher.close()
        await subscriber.close()
        await pub_client.aclose()
        await sub_client.aclose()
    return sorted(notices), sorted(pings)


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] * 1e3


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        redis, redis_url = start_redis(tmp)
        memory, memory_url = loadgen.start_server(tmp / "memory", ADIUVA_RATE_LIMITS=LIMITS)
        shared, shared_url = loadgen.start_server(tmp / "redis", ADIUVA_RATE_LIMITS=LIMITS, REDIS_URL=redis_url)
        try:
            tokens = {u: [register(u, f"bench{i}@example.org") for i in range(ACCOUNTS)] for u in (memory_url, shared_url)}
            for u in (memory_url, shared_url):
                await load(u, tokens[u], 1)  # warm-up
            base, ours = [], []
            for _ in range(args.rounds):
                base.append(await load(memory_url, tokens[memory_url], args.seconds, (memory.pid,)))
                ours.append(await load(shared_url, tokens[shared_url], args.seconds, (shared.pid, redis.pid)))
            base.append(await load(memory_url, tokens[memory_url], args.seconds, (memory.pid,)))
            assert all(r["non_200"] == 0 for r in base + ours), (base, ours)
            b, o = statistics.mean(r["rps"] for r in base), statistics.mean(r["rps"] for r in ours)

            def runs(rs):
                return ", ".join(f"{r['rps']:.0f} (p50 {r['p50_ms']:.2f} / p99 {r['p99_ms']:.2f} ms)" for r in rs)

            print(f"/auth/me, in-memory rate limits : {b:8.0f} req/s  runs: {runs(base)}")
            print(f"/auth/me, Redis rate limits     : {o:8.0f} req/s  runs: {runs(ours)}")
            print(f"ratio Redis vs in-memory        : {o / b:.2f}")
            bc = statistics.mean(r["cpu_us"][0] for r in base)
            oc, rc = (statistics.mean(r["cpu_us"][i] for r in ours) for i in (0, 1))
            print(f"CPU per request                 : in-memory {bc:.0f} us (server); Redis {oc:.0f} us server + "
                  f"{rc:.0f} us redis-server; ratio {bc / (oc + rc):.2f}")
            notices, pings = await notice_latency(redis_url)
            print(f"change notice publish->receive  : p50 {pct(notices, .5):.3f} ms  p99 {pct(notices, .99):.3f} ms  "
                  f"(a PING round trip: p50 {pct(pings, .5):.3f} ms; ratio {pct(notices, .5) / pct(pings, .5):.2f})")
        finally:
            for proc in (memory, shared, redis):
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
