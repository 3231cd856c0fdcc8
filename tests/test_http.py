"""The HTTP layer: problem+json for every error, CORS, security headers, rate limits and
login throttling, and when X-Forwarded-For is believed."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import logging
import time
import zlib

import aiohttp
import pytest
from aiohttp import web

from adiuva_server.app import create_app
from adiuva_server.http.routing import Api
from tests.conftest import make_settings, register

PROBLEM_KEYS = {"type", "title", "status", "detail", "code"}


async def problem(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"] == "application/problem+json"
    body = await resp.json()
    assert PROBLEM_KEYS <= set(body) and body["status"] == status and body["code"] == code
    return body


async def test_aiohttp_own_errors_are_problems(client, account):
    await problem(await client.get("/api/v1/no/such/route"), 404, "not_found")
    await problem(await client.get("/"), 404, "not_found")
    body = await problem(await client.delete("/api/v1/auth/me", headers=account.headers), 405, "method_not_allowed")
    assert "GET" in body["detail"]
    big = b'{"email": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    await problem(await client.post("/api/v1/auth/login", data=big, headers={"Content-Type": "application/json"}), 413, "payload_too_large")


async def test_unexpected_errors_are_500_problems_without_internals(aiohttp_client, data_dir, caplog):
    app = create_app(make_settings(data_dir))
    api = Api("test")

    @api.get("/boom", summary="raises", auth=False)
    async def boom(request):
        raise RuntimeError("secret internal detail")

    api.setup(app)
    client = await aiohttp_client(app)
    body = await problem(await client.get("/api/v1/boom"), 500, "internal_error")
    assert "secret internal detail" not in str(body)
    assert "secret internal detail" in caplog.text  # logged server-side for the admin


async def test_security_headers(client):
    resp = await client.get("/api/v1/health")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-store"


async def test_cors_allows_every_request_header_the_api_reads(client):
    """A header missing from the preflight answer is one the desktop app cannot send at all."""
    from adiuva_server.keys import ROUTES

    needed = {"authorization", "content-type", "content-encoding"}
    # (Stripe's servers call the billing webhook, never a browser: its Stripe-Signature is not one.)
    needed |= {h.lower() for spec in client.app[ROUTES] if spec.path != "/billing/webhook" for h in spec.request_headers}
    pre = await client.options("/api/v1/storage/records", headers={
        "Origin": "app://.", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": ", ".join(sorted(needed))})
    assert pre.status == 204
    allowed = {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
    assert needed <= allowed, needed - allowed


@pytest.mark.parametrize("origin", ["app://.", "http://localhost:5173"])
async def test_cors_preflight_and_response_for_allowed_origins(client, account, origin):
    pre = await client.options("/api/v1/auth/me", headers={
        "Origin": origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == origin
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    resp = await client.get("/api/v1/auth/me", headers={**account.headers, "Origin": origin})
    assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert "X-RateLimit-Remaining" in resp.headers["Access-Control-Expose-Headers"]
    # Errors carry CORS headers too, or the app could not read them.
    err = await client.get("/api/v1/auth/me", headers={"Origin": origin})
    assert err.status == 401 and err.headers["Access-Control-Allow-Origin"] == origin


async def test_cors_refuses_other_origins(client):
    pre = await client.options("/api/v1/auth/me", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    await problem(pre, 403, "origin_not_allowed")
    resp = await client.get("/api/v1/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_per_user_rate_limit_by_tier(client, account):
    from adiuva_server.keys import AUTH

    await client.app[AUTH].store.update_user(account.email, tier="free")  # this test is about the free tier
    for i in range(20):
        resp = await client.get("/api/v1/auth/me", headers=account.headers)
        assert resp.status == 200
        assert resp.headers["X-RateLimit-Limit"] == "20"
        assert resp.headers["X-RateLimit-Remaining"] == str(19 - i)
    body = await problem(await client.get("/api/v1/auth/me", headers=account.headers), 429, "rate_limited")
    assert "free" in body["detail"]
    resp = await client.get("/api/v1/auth/me", headers=account.headers)
    assert 1 <= int(resp.headers["Retry-After"]) <= 60
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    # Another user has a window of their own; health is never limited.
    other = await register(client, "bob@example.org")
    assert (await client.get("/api/v1/auth/me", headers=other.headers)).status == 200
    for _ in range(30):
        assert (await client.get("/api/v1/health")).status == 200


async def test_rate_limit_window_slides(aiohttp_client, data_dir):
    settings = make_settings(data_dir, rate_window_seconds=1.0, rate_limits={"free": 3, "pro": 3, "power": 3, "team": 3})
    client = await aiohttp_client(create_app(settings))
    account = await register(client)
    for _ in range(3):
        assert (await client.get("/api/v1/auth/me", headers=account.headers)).status == 200
    assert (await client.get("/api/v1/auth/me", headers=account.headers)).status == 429
    await asyncio.sleep(1.1)
    assert (await client.get("/api/v1/auth/me", headers=account.headers)).status == 200


async def test_login_is_throttled_per_account_even_with_the_right_password(client, account):
    for _ in range(10):
        resp = await client.post("/api/v1/auth/login", json={"email": account.email, "password": "wrong password"})
        assert resp.status == 401
    body = await problem(await client.post("/api/v1/auth/login", json={"email": account.email, "password": account.password}), 429, "rate_limited")
    assert "account" in body["detail"]
    # Other accounts from the same address are not locked by it.
    await register(client, "bob@example.org", "bob's password")
    assert (await client.post("/api/v1/auth/login", json={"email": "bob@example.org", "password": "bob's password"})).status == 200


async def test_login_is_throttled_per_address(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, login_failures_per_address=5)))
    await register(client, "ada@example.org", "ada's password")
    for i in range(5):
        resp = await client.post("/api/v1/auth/login", json={"email": f"guess{i}@example.org", "password": "x" * 10})
        assert resp.status == 401
    resp = await client.post("/api/v1/auth/login", json={"email": "ada@example.org", "password": "ada's password"})
    body = await problem(resp, 429, "rate_limited")
    assert "address" in body["detail"] and int(resp.headers["Retry-After"]) > 0


async def test_registration_is_throttled_per_address(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, registrations_per_address=2)))
    await register(client, "a@example.org")
    await register(client, "b@example.org")
    resp = await client.post("/api/v1/auth/register", json={"email": "c@example.org", "password": "long enough pw"})
    await problem(resp, 429, "rate_limited")


async def test_forwarded_for_is_ignored_unless_the_peer_is_a_trusted_proxy(aiohttp_client, data_dir, tmp_path):
    async def failures_then_blocked(client, forwarded_per_try: bool) -> int:
        await register(client, "ada@example.org", "ada's password")
        for i in range(3):
            hdrs = {"X-Forwarded-For": f"203.0.113.{i}"} if forwarded_per_try else {}
            await client.post("/api/v1/auth/login", json={"email": f"g{i}@example.org", "password": "x" * 10}, headers=hdrs)
        resp = await client.post("/api/v1/auth/login", json={"email": "ada@example.org", "password": "ada's password"},
                                 headers={"X-Forwarded-For": "203.0.113.99"})
        return resp.status

    untrusted = await aiohttp_client(create_app(make_settings(data_dir, login_failures_per_address=3)))
    # A guesser cannot escape the per-address throttle by inventing X-Forwarded-For values.
    assert await failures_then_blocked(untrusted, forwarded_per_try=True) == 429
    trusted = await aiohttp_client(create_app(make_settings(
        tmp_path / "other", login_failures_per_address=3, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))))
    # Behind a trusted proxy each forwarded client is its own address.
    assert await failures_then_blocked(trusted, forwarded_per_try=True) == 200


async def test_json_routes_refuse_non_object_bodies_before_hashing(client):
    resp = await client.post("/api/v1/auth/register", json=["ada@example.org", "pw"])
    await problem(resp, 422, "validation_error")


async def test_refresh_guessing_is_throttled_per_address(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, login_failures_per_address=3)))
    account = await register(client)
    for i in range(3):
        resp = await client.post("/api/v1/auth/refresh", json={"refresh_token": f"guess-{i}"})
        assert resp.status == 401
    resp = await client.post("/api/v1/auth/refresh", json={"refresh_token": account.refresh_token})
    body = await problem(resp, 429, "rate_limited")
    assert "refresh" in body["detail"] and int(resp.headers["Retry-After"]) > 0


# -- hostile clients (issue 10) ------------------------------------------------------------------

def gzip_bomb() -> tuple[bytes, bytes]:
    """The first MiB of zeros gzipped, and the ~1 KB every further MiB adds (full flushes make
    every later block the same bytes): a 10 GiB bomb is `first + block * 10239`, sent in pieces."""
    zeros = bytes(1 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH), c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)


async def raw_connection(client):
    return await asyncio.open_connection(client.server.host, client.server.port)


async def read_response(reader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(head[0].split()[1]), headers, body


async def seconds_until_closed(reader, limit: float) -> float:
    """Read and drop until the server closes the connection; fails past `limit` seconds."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
    except (ConnectionError, OSError):
        pass
    return time.monotonic() - t0


def raw_problem(status: int, headers: dict, body: bytes, expected: int, code: str) -> dict:
    assert status == expected, body
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert PROBLEM_KEYS <= set(problem) and problem["code"] == code
    return problem


async def health_latencies(session, url: str, seconds: float) -> list[float]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        assert (await session.get(url + "/api/v1/health")).status == 200
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
    return sorted(out)


async def test_a_gzip_bomb_to_login_is_413_closed_and_health_stays_fast(server_process):
    """10 MB of gzip that inflates to 10 GiB, unauthenticated: aiohttp used to go on reading and
    inflating it on the event loop after its 413, stalling every other request for seconds.
    The server runs as `adiuva serve` (its own process and event loop)."""
    server = server_process()
    first, block = gzip_bomb()
    blocks = 10 * 1024
    head = ("POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Encoding: gzip\r\nContent-Length: {len(first) + len(block) * (blocks - 1)}\r\n\r\n").encode()

    async def bomb():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def send():
            writer.write(head + first)
            for _ in range(blocks // 64):
                writer.write(block * 64)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            status, headers, body = await asyncio.wait_for(read_response(reader), 10)
            raw_problem(status, headers, body, 413, "payload_too_large")
            assert headers["connection"] == "close"
            # Closed while the client is still sending (aiohttp lingered 10 s, inflating).
            assert await seconds_until_closed(reader, 6) < 6
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            writer.close()

    async with aiohttp.ClientSession() as session:
        await health_latencies(session, server.url, 0.2)  # warm
        bombs = asyncio.gather(bomb(), bomb())
        latencies = await health_latencies(session, server.url, 2.0)
        await bombs
    assert latencies[int(len(latencies) * 0.99)] < 0.25, latencies[-5:]


async def test_a_small_body_that_inflates_past_the_limit_is_413_and_closed(client):
    first, block = gzip_bomb()
    body = first + block * 200  # 200 KB inflating to 201 MiB: under the 1 MiB limit compressed
    reader, writer = await raw_connection(client)
    writer.write(("POST /api/v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    status, headers, raw = await asyncio.wait_for(read_response(reader), 10)
    assert "inflated" in raw_problem(status, headers, raw, 413, "payload_too_large")["detail"]
    assert headers["connection"] == "close"
    assert await seconds_until_closed(reader, 6) < 6
    writer.close()
    # A body that really is gzip still counts as its inflated JSON.
    resp = await client.post("/api/v1/auth/register", data=gzip.compress(b'{"email": "ada@example.org", "password": "long enough pw"}'),
                             headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert resp.status == 201, await resp.text()


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br", "x-custom"])
async def test_unsupported_content_encodings_are_415_problems(client, encoding):
    resp = await client.post("/api/v1/auth/login", data=b"\x8b\x00\x80not really compressed",
                             headers={"Content-Type": "application/json", "Content-Encoding": encoding})
    body = await problem(resp, 415, "unsupported_content_encoding")
    assert "gzip" in body["detail"]


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, header_timeout=0.5)))
    reader, writer = await raw_connection(client)
    took = await seconds_until_closed(reader, 5)
    assert 0.4 < took < 5
    writer.close()
    # A keep-alive connection idle after its answer is closed the same way.
    reader, writer = await raw_connection(client)
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    assert await seconds_until_closed(reader, 5) < 5
    writer.close()


async def test_slow_headers_are_closed_after_the_header_timeout(aiohttp_client, data_dir):
    """Slowloris: each byte arrives in time for any per-read timeout, the head never completes."""
    client = await aiohttp_client(create_app(make_settings(data_dir, header_timeout=1.5)))
    reader, writer = await raw_connection(client)
    head = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    t0 = time.monotonic()
    with pytest.raises((ConnectionError, OSError)):
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), 0.5) == b"":
                raise ConnectionResetError("closed by the server")
    assert time.monotonic() - t0 < 6
    writer.close()


async def test_a_body_that_stops_arriving_is_408_and_closed(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, body_timeout=0.5)))
    reader, writer = await raw_connection(client)
    writer.write(b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"email\": ")
    status, headers, body = await asyncio.wait_for(read_response(reader), 5)
    raw_problem(status, headers, body, 408, "request_timeout")
    assert headers["connection"] == "close"
    assert await seconds_until_closed(reader, 3) < 3
    writer.close()


async def test_connections_are_capped_per_address(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, max_connections_per_address=3)))
    held = [await raw_connection(client) for _ in range(3)]
    await asyncio.sleep(0.1)
    reader, writer = await raw_connection(client)  # the fourth: closed at once
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await seconds_until_closed(reader, 2) < 2
    writer.close()
    held[0][1].close()
    await asyncio.sleep(0.2)
    reader, writer = await raw_connection(client)  # one slot free again
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
    for _, w in (*held[1:], (reader, writer)):
        w.close()


async def test_no_response_names_a_version_in_server(client):
    for resp in (await client.get("/api/v1/health"), await client.get("/api/v1/nothing/here"),
                 await client.get("/api/v1/openapi.json")):
        assert resp.headers["Server"] == "adiuva"
    # Nor the answer of aiohttp's own parser to a request that is not HTTP; it is problem+json too.
    reader, writer = await raw_connection(client)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    status, headers, body = await asyncio.wait_for(read_response(reader), 5)
    raw_problem(status, headers, body, 400, "malformed_request")
    assert headers["server"] == "adiuva"
    writer.close()


async def test_access_log_names_the_user_never_a_token_email_or_query(client, account, caplog):
    me = (await (await client.get("/api/v1/auth/me", headers=account.headers)).json())["id"]
    caplog.clear()
    # aiohttp asks the access logger once per connection whether it logs: a new connection.
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        async with aiohttp.ClientSession() as session:
            resp = await session.get(client.make_url("/api/v1/auth/me"), headers=account.headers,
                                     params={"token": account.access_token, "q": "secret-query"})
            assert resp.status == 200
            assert (await session.get(client.make_url("/api/v1/health"))).status == 200
        await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    me_line = next(line for line in lines if "/auth/me" in line)
    assert f"user={me}" in me_line
    for secret in (account.access_token, account.email, "secret-query", "token="):
        assert secret not in caplog.text
    assert next(line for line in lines if "/health" in line).endswith("user=-")


def test_control_characters_in_a_path_cannot_forge_log_lines(server_process):
    """`%0a` and `%00` in a URL path once wrote a forged second line and a NUL into the log."""
    import urllib.error
    import urllib.request

    server = server_process()
    for path in ("/api/v1/x%0a2026-12-03 12:00:00,000 INFO adiuva: forged%00line", "/api/v1/%0d%0aforged%1b[2J"):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(server.url + path.replace(" ", "%20"), timeout=10)
    assert server.stop() == 0
    output = "".join(server.output)
    assert "\x00" not in output and "\x1b" not in output and "\r" not in output
    assert not [line for line in output.splitlines() if line.startswith(("2026-12-03 12:00:00", "forged"))]
    assert "x\\n2026-12-03 12:00:00,000 INFO adiuva: forged\\x00line" in output


def test_the_log_formatter_escapes_messages_and_indents_tracebacks():
    from adiuva_server.http.accesslog import EscapingFormatter

    record = logging.LogRecord("adiuva", logging.ERROR, __file__, 1, "path %s", ("a\nFORGED\x00",), None)
    try:
        raise ValueError("boom\nFORGED line")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    text = EscapingFormatter("%(levelname)s %(message)s").format(record)
    first, *rest = text.split("\n")
    assert first == "ERROR path a\\nFORGED\\x00"
    assert rest and all(line.startswith(" ") for line in rest)
