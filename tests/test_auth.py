"""Accounts over a real socket: register, login, refresh rotation and reuse, me, and every way
a token can be bad."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import time

import jwt
import pytest

from adiuva_server.app import create_app
from adiuva_server.auth.passwords import PasswordHasher
from adiuva_server.keys import AUTH
from tests.conftest import both_backends, make_settings, register, run_cli, sql

# Every test on SQLite and on PostgreSQL (DATABASE_URL), unless marked sqlite_only.
pytestmark = both_backends


def secret_of(data_dir) -> str:
    return (data_dir / "jwt_secret").read_text().strip()


async def test_register_returns_tokens_and_normalises_email(client):
    resp = await client.post("/api/v1/auth/register", json={"email": "  Ada.Lovelace@Example.ORG ", "password": "correct horse battery"})
    assert resp.status == 201
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 30 * 60
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert (await me.json())["email"] == "ada.lovelace@example.org"


async def test_duplicate_email_in_any_case_is_a_conflict(client, account):
    resp = await client.post("/api/v1/auth/register", json={"email": "ADA@example.org", "password": "another password"})
    assert resp.status == 409
    assert (await resp.json())["code"] == "email_taken"


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"email": "not-an-email", "password": "long enough pw"}, "email"),
        ({"email": "a@b@c", "password": "long enough pw"}, "email"),
        ({"email": "ada@exa mple.org", "password": "long enough pw"}, "email"),
        ({"email": "ada@example.org", "password": "short"}, "password"),
        ({"email": "ada@example.org", "password": "x" * 1025}, "password"),
        ({"email": "ada@example.org", "password": "          "}, "password"),
        ({"email": "ada@example.org"}, "password"),
        ({"email": 42, "password": "long enough pw"}, "email"),
        ({"email": "ada@example.org", "password": "long enough pw", "tier": "team"}, "tier"),
    ],
)
async def test_register_rejects_bad_input_and_stores_nothing(client, payload, field):
    resp = await client.post("/api/v1/auth/register", json=payload)
    assert resp.status == 422, await resp.text()
    assert resp.headers["Content-Type"] == "application/problem+json"
    body = await resp.json()
    assert body["code"] == "validation_error"
    assert field in body["detail"]
    # Nothing was stored: the address is still free.
    ok = await client.post("/api/v1/auth/register", json={"email": "ada@example.org", "password": "long enough pw"})
    assert ok.status == 201


@pytest.mark.parametrize("raw", [b"", b"{bad json", b"[]", b"null", b'"text"'])
async def test_malformed_bodies_are_problems_not_500s(client, raw):
    resp = await client.post("/api/v1/auth/login", data=raw, headers={"Content-Type": "application/json"})
    assert resp.status in (400, 422)
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert (await resp.json())["code"] in ("malformed_request", "validation_error")


async def test_first_user_is_admin_later_ones_are_not(client, data_dir):
    await register(client, "first@example.org")
    await register(client, "second@example.org")
    rows = dict(await sql(client, "SELECT email, is_admin FROM users"))
    assert rows == {"first@example.org": True, "second@example.org": False}


async def test_closed_signups(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, signups_open=False)))
    resp = await client.post("/api/v1/auth/register", json={"email": "ada@example.org", "password": "long enough pw"})
    assert resp.status == 403
    assert (await resp.json())["code"] == "signups_closed"


async def test_login(client, account):
    resp = await client.post("/api/v1/auth/login", json={"email": "ADA@example.org", "password": account.password})
    assert resp.status == 200
    body = await resp.json()
    me = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status == 200


@pytest.mark.parametrize("email, password", [("ada@example.org", "wrong password"), ("nobody@example.org", "whatever pw")])
async def test_login_failures_look_the_same(client, account, email, password):
    resp = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert resp.status == 401
    body = await resp.json()
    assert body["code"] == "invalid_credentials"
    assert body["detail"] == "Invalid email or password"


async def test_refresh_rotates_and_reuse_revokes_the_family(aiohttp_client, data_dir):
    # No retry grace: any second use of a token is reuse.
    client = await aiohttp_client(create_app(make_settings(data_dir, refresh_grace_seconds=0)))
    account = await register(client)
    r1 = await client.post("/api/v1/auth/refresh", json={"refresh_token": account.refresh_token})
    assert r1.status == 200
    second = await r1.json()
    assert second["refresh_token"] != account.refresh_token
    # The first token was used: presenting it again is reuse, and revokes the whole family...
    again = await client.post("/api/v1/auth/refresh", json={"refresh_token": account.refresh_token})
    assert again.status == 401
    assert (await again.json())["code"] == "token_reused"
    # ...including the token issued by the legitimate rotation.
    after = await client.post("/api/v1/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert after.status == 401
    # Another session (a second login) is a different family and keeps working.
    login = await client.post("/api/v1/auth/login", json={"email": account.email, "password": account.password})
    other = await client.post("/api/v1/auth/refresh", json={"refresh_token": (await login.json())["refresh_token"]})
    assert other.status == 200


@pytest.mark.sqlite_only("reads the SQLite file and its WAL byte for byte")
async def test_refresh_tokens_are_stored_only_as_hashes(client, account, data_dir):
    from adiuva_server.db import connect

    conn = connect(data_dir / "adiuva.db")
    blob = b"".join(bytes(r[0]) for r in conn.execute("SELECT token_hash FROM refresh_tokens"))
    assert account.refresh_token.encode() not in blob
    assert len(blob) == 32
    raw = (data_dir / "adiuva.db").read_bytes() + (data_dir / "adiuva.db-wal").read_bytes()
    assert account.refresh_token.encode() not in raw


async def test_unknown_and_garbage_refresh_tokens(client):
    for token in ["nope", "x" * 512]:
        resp = await client.post("/api/v1/auth/refresh", json={"refresh_token": token})
        assert resp.status == 401
        assert (await resp.json())["code"] == "invalid_token"


def _forge(payload: dict, header: dict) -> str:
    def b64(obj) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(payload)}."


async def _claims(client, account):
    return jwt.decode(account.access_token, options={"verify_signature": False})


async def test_bad_access_tokens_get_401(client, account, data_dir):
    claims = await _claims(client, account)
    secret = secret_of(data_dir)
    now = int(time.time())
    bad = {
        "alg none": _forge(claims, {"alg": "none", "typ": "JWT"}),
        "other algorithm, same secret": jwt.encode(claims, secret, algorithm="HS512"),
        "wrong secret": jwt.encode(claims, "y" * 48, algorithm="HS256"),
        "expired": jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, secret, algorithm="HS256"),
        "tampered payload": account.access_token.split(".")[0] + "." + _forge({**claims, "sub": "someone-else"}, {}).split(".")[1] + "." + account.access_token.split(".")[2],
        "not a jwt": "garbage",
        "unknown user": jwt.encode({**claims, "sub": "00000000-0000-0000-0000-000000000000"}, secret, algorithm="HS256"),
        "wrong type": jwt.encode({**claims, "typ": "refresh"}, secret, algorithm="HS256"),
        "no expiry": jwt.encode({k: v for k, v in claims.items() if k != "exp"}, secret, algorithm="HS256"),
        "session version not an integer": jwt.encode({**claims, "sv": False}, secret, algorithm="HS256"),
    }
    for name, token in bad.items():
        resp = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401, name
        assert resp.headers["Content-Type"] == "application/problem+json", name
        assert "WWW-Authenticate" in resp.headers
    for header in ["", "Bearer", "Basic dXNlcjpwYXNz", f"Token {account.access_token}"]:
        resp = await client.get("/api/v1/auth/me", headers={"Authorization": header} if header else {})
        assert resp.status == 401, header
    # The genuine token still works: the checks above were not vacuous.
    assert (await client.get("/api/v1/auth/me", headers=account.headers)).status == 200


async def test_undecodable_authorization_bytes_get_401(client, account):
    """Header bytes that are not UTF-8 reach the app as surrogates; they once made a 500."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"GET /api/v1/auth/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
                 b"Connection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"application/problem+json" in head


async def test_tier_comes_from_the_database_not_the_token(client, account, data_dir):
    await sql(client, "UPDATE users SET tier = 'free'")
    claims = await _claims(client, account)
    forged = jwt.encode({**claims, "tier": "team"}, secret_of(data_dir), algorithm="HS256")
    resp = await client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {forged}"})
    assert (await resp.json())["tier"] == "free"
    await sql(client, "UPDATE users SET tier = 'pro'")
    resp = await client.get("/api/v1/auth/me", headers=account.headers)
    assert (await resp.json())["tier"] == "pro"
    assert resp.headers["X-RateLimit-Limit"] == "60"


async def test_hash_queue_is_bounded_with_a_503(data_dir):
    import asyncio

    from adiuva_server import errors
    from adiuva_server.auth.passwords import PasswordHasher

    hasher = PasswordHasher(make_settings(data_dir, max_concurrent_hashes=1, argon2_time_cost=8), max_waiting=1)
    try:
        results = await asyncio.gather(*[hasher.hash("a password") for _ in range(4)], return_exceptions=True)
    finally:
        hasher.close()
    refused = [r for r in results if isinstance(r, errors.ServiceUnavailable)]
    assert len(refused) == 2 and refused[0].headers["Retry-After"] == "1"
    assert sum(isinstance(r, str) and r.startswith("$argon2id$") for r in results) == 2


# -- refresh retries, family revocation -------------------------------------------------------

def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def refresh(client, token: str):
    return await client.post("/api/v1/auth/refresh", json={"refresh_token": token})


async def test_racing_refreshes_from_one_token_all_get_the_same_successor(client, account):
    """Two windows of the app (or a network retry) refreshing at once must not log the user out."""
    results = await asyncio.gather(*[refresh(client, account.refresh_token) for _ in range(5)])
    assert [r.status for r in results] == [200] * 5
    bodies = [await r.json() for r in results]
    assert len({b["refresh_token"] for b in bodies}) == 1
    assert bodies[0]["refresh_token"] != account.refresh_token
    for b in bodies:  # each got a working access token of its own
        assert (await client.get("/api/v1/auth/me", headers=bearer(b["access_token"]))).status == 200
    # The shared successor is a valid, unused token: the session goes on.
    nxt = await refresh(client, bodies[0]["refresh_token"])
    assert nxt.status == 200
    assert (await client.get("/api/v1/auth/me", headers=bearer((await nxt.json())["access_token"]))).status == 200


async def test_reuse_after_the_grace_revokes_the_family_and_its_access_tokens_at_once(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, refresh_grace_seconds=1)))
    account = await register(client)
    other = await client.post("/api/v1/auth/login", json={"email": account.email, "password": account.password})
    other_access = (await other.json())["access_token"]
    rotated = await (await refresh(client, account.refresh_token)).json()
    assert (await client.get("/api/v1/auth/me", headers=bearer(rotated["access_token"]))).status == 200
    await asyncio.sleep(1.5)  # past the grace
    reused = await refresh(client, account.refresh_token)
    assert reused.status == 401 and (await reused.json())["code"] == "token_reused"
    # The newest rotation's access token (and the family's first one) stop working at once,
    # not when they expire.
    for token in (rotated["access_token"], account.access_token):
        resp = await client.get("/api/v1/auth/me", headers=bearer(token))
        assert resp.status == 401 and (await resp.json())["code"] == "invalid_token"
    assert (await refresh(client, rotated["refresh_token"])).status == 401
    # Another family of the same user (another device) is untouched.
    assert (await client.get("/api/v1/auth/me", headers=bearer(other_access))).status == 200


async def test_a_retry_after_the_successor_was_used_is_reuse(client, account):
    first = await (await refresh(client, account.refresh_token)).json()
    second = await (await refresh(client, first["refresh_token"])).json()
    # Within the grace, but the successor has been used since: a replay, not a retry.
    late = await refresh(client, account.refresh_token)
    assert late.status == 401 and (await late.json())["code"] == "token_reused"
    assert (await client.get("/api/v1/auth/me", headers=bearer(second["access_token"]))).status == 401
    assert (await refresh(client, second["refresh_token"])).status == 401


async def test_refresh_grace_stores_no_token_in_plaintext(client, account, data_dir):
    first = await (await refresh(client, account.refresh_token)).json()
    again = await (await refresh(client, account.refresh_token)).json()
    assert again["refresh_token"] == first["refresh_token"]
    raw = b"".join(p.read_bytes() for p in data_dir.glob("adiuva.db*"))
    for token in (account.refresh_token, first["refresh_token"]):
        assert token.encode() not in raw


# -- login throttles -------------------------------------------------------------------------

class CountingHasher(PasswordHasher):
    """The real hasher, counting the password checks it is asked for."""

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.verifies = 0

    async def verify(self, stored_hash, password):
        self.verifies += 1
        return await super().verify(stored_hash, password)


@pytest.fixture
def counting(client):
    """Swap the live app's hasher for a counting one (after start-up, where the app builds it)."""
    auth = client.server.app[AUTH]
    hasher = CountingHasher(auth.settings)
    original, auth.hasher = auth.hasher, hasher
    yield hasher
    auth.hasher = original
    hasher.close()


def login_json(email: str, password: str) -> dict:
    return {"email": email, "password": password}


async def test_concurrent_wrong_passwords_get_at_most_the_limit_of_checks(client, account, counting, settings):
    results = await asyncio.gather(*[
        client.post("/api/v1/auth/login", json=login_json(account.email, f"wrong guess {i}")) for i in range(300)
    ])
    statuses = [r.status for r in results]
    assert set(statuses) <= {401, 429}
    assert counting.verifies <= settings.login_failures_per_account
    assert statuses.count(401) == counting.verifies == settings.login_failures_per_account


async def test_concurrent_correct_logins_from_one_address_all_get_through(client, account, counting):
    # More than either limit at once: in-flight checks hold places, they must not refuse the rest.
    results = await asyncio.gather(*[
        client.post("/api/v1/auth/login", json=login_json(account.email, account.password)) for _ in range(30)
    ])
    assert [r.status for r in results] == [200] * 30
    assert counting.verifies == 30


@pytest.fixture
async def proxied(aiohttp_client, data_dir):
    """A server behind a trusted proxy on loopback: X-Forwarded-For names the client address."""
    settings = make_settings(data_dir, trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    client = await aiohttp_client(create_app(settings))
    client.counting = CountingHasher(settings)
    auth = client.server.app[AUTH]
    original, auth.hasher = auth.hasher, client.counting
    yield client
    auth.hasher = original
    client.counting.close()


def from_(address: str) -> dict:
    return {"X-Forwarded-For": address}


async def test_a_distributed_guesser_gets_at_most_the_account_limit_of_checks(proxied, settings):
    account = await register(proxied)
    results = await asyncio.gather(*[
        proxied.post("/api/v1/auth/login", json=login_json(account.email, f"guess {i}"), headers=from_(f"10.1.{i // 250}.{i % 250}"))
        for i in range(300)
    ])
    assert set(r.status for r in results) <= {401, 429}
    assert proxied.counting.verifies == settings.login_failures_per_account


async def test_a_stranger_cannot_lock_the_user_out(proxied):
    home, stranger = "198.51.100.7", "203.0.113.66"
    resp = await proxied.post("/api/v1/auth/register", json=login_json("ada@example.org", "correct horse battery"),
                              headers=from_(home))
    assert resp.status == 201
    statuses = [(await proxied.post("/api/v1/auth/login", json=login_json("ada@example.org", f"guess {i}"),
                                    headers=from_(stranger))).status for i in range(12)]
    assert statuses == [401] * 10 + [429] * 2
    # The right password from the address the user signs in from still works...
    ok = await proxied.post("/api/v1/auth/login", json=login_json("ada@example.org", "correct horse battery"),
                            headers=from_(home))
    assert ok.status == 200
    # ...while the strangers' pool stays closed to every address that never signed in (the
    # documented price of bounding a distributed guesser): no password is checked for them.
    before = proxied.counting.verifies
    for address in ("203.0.113.67", "192.0.2.1"):
        resp = await proxied.post("/api/v1/auth/login", json=login_json("ada@example.org", "guess"), headers=from_(address))
        assert resp.status == 429 and "account" in (await resp.json())["detail"]
    assert proxied.counting.verifies == before


async def test_the_users_own_failures_only_hold_back_her_address(proxied):
    laptop, phone = "198.51.100.7", "198.51.100.8"
    for address in (laptop, phone):
        resp = await proxied.post("/api/v1/auth/login" if address == phone else "/api/v1/auth/register",
                                  json=login_json("ada@example.org", "correct horse battery"), headers=from_(address))
        assert resp.status in (200, 201)
    for i in range(10):
        await proxied.post("/api/v1/auth/login", json=login_json("ada@example.org", f"typo {i}"), headers=from_(laptop))
    locked = await proxied.post("/api/v1/auth/login", json=login_json("ada@example.org", "correct horse battery"),
                                headers=from_(laptop))
    assert locked.status == 429
    ok = await proxied.post("/api/v1/auth/login", json=login_json("ada@example.org", "correct horse battery"),
                            headers=from_(phone))
    assert ok.status == 200


async def lock_out(client, account) -> None:
    for i in range(10):
        assert (await client.post("/api/v1/auth/login", json=login_json(account.email, f"wrong {i}"))).status == 401
    resp = await client.post("/api/v1/auth/login", json=login_json(account.email, account.password))
    assert resp.status == 429


async def test_unlock_from_the_cli_lifts_a_backoff_on_the_running_server(client, account, data_dir):
    await lock_out(client, account)
    out = await asyncio.to_thread(run_cli, data_dir, "user", "unlock", "ADA@example.org")
    assert out.returncode == 0, out.stderr
    assert "unlocked" in out.stdout
    resp = await client.post("/api/v1/auth/login", json=login_json(account.email, account.password))
    assert resp.status == 200
    missing = await asyncio.to_thread(run_cli, data_dir, "user", "unlock", "nobody@example.org")
    assert missing.returncode == 1 and "no user" in missing.stderr


async def test_a_new_password_lifts_a_backoff(client, account, data_dir):
    await lock_out(client, account)
    out = await asyncio.to_thread(run_cli, data_dir, "user", "passwd", account.email, "--password", "a brand new one")
    assert out.returncode == 0, out.stderr
    resp = await client.post("/api/v1/auth/login", json=login_json(account.email, "a brand new one"))
    assert resp.status == 200


async def test_auth_service_unlock_lifts_a_backoff_in_process(client, account):
    """What the admin API calls: AuthService.unlock(email)."""
    await lock_out(client, account)
    await client.server.app[AUTH].unlock(" Ada@Example.org ")
    resp = await client.post("/api/v1/auth/login", json=login_json(account.email, account.password))
    assert resp.status == 200
    from adiuva_server import errors

    with pytest.raises(errors.NotFound):
        await client.server.app[AUTH].unlock("nobody@example.org")


async def test_new_hash_costs_upgrade_the_hash_without_ending_sessions(aiohttp_client, data_dir):
    first = await aiohttp_client(create_app(make_settings(data_dir)))
    account = await register(first)
    await first.close()
    # The admin raises the cost: the next login rehashes the password, and is only a login.
    client = await aiohttp_client(create_app(make_settings(data_dir, argon2_time_cost=3)))
    resp = await client.post("/api/v1/auth/login", json=login_json(account.email, account.password))
    assert resp.status == 200
    [(stored,)] = await sql(client, "SELECT password_hash FROM users")
    assert ",t=3," in stored
    assert (await client.get("/api/v1/auth/me", headers=account.headers)).status == 200
    assert (await refresh(client, account.refresh_token)).status == 200


class SuspendingAccounts:
    """The account store as a networked backend answers: `auth_state` suspends (a round trip)
    before it reads, and another request may commit meanwhile."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.reads = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def auth_state(self, user_id):
        await asyncio.sleep(0.001)
        self.reads += 1
        return await self._inner.auth_state(user_id)


async def test_every_authenticated_path_awaits_the_store(aiohttp_client, settings):
    """AccountStore.auth_state is async end to end (the middleware, the chat socket, the
    console): a store that suspends still decides each request, and a change counts on the next."""
    app = create_app(settings)

    async def wrap(app):
        app[AUTH].store = SuspendingAccounts(app[AUTH].store)
        yield

    app.cleanup_ctx.append(wrap)
    client = await aiohttp_client(app)
    acct = await register(client)
    store = client.server.app[AUTH].store
    me = await client.get("/api/v1/auth/me", headers=acct.headers)
    assert me.status == 200 and (await me.json())["email"] == acct.email
    assert store.reads == 1
    async with client.ws_connect(f"/api/v1/chat/stream?token={acct.access_token}") as ws:
        assert store.reads == 2
    await store.update_user(acct.email, disabled=True)
    me = await client.get("/api/v1/auth/me", headers=acct.headers)
    assert me.status == 401 and (await me.json())["code"] == "invalid_token"
    refused = await client.get(f"/api/v1/chat/stream?token={acct.access_token}")
    assert refused.status == 401
    assert store.reads == 4
