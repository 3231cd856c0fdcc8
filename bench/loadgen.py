"""A small closed-loop HTTP/1.1 load generator on raw asyncio streams (keep-alive, fixed
request bytes), fast enough not to be the bottleneck against one aiohttp process.
Used by the bench scripts; also runnable: python bench/loadgen.py URL SECONDS CONNECTIONS."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """`adiuva serve` on a free loopback port, as a user runs it: a clean ADIUVA_* environment,
    new accounts on `team`, warnings only (the access log would fill the pipe); `env` adds to it."""
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("ADIUVA_", "JWT_"))}
    environ.update(ADIUVA_DATA_DIR=str(data_dir), ADIUVA_DEFAULT_TIER="team", ADIUVA_LOG_LEVEL="WARNING",
                   PYTHONPATH=str(REPO), **env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "adiuva_server", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ,
    )
    for line in proc.stdout:
        if "Point the Adiuva desktop app at" in line:
            return proc, f"http://127.0.0.1:{port}"
    raise SystemExit("server did not start")


def request_bytes(url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    lines = [f"{method} {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return parts.hostname, parts.port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    if length:
        await reader.readexactly(length)
    return status


async def run(url: str, seconds: float, connections: int, headers: dict[str, str] | None = None) -> dict:
    host, port, req = request_bytes(url, headers=headers)
    counts = {"ok": 0, "other": 0}
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= deadline:
                    return
                writer.write(req)
                status = await _read_response(reader)
                latencies.append(time.perf_counter() - t0)
                counts["ok" if status == 200 else "other"] += 1
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(connections)])
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": counts["ok"] / elapsed,
        "non_200": counts["other"],
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan"),
    }


if __name__ == "__main__":
    print(asyncio.run(run(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))))
