"""A security matrix over every route the server serves: no token, expired, tampered, wrong
key, `alg: none`, a deleted user's token, another user's token and ids, the wrong tier, a
non-admin on admin routes, traversal strings and junk as ids, malformed and oversized bodies
and headers. Expected: 401/403/404/400/413/422 problem+json, never a leak, never a 500, and
nothing changed.

Every route must have a valid request in REQUESTS below: a new route without one fails
`test_every_route_is_in_the_matrix`, so the matrix cannot silently fall behind the server."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest

from adiuva_server.app import create_app
from adiuva_server.auth.tokens import AccessTokens
from adiuva_server.keys import AUTH, ROUTES, SETTINGS

from tests.conftest import make_settings, register

API = "/api/v1"
RECORD_BYTES = b"\x00encrypted record\xff" * 8
BACKUP_BYTES = b"\x01encrypted backup\xfe" * 8
PROBLEM = "application/problem+json"


def _plugin_package() -> bytes:
    import gzip
    import io
    import tarfile

    manifest = json.dumps({"id": "matrix-plugin", "name": "Matrix", "description": "d", "version": "1.0.0",
                           "author": "a", "category": "Utilities", "price_cents": 0, "currency": "EUR",
                           "permissions": []}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("manifest.json", manifest), ("index.js", b"export default {};")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue())


PLUGIN_PACKAGE = _plugin_package()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vector(seed: float) -> list[float]:
    return [seed + i / 10 for i in range(8)]


@dataclass
class Req:
    """A request that succeeds for the owner of the ids in `path`."""

    json: Any = None
    data: bytes | None = None
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def _payload(data: bytes) -> dict:
    return {"payload": base64.b64encode(data).decode(), "checksum": sha(data)}


# (method, path relative to /api/v1) -> a valid request; {record_id} etc. are the owner's ids.
REQUESTS: dict[tuple[str, str], Req] = {
    ("GET", "/health"): Req(),
    ("GET", "/openapi.json"): Req(),
    ("GET", "/metrics"): Req(),  # its own token (tests/test_metrics.py), served at the root
    ("POST", "/auth/register"): Req(json={"email": "new@example.org", "password": "correct horse battery"}),
    ("POST", "/auth/login"): Req(json={"email": "ada@example.org", "password": "correct horse battery"}),
    ("POST", "/auth/refresh"): Req(json={"refresh_token": "{refresh_token}"}),
    ("GET", "/auth/me"): Req(),
    ("POST", "/storage/records"): Req(data=RECORD_BYTES, params={"table": "tasks"},
                                      headers={"X-Checksum": sha(RECORD_BYTES), "Content-Type": "application/octet-stream"}),
    ("GET", "/storage/records"): Req(params={"table": "tasks"}),
    ("GET", "/storage/records/{record_id}"): Req(),
    ("PUT", "/storage/records/{record_id}"): Req(data=RECORD_BYTES[::-1],
                                                 headers={"X-Checksum": sha(RECORD_BYTES[::-1]),
                                                          "Content-Type": "application/octet-stream"}),
    ("DELETE", "/storage/records/{record_id}"): Req(),
    ("GET", "/storage/changes"): Req(params={"since": "0", "include_data": "true"}),
    ("POST", "/storage/records/batch"): Req(json={"records": [
        {"table": "tasks", "data": base64.b64encode(RECORD_BYTES).decode(), "checksum": sha(RECORD_BYTES)},
        {"table": "tasks", "id": "{record_id}", "data": base64.b64encode(RECORD_BYTES[::-1]).decode(),
         "checksum": sha(RECORD_BYTES[::-1])}]}),
    ("PUT", "/backup"): Req(data=BACKUP_BYTES, headers={
        "X-Backup-Version": "1", "X-Backup-Timestamp": "2026-01-01T00:00:00Z",
        "X-Backup-Checksum": sha(BACKUP_BYTES), "Content-Type": "application/octet-stream"}),
    ("GET", "/backup"): Req(),
    ("GET", "/backup/history"): Req(),
    ("GET", "/backup/{backup_id}"): Req(),
    ("DELETE", "/backup/{backup_id}"): Req(),
    ("POST", "/storage/vectors/upsert"): Req(json={"vectors": [{"id": "v-new", "values": vector(5), **_payload(b"p")}]}),
    ("POST", "/storage/vectors/search"): Req(json={"values": vector(1), "top_k": 5}),
    ("DELETE", "/storage/vectors"): Req(json={"ids": ["{vector_id}"]}),
    ("POST", "/chat"): Req(json={"message": "hello", "context": {}}),
    ("GET", "/chat/models"): Req(),
    ("GET", "/chat/stream"): Req(),
    ("GET", "/plans/playbook"): Req(),
    ("GET", "/plans/playbook/{plan_id}"): Req(),
    ("POST", "/plans"): Req(json={"name": "mine", "steps": [{"id": "s1", "kind": "llm", "template_id": "{template_id}"}]}),
    ("POST", "/plans/{plan_id}/run"): Req(json={"context": {}}),
    ("GET", "/plans/batches"): Req(),
    # Admin routes act on {user_id}: another account (the owner is the first account: the admin).
    ("GET", "/admin/users"): Req(params={"q": "example"}),
    ("POST", "/admin/users"): Req(json={"email": "made@example.org", "tier": "pro"}),
    ("GET", "/admin/users/{user_id}"): Req(),
    ("PATCH", "/admin/users/{user_id}"): Req(json={"tier": "free"}),
    ("DELETE", "/admin/users/{user_id}"): Req(),
    ("POST", "/admin/users/{user_id}/unlock"): Req(),
    ("GET", "/admin/status"): Req(),
    ("GET", "/admin/backups"): Req(),
    ("POST", "/admin/backups"): Req(),
    ("POST", "/admin/doctor"): Req(),
    # Billing (licensed mode; here homelab mode, so 404 billing_not_enabled after auth and validation).
    ("POST", "/billing/checkout"): Req(json={"tier": "pro"}),
    ("GET", "/billing/subscription"): Req(),
    ("DELETE", "/billing/subscription"): Req(),
    ("POST", "/billing/portal"): Req(),
    ("POST", "/billing/webhook"): Req(data=b'{"id": "evt_1"}', headers={"Stripe-Signature": "t=1,v1=00",
                                                                       "Content-Type": "application/json"}),
    # The marketplace: {plugin_id} is a bundled plugin (shared, not owned).
    ("GET", "/plugins"): Req(params={"category": "Productivity", "q": "sync", "sort": "installs"}),
    ("GET", "/plugins/installed"): Req(),
    ("GET", "/plugins/signing-key"): Req(),
    ("GET", "/plugins/submissions"): Req(),
    ("POST", "/plugins/submissions"): Req(data=PLUGIN_PACKAGE, headers={"Content-Type": "application/octet-stream"}),
    ("GET", "/plugins/{plugin_id}"): Req(),
    ("POST", "/plugins/{plugin_id}/install"): Req(),
    ("DELETE", "/plugins/{plugin_id}/install"): Req(),
    ("PUT", "/plugins/{plugin_id}/rating"): Req(json={"stars": 4}),
    ("GET", "/plugins/{plugin_id}/package"): Req(),
    ("GET", "/admin/plugins/pending"): Req(),
    ("POST", "/admin/plugins"): Req(data=PLUGIN_PACKAGE, headers={"Content-Type": "application/octet-stream"}),
    ("GET", "/admin/plugins/{plugin_id}"): Req(),
    ("POST", "/admin/plugins/{plugin_id}/approve"): Req(json={"notes": "ok"}),
    ("POST", "/admin/plugins/{plugin_id}/reject"): Req(json={"reason": "no"}),
    ("POST", "/admin/plugins/{plugin_id}/revoke"): Req(json={"notes": "gone"}),
    ("GET", "/plugins/earnings"): Req(params={"from": "2026-12-01", "to": "2026-12-31"}),
    ("GET", "/admin/plugins/earnings"): Req(params={"developer": "ada@example.org"}),
    ("GET", "/admin/plugins/purchases"): Req(),
    # Homelab mode has no purchases: the id is a made-up one (404 for its admin, 403 for others).
    ("POST", "/admin/plugins/purchases/{purchase_id}/refund"): Req(),
}

# Routes that answer without a bearer token on purpose.
PUBLIC = {("GET", "/health"), ("GET", "/openapi.json"), ("POST", "/auth/register"), ("POST", "/auth/login"),
          ("POST", "/auth/refresh"), ("GET", "/chat/stream"), ("GET", "/metrics"), ("GET", "/plugins/signing-key"),
          ("POST", "/billing/webhook")}  # Stripe signs it instead
# Ids that are global, not owned (the built-in playbook): another user may read them.
SHARED_IDS = {("GET", "/plans/playbook/{plan_id}"), ("GET", "/plugins/{plugin_id}"), ("POST", "/plugins/{plugin_id}/install"),
              ("DELETE", "/plugins/{plugin_id}/install"), ("PUT", "/plugins/{plugin_id}/rating"),
              ("GET", "/plugins/{plugin_id}/package")}

JUNK_IDS = ["../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%00", "%0a%0dX-Injected:1", "' OR '1'='1",
            "a" * 2000, "%E2%80%AE", "\\..\\..\\windows", "00000000-0000-0000-0000-000000000000", "%ff%fe"]


def specs():
    from adiuva_server.app import FEATURES

    return [s for f in FEATURES for s in f.specs]


@pytest.fixture
def settings(data_dir):
    return make_settings(data_dir, default_tier="team", max_record_bytes=64 * 1024, max_backup_bytes=64 * 1024,
                         rate_limits={"free": 100_000, "pro": 100_000, "power": 100_000, "team": 100_000},
                         ollama_host="http://127.0.0.1:9", llm_models=("ollama/llama3.2", "ollama/other"))


@dataclass
class Owner:
    headers: dict
    user_id: str
    ids: dict[str, str]


async def _owner(client) -> Owner:
    """ada@example.org with one of everything."""
    acct = await register(client, "ada@example.org")
    me = await (await client.get(f"{API}/auth/me", headers=acct.headers)).json()
    r = REQUESTS[("POST", "/storage/records")]
    rec = await client.post(f"{API}/storage/records", data=r.data, params=r.params, headers={**acct.headers, **r.headers})
    assert rec.status == 201, await rec.text()
    b = REQUESTS[("PUT", "/backup")]
    bak = await client.put(f"{API}/backup", data=b.data, headers={**acct.headers, **b.headers})
    assert bak.status == 201, await bak.text()
    up = await client.post(f"{API}/storage/vectors/upsert", headers=acct.headers,
                           json={"vectors": [{"id": "ada-v1", "values": vector(1), **_payload(b"ada secret")}]})
    assert up.status == 200, await up.text()
    playbook = await (await client.get(f"{API}/plans/playbook", headers=acct.headers)).json()
    playbook_id = playbook["items"][0]["plan_id"]
    detail = await (await client.get(f"{API}/plans/playbook/{playbook_id}", headers=acct.headers)).json()
    template_id = next(s["template_id"] for s in detail["steps"] if s.get("template_id"))
    plan = await client.post(f"{API}/plans", headers=acct.headers,
                             json={"name": "ada's", "steps": [{"id": "s1", "kind": "llm", "template_id": template_id}]})
    assert plan.status in (200, 201), await plan.text()
    installed = await client.post(f"{API}/plugins/github-sync/install", headers=acct.headers)
    assert installed.status == 200, await installed.text()
    rated = await client.put(f"{API}/plugins/github-sync/rating", headers=acct.headers, json={"stars": 5})
    assert rated.status == 200, await rated.text()
    victim = await register(client, "victim@example.org")
    victim_me = await (await client.get(f"{API}/auth/me", headers=victim.headers)).json()
    ids = {"user_id": victim_me["id"], "record_id": (await rec.json())["id"], "backup_id": (await bak.json())["id"], "vector_id": "ada-v1",
           "plan_id": (await plan.json())["plan_id"], "template_id": template_id,
           "refresh_token": acct.refresh_token, "playbook_id": playbook_id, "plugin_id": "github-sync",
           "purchase_id": "00000000-0000-4000-8000-000000000000"}
    return Owner(acct.headers, me["id"], ids)


async def _snapshot(client, owner: Owner) -> dict:
    """What the owner can see: it must be the same after every hostile request."""
    h = owner.headers
    rec = await client.get(f"{API}/storage/records/{owner.ids['record_id']}", headers=h)
    bak = await client.get(f"{API}/backup/{owner.ids['backup_id']}", headers=h)
    hits = await (await client.post(f"{API}/storage/vectors/search", headers=h, json={"values": vector(1), "top_k": 5})).json()
    listing = await (await client.get(f"{API}/storage/records", headers=h)).json()
    history = await (await client.get(f"{API}/backup/history", headers=h)).json()
    users = await (await client.get(f"{API}/admin/users", headers=h)).json()
    plugins = await (await client.get(f"{API}/admin/plugins/github-sync", headers=h)).json()
    installed = await (await client.get(f"{API}/plugins/installed", headers=h)).json()
    pending = await (await client.get(f"{API}/admin/plugins/pending", headers=h)).json()
    return {"users": sorted((u["email"], u["tier"], u["disabled"], u["admin"]) for u in users["items"]),"record": (rec.status, await rec.read()), "backup": (bak.status, await bak.read()),
            "vectors": sorted(m["id"] for m in hits["matches"]), "records": listing["total"],
            "backups": len(history["items"]),
            "plugins": (plugins["status"], plugins["install_count"], plugins["rating_count"], len(plugins["versions"]),
                        [i["plugin_id"] for i in installed["items"]], len(pending["items"]))}


def _fill(text: str, ids: dict[str, str]) -> str:
    for k, v in ids.items():
        text = text.replace("{" + k + "}", v)
    return text


def _request(method: str, path: str, ids: dict[str, str], override_path_ids: str | None = None) -> tuple[str, dict]:
    req = REQUESTS[(method, path)]
    url = API + (path if override_path_ids is None else _replace_params(path, override_path_ids))
    url = _fill(url, ids)
    kw: dict[str, Any] = {"params": req.params, "headers": dict(req.headers)}
    if req.json is not None:
        kw["data"] = _fill(json.dumps(req.json), ids).encode()
        kw["headers"]["Content-Type"] = "application/json"
    elif req.data is not None:
        kw["data"] = req.data
    return url, kw


def _replace_params(path: str, value: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", value.replace("\\", "\\\\"), path)


async def assert_problem(resp, statuses: set[int], codes: set[str] | None = None, secrets: tuple[str, ...] = ()) -> dict:
    text = await resp.text()
    assert resp.status in statuses, f"{resp.method} {resp.url}: {resp.status} {text[:300]}"
    assert resp.content_type == PROBLEM, f"{resp.method} {resp.url}: {resp.content_type} {text[:300]}"
    body = json.loads(text)
    assert {"type", "title", "status", "detail", "code"} <= body.keys() and body["status"] == resp.status
    if codes is not None:
        assert body["code"] in codes, body
    for secret in secrets:
        assert secret not in text, f"{resp.method} {resp.url} leaked {secret!r}"
    assert "Traceback" not in text
    return body


def test_every_route_is_in_the_matrix():
    served = {(s.method, s.path) for s in specs()}
    assert served, "no routes found"
    missing = served - REQUESTS.keys()
    assert not missing, f"routes without a matrix entry (add a valid request to REQUESTS): {sorted(missing)}"
    assert not REQUESTS.keys() - served, f"matrix entries for routes that no longer exist: {sorted(REQUESTS.keys() - served)}"


def _bad_tokens(secret: str, user_id: str, valid: str) -> dict[str, str | None]:
    now = 1_700_000_000
    claims = {"iss": "adiuva", "sub": user_id, "sv": 0, "typ": "access", "iat": now, "exp": now + 60}
    header, payload, signature = valid.split(".")
    forged_payload = base64.urlsafe_b64encode(json.dumps({**jwt.decode(valid, options={"verify_signature": False}),
                                                          "sv": 99}).encode()).rstrip(b"=").decode()
    return {
        "no header": None,
        "not bearer": f"Basic {base64.b64encode(b'ada@example.org:correct horse battery').decode()}",
        "empty bearer": "Bearer ",
        "garbage": "Bearer not.a.jwt",
        "expired": "Bearer " + jwt.encode(claims, secret, algorithm="HS256"),
        "tampered payload": f"Bearer {header}.{forged_payload}.{signature}",
        "tampered signature": f"Bearer {header}.{payload}.{signature[:-4]}AAAA",
        "other key": "Bearer " + AccessTokens("another server's secret, long enough", 600).issue(user_id, 0, "family"),
        "alg none": "Bearer " + jwt.encode({**claims, "exp": 4_000_000_000}, None, algorithm="none"),
        "refresh token as access": None,  # filled by the caller
    }


async def test_every_protected_route_refuses_bad_tokens_and_changes_nothing(client):
    owner = await _owner(client)
    before = await _snapshot(client, owner)
    secret = client.app[SETTINGS].jwt_secret
    tokens = _bad_tokens(secret, owner.user_id, owner.headers["Authorization"].split(" ", 1)[1])
    tokens["refresh token as access"] = "Bearer " + owner.ids["refresh_token"]
    # A deleted user's still-unexpired token.
    gone = await register(client, "gone@example.org")
    await client.app[AUTH].store.delete_user("gone@example.org")
    tokens["deleted user"] = gone.headers["Authorization"]
    checked = 0
    for spec in client.app[ROUTES]:
        if (spec.method, spec.path) in PUBLIC:
            continue
        for name, token in tokens.items():
            url, kw = _request(spec.method, spec.path, owner.ids)
            if token is not None:
                kw["headers"]["Authorization"] = token
            resp = await client.request(spec.method, url, **kw)
            body = await assert_problem(resp, {401}, {"unauthorized", "invalid_token"}, secrets=(owner.ids["record_id"],))
            assert "Bearer" in resp.headers.get("WWW-Authenticate", ""), (name, spec.path, body)
            checked += 1
    assert checked >= 10 * 20
    assert await _snapshot(client, owner) == before


async def test_the_websocket_refuses_bad_tokens(client):
    owner = await _owner(client)
    tokens = _bad_tokens(client.app[SETTINGS].jwt_secret, owner.user_id, owner.headers["Authorization"].split(" ", 1)[1])
    for name, token in tokens.items():
        params = {} if token is None else {"token": token.partition(" ")[2] or "x"}
        resp = await client.get(f"{API}/chat/stream", params=params,
                                headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                                         "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()})
        await assert_problem(resp, {401}, {"unauthorized", "invalid_token"})


async def test_another_users_ids_are_not_found_and_change_nothing(client):
    owner = await _owner(client)
    mallory = await register(client, "mallory@example.org")
    before = await _snapshot(client, owner)
    secrets = ("ada@example.org", owner.user_id, "ada secret", base64.b64encode(b"ada secret").decode())
    checked = 0
    for spec in client.app[ROUTES]:
        if "{" not in spec.path or (spec.method, spec.path) in SHARED_IDS:
            continue
        url, kw = _request(spec.method, spec.path, owner.ids)
        kw["headers"].update(mallory.headers)
        resp = await client.request(spec.method, url, **kw)
        if spec.path.startswith("/admin"):
            await assert_problem(resp, {403}, {"admin_required"}, secrets=secrets)
        else:
            await assert_problem(resp, {404}, {"not_found"}, secrets=secrets)
        checked += 1
    assert checked >= 6
    # Vectors have no id in the path: Mallory's search never sees Ada's, her delete never removes them.
    hits = await (await client.post(f"{API}/storage/vectors/search", headers=mallory.headers,
                                    json={"values": vector(1), "top_k": 10})).json()
    assert hits["matches"] == []
    resp = await client.request("DELETE", f"{API}/storage/vectors", headers=mallory.headers, json={"ids": ["ada-v1"]})
    assert resp.status in (200, 204), await resp.text()
    listing = await (await client.get(f"{API}/storage/records", headers=mallory.headers)).json()
    assert listing["total"] == 0 and listing["items"] == []
    assert (await client.get(f"{API}/backup", headers=mallory.headers)).status == 404
    changes = await (await client.get(f"{API}/storage/changes", headers=mallory.headers, params={"since": "0"})).json()
    assert owner.ids["record_id"] not in json.dumps(changes)
    assert await _snapshot(client, owner) == before


async def test_junk_and_traversal_ids_are_clean_problems(client):
    owner = await _owner(client)
    before = await _snapshot(client, owner)
    for spec in client.app[ROUTES]:
        if "{" not in spec.path:
            continue
        for junk in JUNK_IDS:
            url, kw = _request(spec.method, spec.path, owner.ids, override_path_ids=junk)
            kw["headers"].update(owner.headers)
            resp = await client.request(spec.method, url, **kw)
            await assert_problem(resp, {400, 404, 422})
    assert await _snapshot(client, owner) == before


async def test_the_wrong_tier_is_refused_and_stores_nothing(client):
    owner = await _owner(client)
    free = await register(client, "free@example.org")
    await client.app[AUTH].store.update_user("free@example.org", tier="free")
    refused = {
        ("POST", "/storage/records"): ({402}, {"quota_exceeded"}),
        ("POST", "/storage/records/batch"): ({402, 404}, {"quota_exceeded", "not_found"}),
        ("PUT", "/backup"): ({402}, {"quota_exceeded"}),
        ("POST", "/storage/vectors/upsert"): ({402}, {"quota_exceeded"}),
        ("POST", "/plans"): ({403}, {"feature_not_in_tier"}),
        ("GET", "/plugins"): ({403}, {"feature_not_in_tier"}),
        ("GET", "/plugins/{plugin_id}"): ({403}, {"feature_not_in_tier"}),
        ("POST", "/plugins/{plugin_id}/install"): ({403}, {"feature_not_in_tier"}),
        ("PUT", "/plugins/{plugin_id}/rating"): ({403}, {"feature_not_in_tier"}),
        ("GET", "/plugins/{plugin_id}/package"): ({403}, {"feature_not_in_tier"}),
    }
    for (method, path), (statuses, codes) in refused.items():
        url, kw = _request(method, path, owner.ids)
        kw["headers"].update(free.headers)
        await assert_problem(await client.request(method, url, **kw), statuses, codes)
    # Choosing a model is for pro and up: refused before any model is asked.
    resp = await client.post(f"{API}/chat", headers=free.headers,
                             json={"message": "hi", "model": "ollama/other"})
    await assert_problem(resp, {403}, {"feature_not_in_tier"})
    assert (await (await client.get(f"{API}/storage/records", headers=free.headers)).json())["total"] == 0
    assert (await client.get(f"{API}/backup", headers=free.headers)).status == 404
    assert (await (await client.get(f"{API}/plugins/installed", headers=free.headers)).json())["items"] == []
    hits = await (await client.post(f"{API}/storage/vectors/search", headers=free.headers,
                                    json={"values": vector(5), "top_k": 5})).json()
    assert hits["matches"] == []


async def test_non_admins_are_refused_on_every_admin_route(client):
    owner = await _owner(client)  # the first account: the admin
    plain = await register(client, "plain@example.org")
    admin_routes = [s for s in client.app[ROUTES] if s.path.startswith("/admin")]
    assert admin_routes, "the admin API is missing"
    for spec in admin_routes:
        url = API + _replace_params(spec.path, owner.user_id)
        for headers, status, code in ((plain.headers, 403, "admin_required"), ({}, 401, None)):
            resp = await client.request(spec.method, url, headers=headers, json={})
            await assert_problem(resp, {status}, None if code is None else {code}, secrets=("ada@example.org",))


async def test_malformed_bodies_are_clean_problems_and_change_nothing(client):
    owner = await _owner(client)
    before = await _snapshot(client, owner)
    json_routes = [s for s in client.app[ROUTES] if s.body is not None]
    assert len(json_routes) >= 6
    bad_bodies = [b"", b"{", b"[]", b"null", b'"text"', b"\xff\xfe\x00", b'{"a":' * 5000, json.dumps({"x": 1}).encode(),
                  b"1e999999", b'{"email": {"$ne": null}, "password": []}']
    for spec in json_routes:
        url, _ = _request(spec.method, spec.path, owner.ids)
        for body in bad_bodies:
            resp = await client.request(spec.method, url, data=body,
                                        headers={**owner.headers, "Content-Type": "application/json"})
            await assert_problem(resp, {400, 401, 413, 422})
        # Larger than any JSON body the route takes.
        limit = spec.body_limit(client.app[SETTINGS]) if spec.body_limit else 1024 * 1024
        resp = await client.request(spec.method, url, data=b"[" + b"0," * (limit // 2 + 1) + b"0]",
                                    headers={**owner.headers, "Content-Type": "application/json"})
        await assert_problem(resp, {413})
    assert await _snapshot(client, owner) == before


async def test_malformed_and_oversized_headers_and_raw_bodies(client):
    owner = await _owner(client)
    before = await _snapshot(client, owner)
    h = owner.headers
    rid = owner.ids["record_id"]
    cases = [
        ("POST", f"{API}/storage/records", {"params": {"table": "tasks"}, "data": RECORD_BYTES,
                                            "headers": {**h, "X-Checksum": "zz" * 32}}, {400, 422}),
        ("POST", f"{API}/storage/records", {"params": {"table": "../etc"}, "data": RECORD_BYTES,
                                            "headers": {**h, "X-Checksum": sha(RECORD_BYTES)}}, {400, 422}),
        ("POST", f"{API}/storage/records", {"params": {"table": "tasks"}, "data": b"x" * (64 * 1024 + 1),
                                            "headers": {**h, "X-Checksum": sha(b"x" * (64 * 1024 + 1))}}, {413}),
        ("PUT", f"{API}/storage/records/{rid}", {"data": RECORD_BYTES, "headers": {**h, "X-Checksum": sha(RECORD_BYTES),
                                                                                   "If-Match": '"nope"'}}, {412}),
        ("GET", f"{API}/storage/records/{rid}", {"headers": {**h, "Range": "bytes=999999-"}}, {416}),
        ("GET", f"{API}/storage/records", {"params": {"limit": "-1"}, "headers": h}, {422}),
        ("GET", f"{API}/storage/records", {"params": {"page": "x" * 5000}, "headers": h}, {422}),
        ("GET", f"{API}/storage/changes", {"params": {"since": "'; DROP TABLE records; --"}, "headers": h}, {400, 410, 422}),
        ("PUT", f"{API}/backup", {"data": BACKUP_BYTES, "headers": {**h, "X-Backup-Version": "1",
                                                                  "X-Backup-Timestamp": "yesterday",
                                                                  "X-Backup-Checksum": sha(BACKUP_BYTES)}}, {400, 422}),
        ("PUT", f"{API}/backup", {"data": b"y" * (64 * 1024 + 1), "headers": {
            **h, "X-Backup-Version": "1", "X-Backup-Timestamp": "2026-01-01T00:00:00Z",
            "X-Backup-Checksum": sha(b"y" * (64 * 1024 + 1))}}, {413}),
        ("GET", f"{API}/auth/me", {"headers": {"Authorization": "Bearer " + "A" * 6000}}, {401}),
    ]
    for method, url, kw, statuses in cases:
        await assert_problem(await client.request(method, url, **kw), statuses)
    assert await _snapshot(client, owner) == before
