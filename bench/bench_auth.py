"""Walking-skeleton benchmarks (issue 2). Not a test; prints ratios against baselines measured
in the same run, because absolute times drift on shared machines.

1. Requests/s of an authenticated GET /api/v1/auth/me (token check, live tier lookup, rate
   limiter, JSON) against a bare aiohttp JSON handler: both a single server process started the
   same way, driven by the same load generator in another process, alternating B-A-B-A-B.
   Target ratio >= 0.5.
2. p99 latency of GET /api/v1/health while 20 logins hash concurrently (argon2id), against
   health alone. Target p99 < 50 ms.

    python bench/bench_auth.py [--seconds 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BARE_APP = """
import sys
from aiohttp import web
async def me(request):
    return web.json_response({"id": "98f221aa-859f-42b2-a6bd-38b9a0899ab1", "email": "ada@example.org",
                              "tier": "free", "created_at": "2026-11-26T02:43:51Z"})
app = web.Application()
app.router.add_get("/api/v1/auth/me", me)
app.router.add_get("/api/v1/health", me)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str) -> None:
    for _ in range(300):
        try:
            with urllib.request.urlopen(url + "/api/v1/health", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def start_bare() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", BARE_APP, str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return proc, url


def start_adiuva(data_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "ADIUVA_DATA_DIR": data_dir, "ADIUVA_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO),
           # The limiter runs (its cost is measured) but must not answer 429 during the bench.
           "ADIUVA_RATE_LIMITS": "free=1000000000,pro=1000000000,power=1000000000,team=1000000000"}
    proc = subprocess.Popen([sys.executable, "-m", "adiuva_server", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return proc, url


async def health_latencies(url: str, n: int, interval: float) -> list[float]:
    host, port, req = loadgen.request_bytes(url + "/api/v1/health")
    reader, writer = await asyncio.open_connection(host, port)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        writer.write(req)
        await loadgen._read_response(reader)
        out.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(interval)
    writer.close()
    return out


async def login_storm(url: str, email: str, password: str, stop: asyncio.Event, concurrency: int) -> int:
    body = json.dumps({"email": email, "password": password}).encode()
    host, port, req = loadgen.request_bytes(url + "/api/v1/auth/login", "POST", {"Content-Type": "application/json"}, body)
    done = 0

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port)
        while not stop.is_set():
            writer.write(req)
            status = await loadgen._read_response(reader)
            assert status == 200, status
            done += 1
        writer.close()

    await asyncio.gather(*[one() for _ in range(concurrency)])
    return done


def runs(results: list[dict]) -> str:
    return ", ".join(f"{r['rps']:.0f}" for r in results)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        bare, bare_url = start_bare()
        adiuva, url = start_adiuva(tmp)
        try:
            tokens = post(url + "/api/v1/auth/register", {"email": "bench@example.org", "password": "bench password"})
            auth = {"Authorization": f"Bearer {tokens['access_token']}"}
            await loadgen.run(bare_url + "/api/v1/auth/me", 1, args.connections)  # warm-up
            await loadgen.run(url + "/api/v1/auth/me", 1, args.connections, auth)
            base, ours = [], []
            for _ in range(args.rounds):
                base.append(await loadgen.run(bare_url + "/api/v1/auth/me", args.seconds, args.connections))
                ours.append(await loadgen.run(url + "/api/v1/auth/me", args.seconds, args.connections, auth))
            base.append(await loadgen.run(bare_url + "/api/v1/auth/me", args.seconds, args.connections))
            assert all(r["non_200"] == 0 for r in base + ours), (base, ours)
            b = statistics.mean(r["rps"] for r in base)
            o = statistics.mean(r["rps"] for r in ours)
            print(f"bare aiohttp JSON handler : {b:8.0f} req/s  (runs: {runs(base)})")
            print(f"authenticated /auth/me    : {o:8.0f} req/s  (runs: {runs(ours)})")
            print(f"ratio auth/me vs bare     : {o / b:.2f}   (target >= 0.5)")

            quiet = await health_latencies(url, 300, 0.01)
            stop = asyncio.Event()
            storm = asyncio.create_task(login_storm(url, "bench@example.org", "bench password", stop, 20))
            await asyncio.sleep(0.5)
            t0 = time.perf_counter()
            loaded = await health_latencies(url, 300, 0.01)
            stop.set()
            logins = await storm
            rate = logins / (time.perf_counter() - t0 + 0.5)
            print(f"health alone              : p50 {pct(quiet, .5):6.2f} ms  p99 {pct(quiet, .99):6.2f} ms")
            print(f"health during 20 logins   : p50 {pct(loaded, .5):6.2f} ms  p99 {pct(loaded, .99):6.2f} ms"
                  f"  (target p99 < 50 ms; {rate:.0f} logins/s completed)")
        finally:
            for proc in (bare, adiuva):
                proc.terminate()
                proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
