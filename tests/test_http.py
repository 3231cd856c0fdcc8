"""The HTTP layer: problem+json for every error, CORS, security headers, rate limits and
login throttling, and when X-Forwarded-For is believed."""

from __future__ import annotations

import asyncio
import ipaddress

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
    needed |= {h.lower() for spec in client.app[ROUTES] for h in spec.request_headers}
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
