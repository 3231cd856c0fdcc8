"""Hostile clients (issue 10): /health latency while clients send decompression bombs, and
while hundreds of connections dribble their headers (slowloris). Not a test; prints /health
p50/p99 with no load and under each attack, and the ratio, measured in the same run.

1. Quiet: /health on one keep-alive connection, one request every 10 ms.
2. Bombs: `--bombs` clients at once each POST /api/v1/auth/login, unauthenticated, a gzip body
   of 10 MB that inflates to `--inflate-gib` GiB of zeros (generated block by block, never held
   in memory), over and over for the whole phase. Target: /health p99 < 50 ms.
3. Slowloris: `--slow` connections each send a request line, then one header byte a second.
   Reports /health meanwhile and when the server closed them (ADIUVA_HEADER_TIMEOUT).

    python bench/bench_bombs.py [--bombs 4] [--inflate-gib 10] [--slow 300] [--header-timeout 5]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402
from bench_auth import free_port, pct, wait_healthy  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BLOCK = 1 << 20


class GzipBomb:
    """A gzip stream of `gib` GiB of zeros, ~1 KB per MiB. Each MiB is deflated with a full
    flush, so every block after the first is the same bytes: compressed once, sent N times."""

    def __init__(self, gib: int) -> None:
        zeros = bytes(BLOCK)
        c = zlib.compressobj(9, zlib.DEFLATED, 31)
        self.first = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
        self.block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
        self.blocks = gib * 1024
        crc = 0
        for _ in range(self.blocks):
            crc = zlib.crc32(zeros, crc)
        end = c.flush(zlib.Z_FINISH)[:-8]  # the empty last block; its trailer replaced below
        self.tail = end + struct.pack("<II", crc, (self.blocks * BLOCK) & 0xFFFFFFFF)
        self.size = len(self.first) + len(self.block) * (self.blocks - 1) + len(self.tail)

    def chunks(self, per_write: int = 64):
        yield self.first
        left = self.blocks - 1
        while left:
            n = min(per_write, left)
            yield self.block * n
            left -= n
        yield self.tail


def start_adiuva(data_dir: str, header_timeout: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "ADIUVA_DATA_DIR": data_dir, "ADIUVA_LOG_LEVEL": "WARNING", "PYTHONPATH": str(REPO),
           "ADIUVA_HEADER_TIMEOUT": str(header_timeout)}
    proc = subprocess.Popen([sys.executable, "-m", "adiuva_server", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return proc, url


async def health_latencies(url: str, n: int, interval: float, deadline_s: float = 30.0) -> list[float]:
    """/health on one keep-alive connection from 127.0.0.2, so the attackers' address (127.0.0.1)
    and its per-address connection cap are not ours; at most `deadline_s` seconds."""
    host, port, req = loadgen.request_bytes(url + "/api/v1/health")
    reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
    out = []
    deadline = time.perf_counter() + deadline_s
    while len(out) < n and time.perf_counter() < deadline:
        t0 = time.perf_counter()
        writer.write(req)
        await loadgen._read_response(reader)
        out.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(interval)
    writer.close()
    return out


async def bomb_loop(url: str, bomb: GzipBomb, stop: asyncio.Event, results: list) -> None:
    """Send the bomb again and again until `stop`; record (status, MB sent, seconds to close)."""
    host, port, head = loadgen.request_bytes(url + "/api/v1/auth/login", "POST", {
        "Content-Type": "application/json", "Content-Encoding": "gzip", "Content-Length": str(bomb.size)})
    while not stop.is_set():
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        sent = 0
        status = None

        async def send() -> None:
            nonlocal sent
            writer.write(head)
            for chunk in bomb.chunks():
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                if stop.is_set():
                    return

        sender = asyncio.create_task(send())
        try:
            line = await reader.readline()
            status = int(line.split()[1]) if line else None
            while await reader.read(65536):  # until the server closes
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()
        results.append((status, sent / 1e6, time.perf_counter() - t0))


async def slow_client(host: str, port: int, stop: asyncio.Event) -> float | None:
    """Send a request head one byte a second; the seconds until the server closed us."""
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return 0.0
    head = b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
    try:
        writer.write(head[:40])
        for byte in head[40:]:
            if stop.is_set():
                return None
            try:
                await asyncio.wait_for(reader.read(1), 1.0)
                return time.perf_counter() - t0  # answered or closed
            except asyncio.TimeoutError:
                writer.write(bytes([byte]))
    except (ConnectionError, OSError):
        return time.perf_counter() - t0
    finally:
        writer.close()
    return None


def line(name: str, values: list[float], quiet: list[float] | None = None) -> str:
    text = f"{name:<34}: p50 {pct(values, .5):7.2f} ms  p99 {pct(values, .99):7.2f} ms"
    if quiet:
        text += f"  (p99 x{pct(values, .99) / pct(quiet, .99):.1f} of quiet)"
    return text


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bombs", type=int, default=4)
    ap.add_argument("--inflate-gib", type=int, default=10)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--slow", type=int, default=300)
    ap.add_argument("--header-timeout", type=float, default=5.0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    bomb = GzipBomb(args.inflate_gib)
    print(f"bomb: {bomb.size / 1e6:.1f} MB of gzip inflating to {args.inflate_gib} GiB (built in {time.perf_counter() - t0:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_adiuva(tmp, args.header_timeout)
        try:
            await health_latencies(url, 50, 0.005)  # warm-up
            quiet = await health_latencies(url, args.samples, 0.01)
            print(line("health alone", quiet))

            stop, results = asyncio.Event(), []
            bombs = [asyncio.create_task(bomb_loop(url, bomb, stop, results)) for _ in range(args.bombs)]
            await asyncio.sleep(0.3)
            loaded = await health_latencies(url, args.samples, 0.01)
            stop.set()
            await asyncio.gather(*bombs)
            print(line(f"health during {args.bombs} bombs", loaded, quiet) + "  (target p99 < 50 ms)")
            statuses = dict(collections.Counter(r[0] or "reset" for r in results))
            print(f"  {len(results)} bombs, answers {statuses}; sent before the server closed: "
                  f"max {max(r[1] for r in results):.1f} MB; connection lifetime max {max(r[2] for r in results):.2f} s")

            host, port, _ = loadgen.request_bytes(url)
            stop = asyncio.Event()
            slow = [asyncio.create_task(slow_client(host, port, stop)) for _ in range(args.slow)]
            await asyncio.sleep(1.0)
            during = await health_latencies(url, args.samples, 0.01)
            print(line(f"health during {args.slow} slowloris", during, quiet))
            done, pending = await asyncio.wait(slow, timeout=args.header_timeout * 2 + 5)
            stop.set()
            closed = sorted(t.result() for t in done if t.result() is not None)
            await asyncio.gather(*pending)
            refused = [t for t in closed if t < 0.5]  # closed at once: past the per-address cap
            timed_out = [t for t in closed if t >= 0.5]
            print(f"  {len(refused)} refused at once (per-address cap); {len(timed_out)} closed after "
                  + (f"{timed_out[0]:.1f}-{timed_out[-1]:.1f} s" if timed_out else "-")
                  + f" (ADIUVA_HEADER_TIMEOUT={args.header_timeout:g}); {args.slow - len(closed)} still open "
                  f"after {args.header_timeout * 2 + 5:.0f} s")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
