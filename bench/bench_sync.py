"""Benchmark: a desktop client's first sync of N records (default 10,000 of 2 KiB) through the
bulk routes, against the one-request-per-record path, same run, same server.

- bulk: `POST /api/v1/storage/records/batch` 1,000 records a request up; a second device then
  reads `GET /api/v1/storage/changes?include_data=true&limit=1000` pages down.
- baseline: `POST /api/v1/storage/records` once per record up; the second device reads the
  feed without data (1,000 a page) and `GET /api/v1/storage/records/{id}` once per record.
- each side has its own user; every byte read back is compared with what was sent.
- the event loop: a probe process asks `GET /api/v1/health` every 20 ms while each side runs,
  and while 3 of the largest batches (1,000 records of 12 KiB, ~16 MiB bodies) go up and down;
  its p99 and worst latency show what parsing and inlining them costs everybody else.

The per-record path would hit the tier's rate limit (200 requests a minute for team) at once:
this bench raises every tier's limit (ADIUVA_RATE_LIMITS) for both sides, so the baseline
measures the server, not the limiter. Requests are sent one at a time, as one client does.
Usage: python bench/bench_sync.py [--records 10000] [--size 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402

BATCH = 1000
PAGE = 1000
PROBE_SECONDS = 0.02
BIG_BATCHES = 3
UNLIMITED = "free=1000000,pro=1000000,power=1000000,team=1000000"






class Probe:
    """/health latencies while some work is going on, measured from another process (the
    bench's own JSON and base64 work would otherwise show up as the server's)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []

    async def during(self, work):
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--probe", self.url, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        assert child.stdout is not None and child.stdin is not None
        await child.stdout.readline()  # it has started
        try:
            return await work
        finally:
            child.stdin.close()  # stop
            out, _ = await child.communicate()
            self.latencies = [float(x) for x in out.split()]

    def summary(self) -> str:
        lat = sorted(self.latencies)
        if not lat:
            return "no samples"
        return (f"/health p50 {lat[len(lat) // 2] * 1000:.1f} ms, p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms, "
                f"max {lat[-1] * 1000:.1f} ms ({len(lat)} samples)")


def probe(url: str) -> None:
    """The probe process: GET /health every PROBE_SECONDS until stdin closes, then print the
    latencies (seconds), one a line."""
    import threading

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()

    async def go() -> list[float]:
        latencies = []
        async with aiohttp.ClientSession() as http:
            print("started", flush=True)
            while not stop.is_set():
                start = time.perf_counter()
                async with http.get(f"{url}/api/v1/health") as r:
                    await r.read()
                latencies.append(time.perf_counter() - start)
                await asyncio.sleep(PROBE_SECONDS)
        return latencies

    print("\n".join(f"{x:.6f}" for x in asyncio.run(go())))


async def sign_up(http: aiohttp.ClientSession, url: str, email: str) -> dict[str, str]:
    async with http.post(f"{url}/api/v1/auth/register", json={"email": email, "password": "correct horse battery"}) as r:
        assert r.status == 201, await r.text()
        return {"Authorization": f"Bearer {(await r.json())['access_token']}"}


async def bulk(http: aiohttp.ClientSession, url: str, auth: dict[str, str], records: list[bytes]) -> tuple[int, float, float]:
    requests = 0
    start = time.perf_counter()
    for i in range(0, len(records), BATCH):
        body = {"records": [{"table": "notes", "data": base64.b64encode(d).decode(),
                             "checksum": hashlib.sha256(d).hexdigest()} for d in records[i:i + BATCH]]}
        async with http.post(f"{url}/api/v1/storage/records/batch", json=body, headers=auth) as r:
            assert r.status == 201, await r.text()
            await r.read()
        requests += 1
    up = time.perf_counter() - start

    start = time.perf_counter()
    got: list[bytes] = []
    cursor = 0
    while True:
        params = {"since": str(cursor), "limit": str(PAGE), "include_data": "true"}
        async with http.get(f"{url}/api/v1/storage/changes", params=params, headers=auth) as r:
            assert r.status == 200, await r.text()
            page = await r.json()
        requests += 1
        for change in page["changes"]:
            if change["data"] is None:  # larger than 64 KiB: one by one
                async with http.get(f"{url}/api/v1/storage/records/{change['id']}", headers=auth) as r:
                    got.append(await r.read())
                requests += 1
            else:
                got.append(base64.b64decode(change["data"]))
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    down = time.perf_counter() - start
    assert got == records, "the bulk sync did not read back what it sent"
    return requests, up, down


async def one_by_one(http: aiohttp.ClientSession, url: str, auth: dict[str, str],
                     records: list[bytes]) -> tuple[int, float, float]:
    requests = 0
    start = time.perf_counter()
    for d in records:
        headers = {**auth, "X-Checksum": hashlib.sha256(d).hexdigest(), "Content-Type": "application/octet-stream"}
        async with http.post(f"{url}/api/v1/storage/records", params={"table": "notes"}, data=d, headers=headers) as r:
            assert r.status == 201, await r.text()
            await r.read()
        requests += 1
    up = time.perf_counter() - start

    start = time.perf_counter()
    ids: list[str] = []
    cursor = 0
    while True:
        params = {"since": str(cursor), "limit": str(PAGE)}
        async with http.get(f"{url}/api/v1/storage/changes", params=params, headers=auth) as r:
            page = await r.json()
        requests += 1
        ids += [c["id"] for c in page["changes"]]
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    got = []
    for rid in ids:
        async with http.get(f"{url}/api/v1/storage/records/{rid}", headers=auth) as r:
            assert r.status == 200
            got.append(await r.read())
        requests += 1
    down = time.perf_counter() - start
    assert got == records, "the per-record sync did not read back what it sent"
    return requests, up, down


async def run(url: str, records: list[bytes]) -> None:
    probe = Probe(url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as http:
        bulk_auth = await sign_up(http, url, "bulk@example.org")
        single_auth = await sign_up(http, url, "single@example.org")
        b_req, b_up, b_down = await probe.during(bulk(http, url, bulk_auth, records))
        b_probe = probe.summary()
        s_req, s_up, s_down = await probe.during(one_by_one(http, url, single_auth, records))
        s_probe = probe.summary()
        # The largest batches allowed: 1,000 records of 12 KiB (a body just under 16 MiB), up
        # and down, to see what parsing and inlining them costs the event loop.
        big = [os.urandom(12 * 1024) for _ in range(BATCH * BIG_BATCHES)]
        l_req, l_up, l_down = await probe.during(bulk(http, url, await sign_up(http, url, "big@example.org"), big))
        l_probe = probe.summary()
    b_total, s_total = b_up + b_down, s_up + s_down
    print(f"records: {len(records)} of {len(records[0])} bytes, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"bulk        {b_req:6d} requests  up {b_up:7.2f} s  down {b_down:7.2f} s  total {b_total:7.2f} s   {b_probe}")
    print(f"per record  {s_req:6d} requests  up {s_up:7.2f} s  down {s_down:7.2f} s  total {s_total:7.2f} s   {s_probe}")
    print(f"ratio (per record / bulk): requests {s_req / b_req:.0f}x, seconds {s_total / b_total:.1f}x "
          f"(up {s_up / b_up:.1f}x, down {s_down / b_down:.1f}x)")
    print(f"largest batches: {BIG_BATCHES} x 1000 records of 12 KiB (~16 MiB bodies): up {l_up / BIG_BATCHES:.2f} s "
          f"and down {l_down / BIG_BATCHES:.2f} s per 1000   {l_probe}")
    print("rate limits raised for both sides (ADIUVA_RATE_LIMITS): at team's 200/min the per-record path "
          f"would need {s_req / 200:.0f} minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=2048, help="bytes per record")
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe)
    records = [os.urandom(args.size) for _ in range(args.records)]
    with tempfile.TemporaryDirectory(prefix="adiuva-bench-") as tmp:
        proc, url = loadgen.start_server(Path(tmp) / "data", ADIUVA_RATE_LIMITS=UNLIMITED)
        try:
            asyncio.run(run(url, records))
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
