"""Fixtures: the real server on a real socket (pytest-aiohttp's TestServer binds 127.0.0.1),
a real SQLite file and real files in a temp dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adiuva_server.app import create_app
from adiuva_server.config import Settings
from adiuva_server.keys import AUTH, STORAGE
from adiuva_server.http.protocol import Runner

REPO = Path(__file__).resolve().parent.parent

# The real servers the tests start (one module each; each server once per session).
pytest_plugins = ["tests.servers_postgres", "tests.servers_stripe", "tests.servers_redis", "tests.servers_s3"]


def make_settings(data_dir: Path, **overrides) -> Settings:
    return Settings.from_env({}, data_dir=data_dir, env="test", **overrides)


class ServedLikeProduction(TestServer):
    """aiohttp's TestServer cancels a handler whose client disconnects; `adiuva serve` does not
    (aiohttp's default), and tests must see what production does (its runner too)."""

    async def _make_runner(self, **kwargs):
        kwargs["handler_cancellation"] = False
        return Runner(self.app, **kwargs)  # adiuva serve's runner: its connection class and caps


@pytest.fixture
def aiohttp_client(aiohttp_client):
    """pytest-aiohttp's factory, serving an app the way `adiuva serve` does."""

    async def go(app, **kwargs):
        if isinstance(app, web.Application):
            app = ServedLikeProduction(app)
        return await aiohttp_client(app, **kwargs)

    return go


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    return make_settings(data_dir)


@pytest.fixture
async def client(aiohttp_client, settings):
    return await aiohttp_client(create_app(settings))


@dataclass
class Account:
    email: str
    password: str
    access_token: str
    refresh_token: str
    headers: dict = field(default_factory=dict)


async def register(client, email: str = "ada@example.org", password: str = "correct horse battery") -> Account:
    resp = await client.post("/api/v1/auth/register", json={"email": email, "password": password})
    assert resp.status == 201, await resp.text()
    body = await resp.json()
    return Account(email, password, body["access_token"], body["refresh_token"],
                   {"Authorization": f"Bearer {body['access_token']}"})


async def set_tier(client, email: str, tier: str) -> None:
    await client.server.app[AUTH].store.update_user(email, tier=tier)


def objects(client) -> list[str]:
    """The names of the stored objects on disk (content addresses)."""
    return sorted(p.name for p in client.server.app[STORAGE].blobs.objects.glob("*/*"))


@pytest.fixture
async def account(client) -> Account:
    return await register(client)


# -- the server and the CLI as subprocesses ---------------------------------------------------

def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADIUVA_", "JWT_"))}
    # No LAN announcements from test servers unless a test asks (ADIUVA_MDNS="on").
    env.update({"ADIUVA_DATA_DIR": str(data_dir), "PYTHONPATH": str(REPO), "ADIUVA_MDNS": "off"}, **extra)
    return env


def run_cli(data_dir: Path, *args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adiuva_server", *args], input=input, capture_output=True, text=True,
        env=cli_env(data_dir, **env), timeout=60,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m adiuva_server serve` on a free loopback port."""

    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = (), **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adiuva_server", "serve", "--host", "127.0.0.1", "--port", str(self.port), *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cli_env(data_dir, **env),
        )
        self.output: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if "Point the Adiuva desktop app at" in line:
                self.output.append(self.proc.stdout.readline())  # the first URL
                return
        self.proc.kill()
        raise RuntimeError("server did not start:\n" + "".join(self.output))

    def stop(self, sig=None) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        try:
            rest, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rest, _ = self.proc.communicate()
        self.output.append(rest or "")
        return self.proc.returncode


@pytest.fixture
def server_process(data_dir):
    servers = []

    def start(extra_args: tuple[str, ...] = (), **env: str) -> ServerProcess:
        server = ServerProcess(data_dir, extra_args, **env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
