"""Benchmark: a large backup uploaded to and downloaded from the real server over loopback,
against a baseline measured in the same run on the same bytes.

- upload baseline: one process hashes (SHA-256), writes and fsyncs the bytes to a file on the
  same filesystem as the server's data dir; that is the least work a durable, verified upload
  can do.
- download baseline: one process reads that file (from the page cache). For reference the
  script also measures the loopback TCP ceiling: the file sent with sendfile to a raw socket.
- server: `adiuva serve` as a subprocess; `PUT /api/v1/backup` streams the body in,
  `GET /api/v1/backup` streams it out (sendfile). The server's peak RSS growth over the whole
  run is read from /proc (VmHWM, reset before the run).

Prints throughputs, ratios (targets: upload >= 0.6, download >= 0.7 of baseline) and the RSS
growth (target < 64 MB). Usage: python bench/bench_storage.py [--size-mb 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402

CHUNK = 1024 * 1024
MB = 1024 * 1024


def baseline_upload(data: memoryview, path: Path) -> float:
    start = time.perf_counter()
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for i in range(0, len(data), CHUNK):
            block = data[i:i + CHUNK]
            h.update(block)
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    h.hexdigest()
    return time.perf_counter() - start


def baseline_download(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        while fh.read(CHUNK):
            pass
    return time.perf_counter() - start


def loopback_ceiling(path: Path) -> float:
    """Not a target, a reference: the same file sent over loopback TCP with sendfile and read
    with recv_into into one reused buffer, no HTTP at all. What any download here could reach."""
    size = path.stat().st_size
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def send() -> None:
            conn, _ = listener.accept()
            with conn, open(path, "rb") as fh:
                offset = 0
                while offset < size:
                    offset += os.sendfile(conn.fileno(), fh.fileno(), offset, size - offset)

        sender = threading.Thread(target=send)
        sender.start()
        buf = memoryview(bytearray(4 * CHUNK))
        start = time.perf_counter()
        with socket.create_connection(listener.getsockname()) as client:
            while client.recv_into(buf):
                pass
        elapsed = time.perf_counter() - start
        sender.join()
    return elapsed




def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)




async def run_rounds(url: str, data: memoryview, digest: str, rounds: int, pid: int, base_file: Path) -> dict:
    """Baseline and server measurements interleaved round by round, so that both sides see the
    same machine (other load, disk write-back) as far as possible."""
    times: dict[str, list[float]] = {"base_up": [], "base_down": [], "ceiling": [], "up": [], "down": []}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        async with http.post(f"{url}/api/v1/auth/register",
                             json={"email": "bench@example.org", "password": "correct horse battery"}) as r:
            auth = {"Authorization": f"Bearer {(await r.json())['access_token']}"}
        # Warm up the routes, then measure the peak from here on.
        async with http.get(f"{url}/api/v1/backup/history", headers=auth) as r:
            await r.read()
        reset = True
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            reset = False
        rss_before = proc_status(pid, "VmRSS")
        headers = {**auth, "X-Backup-Version": "1", "X-Backup-Timestamp": "2025-01-01T00:00:00Z",
                   "X-Backup-Checksum": digest, "Content-Type": "application/octet-stream",
                   "Content-Length": str(len(data))}

        async def body():
            for i in range(0, len(data), CHUNK):
                yield data[i:i + CHUNK]

        for _ in range(rounds):
            times["base_up"].append(baseline_upload(data, base_file))
            start = time.perf_counter()
            async with http.put(f"{url}/api/v1/backup", data=body(), headers=headers) as r:
                assert r.status == 201, await r.text()
            times["up"].append(time.perf_counter() - start)

            times["base_down"].append(baseline_download(base_file))
            times["ceiling"].append(loopback_ceiling(base_file))
            start = time.perf_counter()
            got = 0
            async with http.get(f"{url}/api/v1/backup", headers=auth) as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    got += len(chunk)
            times["down"].append(time.perf_counter() - start)
            assert got == len(data)
        times["growth"] = [proc_status(pid, "VmHWM") - rss_before if reset else -1]
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = args.size_mb * MB
    with tempfile.TemporaryDirectory(prefix="adiuva-bench-") as tmp:
        tmp_path = Path(tmp)
        data = memoryview(os.urandom(size))
        digest = hashlib.sha256(data).hexdigest()
        proc, url = loadgen.start_server(tmp_path / "data")
        try:
            times = asyncio.run(run_rounds(url, data, digest, args.rounds, proc.pid, tmp_path / "baseline.bin"))
        finally:
            proc.terminate()
            proc.wait(30)

    def rate(seconds: float) -> float:
        return size / MB / seconds

    up, down, base_up, base_down, ceiling = (min(times[k]) for k in ("up", "down", "base_up", "base_down", "ceiling"))
    growth = times["growth"][0]
    print(f"body: {args.size_mb} MB, best of {args.rounds} rounds, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"upload   server {rate(up):8.1f} MB/s   baseline (sha256+write+fsync) {rate(base_up):8.1f} MB/s   "
          f"ratio {base_up / up:.2f}   (target >= 0.6)")
    print(f"download server {rate(down):8.1f} MB/s   baseline (read file)          {rate(base_down):8.1f} MB/s   "
          f"ratio {base_down / down:.2f}   (target >= 0.7)")
    print(f"         loopback TCP ceiling (sendfile -> recv_into, no HTTP) {rate(ceiling):8.1f} MB/s   "
          f"server/ceiling {ceiling / down:.2f}")
    if growth >= 0:
        print(f"server peak RSS growth during the run: {growth / MB:.1f} MB   (target < 64 MB)")
    else:
        print("server peak RSS growth: unavailable (cannot reset /proc/<pid>/clear_refs here)")


if __name__ == "__main__":
    main()
