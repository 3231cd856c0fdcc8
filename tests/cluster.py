"""Several `adiuva serve` processes on shared backends, as an operator runs them: each on its own
loopback port and data dir, its output drained in a thread (a full pipe must never stall a
node), killed with SIGKILL or stopped with SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

from tests.conftest import cli_env, free_port


class Node:
    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = self.url + "/api/v1"
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adiuva_server", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(data_dir, **env),
        )
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._drain.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.output}")
                try:
                    async with http.get(self.api + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await _sleep(0.1)
        raise RuntimeError("node did not become ready:\n" + self.output)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
