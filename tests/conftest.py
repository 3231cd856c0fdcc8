"""Fixtures: the real server on a real socket (pytest-aiohttp's TestServer binds 127.0.0.1),
a real SQLite file and real files in a temp dir."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adiuva_server.app import create_app
from adiuva_server.config import Settings
from adiuva_server.keys import AUTH, DB, PG, SETTINGS, STORAGE
from adiuva_server.http.protocol import Runner

REPO = Path(__file__).resolve().parent.parent

# The real servers the tests start (one module each; each server once per session).
pytest_plugins = ["tests.servers_postgres", "tests.servers_stripe", "tests.servers_redis", "tests.servers_s3"]


# -- the metadata backend a test runs on ------------------------------------------------------
#
# A module (or test) marked `both_backends` runs each of its tests twice: on the data dir's
# SQLite file, and on a fresh PostgreSQL database of the session's server (DATABASE_URL, one
# node: ADIUVA_SINGLE_NODE, files in the data dir). `sqlite_only(reason)` keeps one test on
# SQLite (it reads the SQLite file, say). Inside such a test `make_settings` and `cli_env` give
# the settings of the backend it runs on, so the `client` fixture family, the tests' own
# settings and the CLI they run all follow it.

BACKENDS = ("sqlite", "postgresql")
both_backends = pytest.mark.both_backends
_pg_url: str | None = None  # the running test's DATABASE_URL, when it runs on PostgreSQL


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "both_backends: run on SQLite and on PostgreSQL (the `backend` fixture)")
    config.addinivalue_line("markers", "sqlite_only(reason): in a both_backends module, run on SQLite only")


def pytest_generate_tests(metafunc) -> None:
    node = metafunc.definition
    if node.get_closest_marker("both_backends") and not node.get_closest_marker("sqlite_only"):
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture(autouse=True)
def backend(request) -> Iterator[str]:
    """The metadata backend of this test: "sqlite" unless parametrised (both_backends)."""
    global _pg_url
    name = getattr(request, "param", "sqlite")
    if name == "postgresql":
        _pg_url = request.getfixturevalue("pg_url")
    try:
        yield name
    finally:
        _pg_url = None


def backend_settings() -> dict:
    """The settings that put a server on the running test's backend ({} on SQLite)."""
    return {"database_url": _pg_url, "single_node": True} if _pg_url else {}


def make_settings(data_dir: Path, **overrides) -> Settings:
    return Settings.from_env({}, data_dir=data_dir, env="test", **{**backend_settings(), **overrides})


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


async def sql(client, statement: str, *params) -> list[tuple]:
    """Run one statement (`?` placeholders) on the running server's metadata backend and return
    its rows, for tests that look past the API: SQLite's file, or DATABASE_URL's PostgreSQL."""
    app = client.server.app
    if PG in app:
        n = iter(range(1, len(params) + 1))
        rows = await app[PG].fetch(re.sub(r"\?", lambda _: f"${next(n)}", statement), *params)
    else:  # a connection of its own, as another process (the CLI) would write
        from adiuva_server.db import connect

        conn = connect(app[SETTINGS].db_path)
        try:
            rows = conn.execute(statement, params).fetchall()
        finally:
            conn.close()
    return [tuple(r) for r in rows]


async def usage(client, email: str, kind: str = "cloud") -> int:
    """The user's counted usage, through the running backend's storage store."""
    app = client.server.app
    user = await app[AUTH].store.get_by_email(email)
    return await app[STORAGE].store.usage(user.id, kind)


async def set_usage(client, email: str, used: int, kinds: tuple[str, ...] = ("cloud",)) -> None:
    """Pretend the user has stored `used` bytes of each kind (uploading gigabytes is no test)."""
    app = client.server.app
    user = await app[AUTH].store.get_by_email(email)
    upsert = "INSERT INTO storage_usage (user_id, kind, bytes) VALUES ({}) ON CONFLICT (user_id, kind) DO UPDATE SET bytes = excluded.bytes"
    for kind in kinds:
        if PG in app:
            await app[PG].execute(upsert.format("$1, $2, $3"), user.id, kind, used)
        else:
            await app[DB].execute_write(upsert.format("?, ?, ?"), (user.id, kind, used))


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
    if _pg_url:  # the CLI and the server process on the running test's backend too
        env.update({"DATABASE_URL": _pg_url, "ADIUVA_SINGLE_NODE": "true"})
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
