"""A real Redis for the tests: Debian's redis-server, started once per test session on a free
loopback port (no persistence), flushed before each test that asks for it, stopped at the end.
A missing redis-server fails the tests that need it, loudly: never a skip."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if not Path(REDIS_SERVER).is_file():
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server): the Redis tests need it")
        self.port = port or _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} at start")
            if self.command("PING") == "+PONG":
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not answer within 20 s")

    def command(self, *args: str) -> str | None:
        """One command over a plain socket (RESP), the first line of the answer; None when down."""
        request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall(request.encode())
                return s.recv(65536).split(b"\r\n", 1)[0].decode()
        except OSError:
            return None

    def flush(self) -> None:
        assert self.command("FLUSHALL") == "+OK", "the test Redis is not answering"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The session's Redis, empty."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, for tests that kill it."""
    server = RedisServer(tmp_path / "own-redis")
    yield server
    server.stop()
