"""The real `adiuva` CLI (python -m adiuva_server) against a real data dir, also while the
server runs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys

import aiohttp
import pytest

from adiuva_server.db.database import connect
from tests.conftest import cli_env, run_cli


def users(data_dir) -> list[dict]:
    out = run_cli(data_dir, "user", "list", "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_user_lifecycle(data_dir):
    out = run_cli(data_dir, "user", "add", "Ada@Example.org", "--password", "correct horse", "--tier", "pro", "--create")
    assert out.returncode == 0, out.stderr
    assert "created ada@example.org (tier pro" in out.stdout
    out = run_cli(data_dir, "user", "add", "bob@example.org")
    assert out.returncode == 0, out.stderr
    generated = out.stdout.split("password: ")[1].strip()
    assert len(generated) >= 16
    listed = {u["email"]: u for u in users(data_dir)}
    assert listed["ada@example.org"]["tier"] == "pro" and listed["ada@example.org"]["admin"] is True
    assert listed["bob@example.org"]["tier"] == "team" and listed["bob@example.org"]["admin"] is False

    assert run_cli(data_dir, "user", "set-tier", "bob@example.org", "team").returncode == 0
    assert run_cli(data_dir, "user", "disable", "bob@example.org").returncode == 0
    listed = {u["email"]: u for u in users(data_dir)}
    assert listed["bob@example.org"]["tier"] == "team" and listed["bob@example.org"]["disabled"] is True
    assert run_cli(data_dir, "user", "enable", "BOB@example.org").returncode == 0
    assert run_cli(data_dir, "user", "passwd", "bob@example.org", "--password", "a new password").returncode == 0
    out = run_cli(data_dir, "user", "delete", "bob@example.org", "--yes")
    assert out.returncode == 0, out.stderr
    assert [u["email"] for u in users(data_dir)] == ["ada@example.org"]
    table = run_cli(data_dir, "user", "list")
    assert "ada@example.org" in table.stdout and "pro" in table.stdout


def stored_password_is(data_dir, password: str) -> bool:
    import argon2

    (stored,) = connect(data_dir / "adiuva.db").execute("SELECT password_hash FROM users").fetchone()
    try:
        return argon2.PasswordHasher().verify(stored, password)
    except argon2.exceptions.VerifyMismatchError:
        return False


def run_cli_in_a_terminal(data_dir, *args: str, input: str) -> subprocess.CompletedProcess:
    """The CLI with a controlling terminal (a pseudo-terminal no one types into), as when run from
    a shell, and its standard input piped. getpass reads the terminal when there is one."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    try:
        return subprocess.run([sys.executable, "-m", "adiuva_server", *args], input=input, capture_output=True,
                              text=True, env=cli_env(data_dir), timeout=30, preexec_fn=take_terminal)
    finally:
        os.close(slave)
        os.close(master)


def test_passwd_prompts_when_no_password_is_given(data_dir):
    run_cli(data_dir, "user", "add", "ada@example.org", "--password", "correct horse", "--create")
    out = run_cli(data_dir, "user", "passwd", "ada@example.org", input="brand new pw\nbrand new pw\n")
    assert out.returncode == 0, out.stderr
    assert "brand new pw" not in out.stdout
    assert stored_password_is(data_dir, "brand new pw")


def test_passwd_reads_piped_input_even_with_a_terminal(data_dir):
    """Run from a shell (a terminal attached), piped input is still what it reads; it used to
    wait on the terminal instead."""
    run_cli(data_dir, "user", "add", "ada@example.org", "--password", "correct horse", "--create")
    out = run_cli_in_a_terminal(data_dir, "user", "passwd", "ada@example.org", input="piped new pw\npiped new pw\n")
    assert out.returncode == 0, out.stderr
    assert stored_password_is(data_dir, "piped new pw")
    empty = run_cli_in_a_terminal(data_dir, "user", "passwd", "ada@example.org", input="")
    assert empty.returncode == 2 and "no password" in empty.stderr
    assert stored_password_is(data_dir, "piped new pw")


@pytest.mark.parametrize(
    "args, code, message",
    [
        (("user", "set-tier", "nobody@example.org", "pro"), 1, "no user with email nobody@example.org"),
        (("user", "disable", "nobody@example.org"), 1, "no user"),
        (("user", "delete", "nobody@example.org", "--yes"), 1, "no user"),
        (("user", "passwd", "nobody@example.org", "--password", "long enough"), 1, "no user"),
        (("user", "set-tier", "ada@example.org", "platinum"), 2, "tier must be one of free, pro, power, team"),
        (("user", "add", "carol@example.org", "--tier", "gold"), 2, "tier must be one of"),
        (("user", "add", "not-an-email"), 2, "email"),
        (("user", "add", "carol@example.org", "--password", "short"), 2, "at least 8 characters"),
        (("user", "add", "ADA@example.org", "--password", "long enough"), 1, "already exists"),
    ],
)
def test_clear_errors_and_nothing_half_written(data_dir, args, code, message):
    run_cli(data_dir, "user", "add", "ada@example.org", "--password", "correct horse", "--create")
    before = users(data_dir)
    out = run_cli(data_dir, *args)
    assert out.returncode == code, (out.stdout, out.stderr)
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert users(data_dir) == before


def test_bad_settings_fail_at_start_with_a_clear_message(data_dir):
    for env, message in [
        ({"ADIUVA_PORT": "eighty"}, "ADIUVA_PORT must be an integer"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET must be at least 32 bytes"),
        ({"JWT_ALGORITHM": "none"}, "JWT_ALGORITHM must be one of HS256"),
        ({"ADIUVA_SIGNUPS": "maybe"}, "ADIUVA_SIGNUPS must be one of open, closed"),
        ({"CORS_ORIGINS": "[1, 2"}, "CORS_ORIGINS is not a valid JSON list"),
        ({"ADIUVA_TRUSTED_PROXIES": "my-proxy"}, "not an IP address or network"),
        ({"ADIUVA_TOMBSTONE_RETENTION": "5s"}, "ADIUVA_TOMBSTONE_RETENTION must be 0 (off) or between 1 minute"),
    ]:
        out = run_cli(data_dir, "serve", **env)
        assert out.returncode == 2, (env, out.stdout, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr


async def test_admin_changes_reach_a_running_server(data_dir, server_process):
    server = server_process()
    async with aiohttp.ClientSession(server.url) as http:
        resp = await http.post("/api/v1/auth/register", json={"email": "ada@example.org", "password": "correct horse"})
        tokens = await resp.json()
        auth = {"Authorization": f"Bearer {tokens['access_token']}"}
        assert (await (await http.get("/api/v1/auth/me", headers=auth)).json())["tier"] == "team"

        assert run_cli(data_dir, "user", "set-tier", "ada@example.org", "power").returncode == 0
        resp = await http.get("/api/v1/auth/me", headers=auth)
        assert (await resp.json())["tier"] == "power" and resp.headers["X-RateLimit-Limit"] == "120"

        assert run_cli(data_dir, "user", "disable", "ada@example.org").returncode == 0
        assert (await http.get("/api/v1/auth/me", headers=auth)).status == 401
        refresh = await http.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
        assert refresh.status == 401
        login = await http.post("/api/v1/auth/login", json={"email": "ada@example.org", "password": "correct horse"})
        assert login.status == 403 and (await login.json())["code"] == "account_disabled"

        assert run_cli(data_dir, "user", "enable", "ada@example.org").returncode == 0
        login = await http.post("/api/v1/auth/login", json={"email": "ada@example.org", "password": "correct horse"})
        auth = {"Authorization": f"Bearer {(await login.json())['access_token']}"}
        assert (await http.get("/api/v1/auth/me", headers=auth)).status == 200

        # A new password ends every session at once.
        assert run_cli(data_dir, "user", "passwd", "ada@example.org", "--password", "another secret").returncode == 0
        assert (await http.get("/api/v1/auth/me", headers=auth)).status == 401

        assert run_cli(data_dir, "user", "delete", "ada@example.org", "--yes").returncode == 0
        login = await http.post("/api/v1/auth/login", json={"email": "ada@example.org", "password": "another secret"})
        assert login.status == 401
    assert server.stop() == 0


def test_first_start_creates_a_private_data_dir_and_secret(data_dir, server_process):
    server = server_process()
    out = "".join(server.output)
    assert f"http://127.0.0.1:{server.port}" in out
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    secret = data_dir / "jwt_secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert len(secret.read_text().strip()) >= 32
    first = secret.read_text()
    assert server.stop(signal.SIGINT) == 0
    assert "stopped cleanly" in "".join(server.output)
    # The secret is kept across restarts (tokens survive a restart) and the schema is current.
    server = server_process()
    assert secret.read_text() == first
    assert server.stop() == 0
    conn = connect(data_dir / "adiuva.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_jwt_secret_from_the_environment_is_used_and_not_written(data_dir, server_process):
    server = server_process(JWT_SECRET="s" * 40)
    assert not (data_dir / "jwt_secret").exists()
    assert server.stop() == 0


def test_module_and_version(data_dir):
    out = run_cli(data_dir, "--version")
    assert out.returncode == 0 and out.stdout.startswith("adiuva ")
    out = run_cli(data_dir, "openapi")
    assert json.loads(out.stdout)["openapi"] == "3.1.0"


async def test_malformed_requests_are_one_log_line_not_a_traceback(data_dir, server_process):
    """aiohttp logs each request it cannot parse at ERROR with a traceback; a client could flood
    the log with them. The server logs one INFO line each, and goes on serving."""
    import asyncio

    server = server_process()
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw)
        answer = await reader.read()
        writer.close()
        assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer[:100]
    async with aiohttp.ClientSession(server.url) as http:
        assert (await http.get("/api/v1/health")).status == 200
    assert server.stop() == 0
    log = "".join(server.output)
    assert "Traceback" not in log, log
    assert log.count("INFO aiohttp.server: Error handling request") >= 1, log


def test_commands_refuse_a_data_dir_without_a_database(tmp_path):
    """A mistyped --data-dir must not quietly become a new, empty server."""
    missing = tmp_path / "typo"
    for args in (("user", "list"), ("user", "set-tier", "ada@example.org", "pro"), ("doctor",), ("backup", "create")):
        out = run_cli(missing, *args)
        assert out.returncode == 2 and "no Adiuva database" in out.stderr, (args, out.stderr)
        assert not missing.exists(), args
    # `user add` too, unless told to start a new server there (the first admin before the first start).
    out = run_cli(missing, "user", "add", "ada@example.org", "--password", "correct horse")
    assert out.returncode == 2 and "no Adiuva database" in out.stderr and "--create" in out.stderr, out.stderr
    assert not missing.exists()
    out = run_cli(missing, "user", "add", "ada@example.org", "--password", "correct horse", "--admin", "--create")
    assert out.returncode == 0 and "admin" in out.stdout, out.stderr
    assert run_cli(missing, "user", "list").returncode == 0
    # On an existing server, --create changes nothing: it adds the account as usual.
    assert run_cli(missing, "user", "add", "bob@example.org", "--password", "correct horse", "--create").returncode == 0
    assert [u["email"] for u in users(missing)] == ["ada@example.org", "bob@example.org"]


def test_serve_refuses_a_port_out_of_range(data_dir):
    out = run_cli(data_dir, "serve", "--port", "99999")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "65535" in out.stderr


async def test_user_delete_while_the_server_runs_and_the_banner_names_the_default_tier(data_dir, server_process):
    """The CLI deletes through the same code as the admin API. A running server's pins are
    invisible to it, so objects written in the last hour stay for that server's sweep; every
    row goes at once, and neither the database nor its WAL holds the email afterwards."""
    server = server_process()
    banner = [server.proc.stdout.readline() for _ in range(2)]  # printed with the URLs, after them
    assert "  New accounts get the team tier (homelab mode; ADIUVA_DEFAULT_TIER changes it" in banner[1], banner
    email = "eve.cli-7e3b@example.org"
    async with aiohttp.ClientSession(server.url) as http:
        resp = await http.post("/api/v1/auth/register", json={"email": "ada@example.org", "password": "correct horse"})
        assert resp.status == 201
        resp = await http.post("/api/v1/auth/register", json={"email": email, "password": "correct horse"})
        auth = {"Authorization": f"Bearer {(await resp.json())['access_token']}"}
        data = b"eve's young record"
        digest = hashlib.sha256(data).hexdigest()
        resp = await http.post("/api/v1/storage/records?table=notes", data=data, headers={**auth, "X-Checksum": digest})
        assert resp.status == 201, await resp.text()  # a team account by default: no 402

        out = run_cli(data_dir, "user", "delete", email, "--yes")
        assert out.returncode == 0, out.stderr
        assert "0 stored object(s) removed" in out.stdout and "1 object(s) kept" in out.stdout
        assert (data_dir / "blobs" / "objects" / digest[:2] / digest).exists()
        assert (await http.get("/api/v1/auth/me", headers=auth)).status == 401
        stored = b"".join(p.read_bytes() for p in data_dir.glob("adiuva.db*"))
        assert email.encode() not in stored
    assert server.stop() == 0
