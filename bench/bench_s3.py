"""The S3 blob store against the file blob store (not a test). Prints the throughput of a 16 MiB
upload (receive + store, streamed in 64 KiB chunks as a request body arrives) and of its
download (open_range, whole object) on each store, and S3's figure as a ratio of the files'
figure measured in the same run, because absolute times drift on shared machines.

S3 here is moto's standalone server in its own process on loopback, a stand-in: it keeps objects
in Python memory and copies bytes in Python, so the ratio bounds the client's own overhead
(aiobotocore, the temp-then-copy protocol) from below, not a real MinIO's or AWS's speed.
Rounds alternate F-S-F-S...; medians are printed.

    python bench/bench_s3.py [--rounds 5] [--mib 16]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adiuva_server.storage.blobs import FileBlobStore  # noqa: E402
from adiuva_server.storage.s3 import S3BlobStore  # noqa: E402

CHUNK = 64 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("moto server did not start")


async def body(total: int, seed: int):
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * (CHUNK // 32)
    sent = 0
    while sent < total:
        yield block[:min(CHUNK, total - sent)]
        sent += CHUNK


async def one_round(blobs, total: int, seed: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    staged = await blobs.receive(body(total, seed), total)
    await blobs.store(staged)
    t1 = time.perf_counter()
    got = 0
    async for block in blobs.open_range(staged.digest):
        got += len(block)
    t2 = time.perf_counter()
    assert got == total
    await blobs.delete(staged.digest)
    return total / (t1 - t0) / 2**20, total / (t2 - t1) / 2**20


async def main(rounds: int, mib: int) -> None:
    total = mib * 2**20
    proc, url = start_moto()
    try:
        s3 = S3BlobStore("bench", endpoint_url=url, access_key_id="bench", secret_access_key="bench")
        await s3.open()
        await s3._client.create_bucket(Bucket="bench")
        with tempfile.TemporaryDirectory() as tmp:
            files = FileBlobStore(Path(tmp) / "blobs")
            files.open()
            results: dict[str, list[tuple[float, float]]] = {"files": [], "s3": []}
            for r in range(rounds + 1):  # round 0 warms up both
                for name, store in (("files", files), ("s3", s3)):
                    figures = await one_round(store, total, seed=r)
                    if r:
                        results[name].append(figures)
        await s3.close()
    finally:
        proc.terminate()
        proc.wait(10)
    med = {n: (statistics.median(u for u, _ in v), statistics.median(d for _, d in v)) for n, v in results.items()}
    print(f"{mib} MiB object, {rounds} rounds, median MiB/s")
    print(f"{'':8}{'upload':>10}{'download':>10}")
    for name in ("files", "s3"):
        print(f"{name:8}{med[name][0]:10.0f}{med[name][1]:10.0f}")
    print(f"{'s3/files':8}{med['s3'][0] / med['files'][0]:10.2f}{med['s3'][1] / med['files'][1]:10.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.mib))
