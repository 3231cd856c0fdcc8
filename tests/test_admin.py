"""The admin API (/api/v1/admin/...), the default tier of new accounts, and a user's deletion
that leaves none of their bytes behind, on the real server and real files."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import struct
import tarfile
import uuid

import pytest

from adiuva_server import server_backup
from adiuva_server.app import create_app
from adiuva_server.keys import ROUTES, SETTINGS
from tests.conftest import both_backends, free_port, make_settings, register, run_cli, sql

# Every test on SQLite and on PostgreSQL (DATABASE_URL), unless marked sqlite_only.
pytestmark = both_backends

# Generous limits, one per tier, so a tier change shows in X-RateLimit-Limit.
FAST = {"rate_limits": {"free": 10_001, "pro": 10_002, "power": 10_003, "team": 10_004}}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def settings(data_dir):
    return make_settings(data_dir, **FAST)


@pytest.fixture
async def admin(client):
    return await register(client, "ada@example.org")


@pytest.fixture
async def user(client, admin):
    return await register(client, "bob@example.org")


async def user_id(client, admin, email: str) -> str:
    resp = await client.get("/api/v1/admin/users", params={"q": email}, headers=admin.headers)
    assert resp.status == 200, await resp.text()
    (found,) = [u for u in (await resp.json())["items"] if u["email"] == email]
    return found["id"]


async def put_record(client, who, data: bytes, status: int = 201):
    resp = await client.post("/api/v1/storage/records?table=notes", data=data,
                             headers={**who.headers, "X-Checksum": sha(data), "Content-Type": "application/octet-stream"})
    assert resp.status == status, await resp.text()
    return await resp.json()


def admin_routes(client):
    return [s for s in client.app[ROUTES] if s.path.startswith("/admin")]


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)


# -- who may use it -----------------------------------------------------------------------------


async def test_every_admin_route_refuses_non_admins_and_anonymous_callers(client, admin, user):
    routes = admin_routes(client)
    assert len(routes) >= 9
    for spec in routes:
        url = "/api/v1" + concrete(spec.path)
        # No body at all: the admin check comes before the body is read or validated.
        resp = await client.request(spec.method, url, headers=user.headers)
        assert resp.status == 403, (spec.method, spec.path, await resp.text())
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["code"] == "admin_required"
        resp = await client.request(spec.method, url, json={"tier": "free"}, headers=user.headers)
        assert resp.status == 403, (spec.method, spec.path)
        resp = await client.request(spec.method, url)
        assert resp.status == 401, (spec.method, spec.path)
    # Nothing was changed by all those attempts.
    resp = await client.get("/api/v1/admin/users", headers=admin.headers)
    assert [(u["email"], u["tier"], u["admin"]) for u in (await resp.json())["items"]] == [
        ("ada@example.org", "team", True), ("bob@example.org", "team", False)]


async def test_admin_routes_are_in_the_openapi_document(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    for spec in admin_routes(client):
        op = doc["paths"]["/api/v1" + spec.path][spec.method.lower()]
        assert op["security"] == [{"bearer": []}] and "403" in op["responses"] and "401" in op["responses"]


async def test_the_first_account_is_admin_and_the_second_is_not(client, admin, user):
    assert (await client.get("/api/v1/admin/status", headers=admin.headers)).status == 200
    assert (await client.get("/api/v1/admin/status", headers=user.headers)).status == 403


# -- default tier -------------------------------------------------------------------------------


async def test_homelab_accounts_default_to_team_and_can_sync(aiohttp_client, data_dir):
    """A self-registered account on a fresh homelab server can store at once (it used to get
    `free`: 0 bytes, 402 on the first upload, 20 requests a minute)."""
    client = await aiohttp_client(create_app(make_settings(data_dir)))
    ada = await register(client)
    resp = await client.get("/api/v1/auth/me", headers=ada.headers)
    assert (await resp.json())["tier"] == "team" and resp.headers["X-RateLimit-Limit"] == "200"
    await put_record(client, ada, b"first sync")


async def test_default_tier_setting_still_decides(aiohttp_client, data_dir):
    settings = make_settings(data_dir)
    assert settings.licensed is False and settings.default_tier == "team"
    from adiuva_server.config import Settings

    free = Settings.from_env({"ADIUVA_DEFAULT_TIER": "free"}, data_dir=data_dir, env="test")
    client = await aiohttp_client(create_app(free))
    ada = await register(client)
    assert (await (await client.get("/api/v1/auth/me", headers=ada.headers)).json())["tier"] == "free"
    await put_record(client, ada, b"no room", status=402)


def test_licensed_mode_defaults_to_free():
    from adiuva_server.config import default_tier

    assert default_tier(licensed=True) == "free" and default_tier(licensed=False) == "team"


# -- users --------------------------------------------------------------------------------------


async def test_create_get_list_and_search_users(client, admin):
    resp = await client.post("/api/v1/admin/users", json={"email": "Carol@Example.org", "tier": "pro"}, headers=admin.headers)
    assert resp.status == 201, await resp.text()
    carol = await resp.json()
    assert carol["email"] == "carol@example.org" and carol["tier"] == "pro" and carol["admin"] is False
    assert len(carol["password"]) >= 16  # generated, shown once
    login = await client.post("/api/v1/auth/login", json={"email": "carol@example.org", "password": carol["password"]})
    assert login.status == 200

    resp = await client.post("/api/v1/admin/users", json={"email": "dan@example.org", "password": "dans password",
                                                           "admin": True}, headers=admin.headers)
    dan = await resp.json()
    assert resp.status == 201 and dan["password"] is None and dan["admin"] is True and dan["tier"] == "team"
    resp = await client.post("/api/v1/admin/users", json={"email": "dan@example.org"}, headers=admin.headers)
    assert resp.status == 409 and (await resp.json())["code"] == "email_taken"
    resp = await client.post("/api/v1/admin/users", json={"email": "eve@example.org", "password": "short"}, headers=admin.headers)
    assert resp.status == 422

    resp = await client.get(f"/api/v1/admin/users/{carol['id']}", headers=admin.headers)
    got = await resp.json()
    assert got["email"] == "carol@example.org" and "password" not in got
    assert (await client.get(f"/api/v1/admin/users/{uuid.uuid4()}", headers=admin.headers)).status == 404

    page = await (await client.get("/api/v1/admin/users", params={"limit": "2"}, headers=admin.headers)).json()
    assert page["total"] == 3 and [u["email"] for u in page["items"]] == ["ada@example.org", "carol@example.org"]
    page = await (await client.get("/api/v1/admin/users", params={"limit": "2", "page": "2"}, headers=admin.headers)).json()
    assert [u["email"] for u in page["items"]] == ["dan@example.org"]
    page = await (await client.get("/api/v1/admin/users", params={"q": "CAR"}, headers=admin.headers)).json()
    assert page["total"] == 1 and page["items"][0]["email"] == "carol@example.org"
    page = await (await client.get("/api/v1/admin/users", params={"q": "%"}, headers=admin.headers)).json()
    assert page["total"] == 0  # literal, not a pattern
    assert (await client.get("/api/v1/admin/users", params={"limit": "0"}, headers=admin.headers)).status == 422


async def test_users_carry_their_usage(client, admin, user):
    await put_record(client, user, b"x" * 1000)
    await put_record(client, user, b"y" * 500)
    payload = b"p" * 10
    vectors = [{"id": f"v{i}", "values": [1.0, float(i)], "payload": base64.b64encode(payload).decode(),
                "checksum": sha(payload)} for i in range(3)]
    resp = await client.post("/api/v1/storage/vectors/upsert", json={"vectors": vectors}, headers=user.headers)
    assert resp.status == 200, await resp.text()
    backup = b"b" * 300
    resp = await client.put("/api/v1/backup", data=backup, headers={
        **user.headers, "X-Backup-Version": "1", "X-Backup-Timestamp": "2026-12-01T00:00:00Z", "X-Backup-Checksum": sha(backup)})
    assert resp.status == 201
    got = await (await client.get(f"/api/v1/admin/users/{await user_id(client, admin, user.email)}", headers=admin.headers)).json()
    assert got["usage"] == {"records": 2, "storage_bytes": 1500 + 3 * (10 + 8), "backup_bytes": 300, "vectors": 3}
    status = await (await client.get("/api/v1/admin/status", headers=admin.headers)).json()
    assert status["counts"] == {"users": 2, "records": 2, "vectors": 3}
    assert status["storage_bytes"] == 1554 and status["backup_bytes"] == 300


async def test_tier_change_takes_effect_on_the_next_request(client, admin, user):
    bob = await user_id(client, admin, user.email)
    resp = await client.patch(f"/api/v1/admin/users/{bob}", json={"tier": "free"}, headers=admin.headers)
    assert resp.status == 200 and (await resp.json())["tier"] == "free"
    resp = await client.get("/api/v1/auth/me", headers=user.headers)
    assert (await resp.json())["tier"] == "free" and resp.headers["X-RateLimit-Limit"] == "10001"
    await put_record(client, user, b"over quota", status=402)
    await client.patch(f"/api/v1/admin/users/{bob}", json={"tier": "pro"}, headers=admin.headers)
    await put_record(client, user, b"room again")
    resp = await client.patch(f"/api/v1/admin/users/{bob}", json={"tier": "gold"}, headers=admin.headers)
    assert resp.status == 422
    resp = await client.patch(f"/api/v1/admin/users/{bob}", json={}, headers=admin.headers)
    assert resp.status == 422
    assert (await client.patch(f"/api/v1/admin/users/{uuid.uuid4()}", json={"tier": "pro"}, headers=admin.headers)).status == 404


async def test_password_and_disable_end_sessions_as_the_cli_does(client, admin, user):
    bob = await user_id(client, admin, user.email)
    resp = await client.patch(f"/api/v1/admin/users/{bob}", json={"password": "a brand new one"}, headers=admin.headers)
    assert resp.status == 200
    assert (await client.get("/api/v1/auth/me", headers=user.headers)).status == 401
    refresh = await client.post("/api/v1/auth/refresh", json={"refresh_token": user.refresh_token})
    assert refresh.status == 401
    bob_again = await client.post("/api/v1/auth/login", json={"email": user.email, "password": "a brand new one"})
    assert bob_again.status == 200
    token = {"Authorization": f"Bearer {(await bob_again.json())['access_token']}"}

    resp = await client.patch(f"/api/v1/admin/users/{bob}", json={"disabled": True}, headers=admin.headers)
    assert resp.status == 200 and (await resp.json())["disabled"] is True
    assert (await client.get("/api/v1/auth/me", headers=token)).status == 401
    login = await client.post("/api/v1/auth/login", json={"email": user.email, "password": "a brand new one"})
    assert login.status == 403 and (await login.json())["code"] == "account_disabled"
    await client.patch(f"/api/v1/admin/users/{bob}", json={"disabled": False}, headers=admin.headers)
    login = await client.post("/api/v1/auth/login", json={"email": user.email, "password": "a brand new one"})
    assert login.status == 200


async def test_promoting_and_demoting_an_admin(client, admin, user):
    bob = await user_id(client, admin, user.email)
    resp = await client.patch(f"/api/v1/admin/users/{bob}", json={"admin": True}, headers=admin.headers)
    assert resp.status == 200 and (await resp.json())["admin"] is True
    assert (await client.get("/api/v1/admin/status", headers=user.headers)).status == 200  # the same token
    ada = await user_id(client, admin, admin.email)
    assert (await client.patch(f"/api/v1/admin/users/{ada}", json={"admin": False}, headers=user.headers)).status == 200
    assert (await client.get("/api/v1/admin/status", headers=admin.headers)).status == 403


async def test_the_last_admin_cannot_be_demoted_disabled_or_deleted(client, admin, user):
    ada, bob = await user_id(client, admin, admin.email), await user_id(client, admin, user.email)
    for method, body in (("PATCH", {"admin": False}), ("PATCH", {"disabled": True}), ("DELETE", None)):
        resp = await client.request(method, f"/api/v1/admin/users/{ada}", json=body, headers=admin.headers)
        assert resp.status == 409, await resp.text()
        assert (await resp.json())["code"] == "last_admin"
    # A disabled admin does not count: two admins, one disabled, still leaves one to protect.
    await client.patch(f"/api/v1/admin/users/{bob}", json={"admin": True, "disabled": True}, headers=admin.headers)
    resp = await client.patch(f"/api/v1/admin/users/{ada}", json={"admin": False}, headers=admin.headers)
    assert resp.status == 409
    await client.patch(f"/api/v1/admin/users/{bob}", json={"disabled": False}, headers=admin.headers)
    # Two active admins demoting each other at once: exactly one of them succeeds.
    bob_token = (await (await client.post("/api/v1/auth/login", json={"email": user.email, "password": user.password})).json())
    bob_headers = {"Authorization": f"Bearer {bob_token['access_token']}"}
    results = await asyncio.gather(
        client.patch(f"/api/v1/admin/users/{bob}", json={"admin": False}, headers=admin.headers),
        client.patch(f"/api/v1/admin/users/{ada}", json={"admin": False}, headers=bob_headers),
    )
    # The other is refused: 409 (last admin) when both passed the admin check before either
    # committed, 403 when the winner's commit came first (PostgreSQL's writers do not queue).
    won, lost = sorted(r.status for r in results)
    assert won == 200 and lost in (403, 409), [won, lost]
    (survivor,) = [h for h in (admin.headers, bob_headers)
                   if (await client.get("/api/v1/admin/status", headers=h)).status == 200]
    # An admin may delete themself, but only while another active admin remains.
    me = (await (await client.get("/api/v1/auth/me", headers=survivor)).json())["id"]
    other = bob if me == ada else ada
    assert (await client.delete(f"/api/v1/admin/users/{me}", headers=survivor)).status == 409
    await client.patch(f"/api/v1/admin/users/{other}", json={"admin": True}, headers=survivor)
    assert (await client.delete(f"/api/v1/admin/users/{me}", headers=survivor)).status == 200


async def test_unlock_lifts_a_login_back_off(client, admin, user):
    for _ in range(10):
        resp = await client.post("/api/v1/auth/login", json={"email": user.email, "password": "wrong guess!"})
        assert resp.status == 401
    resp = await client.post("/api/v1/auth/login", json={"email": user.email, "password": user.password})
    assert resp.status == 429
    bob = await user_id(client, admin, user.email)
    assert (await client.post(f"/api/v1/admin/users/{bob}/unlock", headers=admin.headers)).status == 204
    resp = await client.post("/api/v1/auth/login", json={"email": user.email, "password": user.password})
    assert resp.status == 200
    assert (await client.post(f"/api/v1/admin/users/{uuid.uuid4()}/unlock", headers=admin.headers)).status == 404


async def test_a_new_password_lifts_a_login_back_off(client, admin, user):
    for _ in range(10):
        await client.post("/api/v1/auth/login", json={"email": user.email, "password": "wrong guess!"})
    bob = await user_id(client, admin, user.email)
    await client.patch(f"/api/v1/admin/users/{bob}", json={"password": "the new one!"}, headers=admin.headers)
    resp = await client.post("/api/v1/auth/login", json={"email": user.email, "password": "the new one!"})
    assert resp.status == 200


async def test_delete_a_user(client, admin, user):
    bob = await user_id(client, admin, user.email)
    resp = await client.delete(f"/api/v1/admin/users/{bob}", headers=admin.headers)
    assert resp.status == 200 and (await resp.json())["id"] == bob
    assert (await client.get("/api/v1/auth/me", headers=user.headers)).status == 401
    assert (await client.get(f"/api/v1/admin/users/{bob}", headers=admin.headers)).status == 404
    assert (await client.delete(f"/api/v1/admin/users/{bob}", headers=admin.headers)).status == 404


# -- the server ---------------------------------------------------------------------------------


async def test_status(aiohttp_client, data_dir, backend):
    # Ollama configured on a port where nothing listens: the status says so, with the cause.
    client = await aiohttp_client(create_app(make_settings(data_dir, ollama_host=f"http://127.0.0.1:{free_port()}", **FAST)))
    admin = await register(client, "ada@example.org")
    resp = await client.get("/api/v1/admin/status", headers=admin.headers)
    status = await resp.json()
    from adiuva_server import __version__

    assert status["version"] == __version__ and status["uptime_seconds"] >= 0
    assert status["backends"] == {"database": backend, "blobs": "files", "rate_limits": "memory"}
    assert status["counts"] == {"users": 1, "records": 0, "vectors": 0}
    assert status["database_bytes"] > 0 and status["default_tier"] == "team"
    assert status["llm"]["provider"] == "ollama" and status["llm"]["model"] == "ollama/llama3.2"
    checked = status["llm"]["availability"]["ollama/llama3.2"]
    assert checked["available"] is False and checked["cause"] == "unreachable" and "127.0.0.1" in checked["reason"]
    lic = status["license"]
    assert lic["licensed"] is False and lic["state"] == "none" and lic["new_sales"] is False
    assert "no license file" in lic["reason"] and "homelab mode" in lic["reason"] and lic["licensee"] is None


@pytest.mark.sqlite_only("server backups archive the data dir's SQLite file (a PostgreSQL-mode export is not built yet)")
async def test_server_backups_through_the_api(client, admin):
    assert (await (await client.get("/api/v1/admin/backups", headers=admin.headers)).json()) == {"items": []}
    resp = await client.post("/api/v1/admin/backups", headers=admin.headers)
    assert resp.status == 201, await resp.text()
    made = await resp.json()
    assert made["counts"]["users"] == 1 and made["size_bytes"] > 0
    listed = (await (await client.get("/api/v1/admin/backups", headers=admin.headers)).json())["items"]
    assert [b["name"] for b in listed] == [made["name"]]
    manifest = server_backup.verify_backup(server_backup.backup_dir(client.app[SETTINGS]) / made["name"])
    assert manifest.counts["users"] == 1


# -- deletion leaves nothing behind -------------------------------------------------------------


EMAIL = "eve.h1dden-7c1f@example.org"


async def populate_victim(client, eve, bob):
    """Eve's records, a backup and vectors, each with bytes that can be looked for; one of her
    records has the same bytes as one of Bob's (that object must stay)."""
    marks = {"email": EMAIL.encode(), "vector id": b"eve-vector-id-9f3a0b"}
    record = b"EVE-RECORD-PAYLOAD-" + os.urandom(16).hex().encode() * 8
    marks["record payload"] = record[:64]
    meta = await put_record(client, eve, record)
    # A deleted record stays in her change feed as a tombstone: its table name must go too.
    resp = await client.post("/api/v1/storage/records?table=eve_private_table_5d2c", data=b"gone",
                             headers={**eve.headers, "X-Checksum": sha(b"gone")})
    assert resp.status == 201
    assert (await client.delete(f"/api/v1/storage/records/{(await resp.json())['id']}", headers=eve.headers)).status == 204
    marks["change-feed table"] = b"eve_private_table_5d2c"
    shared = b"shared between eve and bob " + os.urandom(8).hex().encode()
    await put_record(client, eve, shared)
    await put_record(client, bob, shared)
    backup = b"EVE-DESKTOP-BACKUP-" + os.urandom(32).hex().encode() * 20
    marks["backup payload"] = backup[:64]
    resp = await client.put("/api/v1/backup", data=backup, headers={
        **eve.headers, "X-Backup-Version": "1", "X-Backup-Timestamp": "2026-12-01T00:00:00Z", "X-Backup-Checksum": sha(backup)})
    assert resp.status == 201
    payload = b"EVE-VECTOR-PAYLOAD-" + os.urandom(16).hex().encode()
    marks["vector payload"] = payload
    values = [1234.5678, -8765.4321, 4242.4242]
    marks["embedding"] = struct.pack("3f", *values)
    resp = await client.post("/api/v1/storage/vectors/upsert", json={"metric": "l2", "vectors": [
        {"id": "eve-vector-id-9f3a0b", "values": values, "payload": base64.b64encode(payload).decode(), "checksum": sha(payload)},
    ]}, headers=eve.headers)
    assert resp.status == 200, await resp.text()
    return marks, {"record": sha(record), "backup": sha(backup), "shared": sha(shared)}, meta


def leaks(data: bytes, marks: dict[str, bytes]) -> list[str]:
    return [name for name, mark in marks.items() if mark in data]


@pytest.mark.parametrize("how", ["api", "cli"])
async def test_a_deleted_user_leaves_no_bytes_behind(client, admin, data_dir, how, backend):
    """After the delete: her objects are gone from disk at once (a shared one stays), and
    neither the live database and its WAL nor a server backup taken after holds her email, a
    vector id, a payload or an embedding. (Before: free pages kept them, secure_delete off; the
    WAL kept them; her objects waited up to 6 h for the sweep.)"""
    bob = await register(client, "bob@example.org")
    eve = await register(client, EMAIL)
    marks, digests, _ = await populate_victim(client, eve, bob)
    objects = data_dir / "blobs" / "objects"
    db_bytes = lambda: b"".join(p.read_bytes() for p in data_dir.glob("adiuva.db*") if p.is_file())  # noqa: E731
    assert leaks(db_bytes() + b"".join(p.read_bytes() for p in objects.rglob("*") if p.is_file()), marks)

    if how == "api":
        eve_id = await user_id(client, admin, EMAIL)
        resp = await client.delete(f"/api/v1/admin/users/{eve_id}", headers=admin.headers)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["objects_deleted"] == 2
    else:
        out = await asyncio.to_thread(run_cli, data_dir, "user", "delete", EMAIL, "--yes")
        assert out.returncode == 0, out.stderr
        assert "2 stored object(s) removed" in out.stdout

    for kind in ("record", "backup"):
        assert not (objects / digests[kind][:2] / digests[kind]).exists(), kind
    assert (objects / digests["shared"][:2] / digests["shared"]).exists()
    assert leaks(db_bytes(), marks) == []
    assert await sql(client, "SELECT count(*) FROM users WHERE email = ?", EMAIL) == [(0,)]
    assert await sql(client, "SELECT count(*) FROM vector_items WHERE item_id = ?", "eve-vector-id-9f3a0b") == [(0,)]
    if backend != "sqlite":
        # PostgreSQL's own files are its to scrub (and server backups archive the SQLite file).
        assert (await client.get("/api/v1/auth/me", headers=bob.headers)).status == 200
        return

    path, manifest = await server_backup.create_backup(client.app[SETTINGS])
    assert manifest.counts["users"] == 2
    archive = path.read_bytes()
    assert leaks(archive, marks) == []
    with tarfile.open(path) as tar:  # the shared object is still backed up
        assert f"blobs/{digests['shared'][:2]}/{digests['shared']}" in tar.getnames()
    assert (await client.get("/api/v1/auth/me", headers=bob.headers)).status == 200


async def test_deleting_a_user_drops_their_vectors_from_the_in_memory_mirror(aiohttp_client, data_dir):
    from adiuva_server.keys import VECTORS

    client = await aiohttp_client(create_app(make_settings(data_dir, vector_cache_min_vectors=2, **FAST)))
    ada = await register(client, "ada@example.org")
    eve = await register(client, EMAIL)
    payload = b"x"
    vectors = [{"id": f"v{i}", "values": [float(i), 1.0], "payload": base64.b64encode(payload).decode(),
                "checksum": sha(payload)} for i in range(3)]
    assert (await client.post("/api/v1/storage/vectors/upsert", json={"vectors": vectors}, headers=eve.headers)).status == 200
    store = client.app[VECTORS].store
    coll = await store.get_collection(await user_id(client, ada, EMAIL), "default")
    assert await store.warm(coll)
    assert [k for k in store.mirror.keys() if k[0] == coll.user_id]
    resp = await client.delete(f"/api/v1/admin/users/{coll.user_id}", headers=ada.headers)
    assert resp.status == 200
    assert [k for k in store.mirror.keys() if k[0] == coll.user_id] == []


async def test_deleting_objects_is_safe_against_a_concurrent_upload_of_the_same_bytes(client, admin):
    """Eve is deleted while Bob uploads exactly her record's bytes: whichever order the two
    take, Bob's record can be read back afterwards (his object was never deleted under him)."""
    bob = await register(client, "bob@example.org")
    for round_ in range(5):
        eve = await register(client, f"eve{round_}@example.org")
        data = f"same bytes {round_} ".encode() * 100
        await put_record(client, eve, data)
        eve_id = await user_id(client, admin, eve.email)
        deleted, uploaded = await asyncio.gather(
            client.delete(f"/api/v1/admin/users/{eve_id}", headers=admin.headers),
            put_record(client, bob, data),
        )
        assert deleted.status == 200
        resp = await client.get(f"/api/v1/storage/records/{uploaded['id']}", headers=bob.headers)
        assert resp.status == 200 and await resp.read() == data


# -- the doctor in the background ---------------------------------------------------------------


async def doctor_state(client, admin) -> dict:
    resp = await client.get("/api/v1/admin/status", headers=admin.headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["doctor"]


async def finished_doctor(client, admin, before: str | None = None) -> dict:
    deadline = asyncio.get_running_loop().time() + 60
    while asyncio.get_running_loop().time() < deadline:
        doctor = await doctor_state(client, admin)
        if doctor["last_run"] and doctor["last_run"]["finished_at"] != before and not doctor["running"]:
            return doctor["last_run"]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no doctor run in 60 s: {doctor}")


async def test_the_doctor_route_runs_the_checks_in_the_background(aiohttp_client, data_dir, backend):
    client = await aiohttp_client(create_app(make_settings(data_dir, doctor_interval=0, **FAST)))
    admin = await register(client, "ada@example.org")
    bob = await register(client, "bob@example.org")
    assert await doctor_state(client, admin) == {"running": False, "interval_seconds": 0, "next_run_at": None,
                                                 "last_run": None}
    assert (await client.post("/api/v1/admin/doctor", headers=bob.headers)).status == 403
    assert (await client.post("/api/v1/admin/doctor")).status == 401
    assert (await doctor_state(client, admin))["last_run"] is None  # neither started a run
    record = await put_record(client, bob, b"bob's encrypted bytes")
    resp = await client.post("/api/v1/admin/doctor", headers=admin.headers)
    assert resp.status == 202 and (await resp.json())["running"] is True
    run = await finished_doctor(client, admin)
    assert run["problems"] == 0 and run["error"] is None and run["ok"] == sum(f["level"] == "ok" for f in run["findings"])
    messages = [f"{f['area']}: {f['message']}" for f in run["findings"]]
    assert "storage: 1 referenced object(s) present and hash right" in messages, messages
    assert any(m.startswith("database: integrity ok" if backend == "sqlite" else "database: PostgreSQL reachable")
               for m in messages), messages
    # A stored object's bytes rot on disk: the next run finds it (it hashes every object), and
    # changes nothing (no --fix).
    digest = sha(b"bob's encrypted bytes")
    path = data_dir / "blobs" / "objects" / digest[:2] / digest
    path.write_bytes(b"rotten")
    resp = await client.post("/api/v1/admin/doctor", headers=admin.headers)
    assert resp.status == 202
    run = await finished_doctor(client, admin, before=run["finished_at"])
    assert run["problems"] == 1, run
    (bad,) = [f for f in run["findings"] if f["level"] == "FAIL"]
    assert bad["area"] == "storage" and "do not hash to their name" in bad["message"] and digest in bad["message"]
    assert path.read_bytes() == b"rotten"
    resp = await client.get(f"/api/v1/storage/records/{record['id']}", headers=bob.headers)
    assert resp.status != 500


async def test_the_doctor_runs_on_its_schedule_one_run_at_a_time(aiohttp_client, data_dir):
    from adiuva_server.keys import ADMIN

    # Below the one-minute floor the environment allows: a test's schedule.
    client = await aiohttp_client(create_app(make_settings(data_dir, doctor_interval=0.3, **FAST)))
    admin = await register(client, "ada@example.org")
    first = await finished_doctor(client, admin)  # the first scheduled run, with no one asking
    monitor = client.app[ADMIN].doctor
    real, running, most, runs = monitor.run_once, 0, 0, 0

    async def slow_run():
        nonlocal running, most, runs
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.5)
            return await real()
        finally:
            running -= 1
            runs += 1

    monitor.run_once = slow_run
    await client.post("/api/v1/admin/doctor", headers=admin.headers)
    await asyncio.sleep(0.1)
    for _ in range(5):  # during that run: one more after it, not five, and never two at once
        resp = await client.post("/api/v1/admin/doctor", headers=admin.headers)
        assert resp.status == 202 and (await resp.json())["running"] is True
    await asyncio.sleep(1.5)
    assert most == 1 and runs >= 2
    assert (await doctor_state(client, admin))["last_run"]["finished_at"] >= first["finished_at"]
