"""The plugin catalog as the desktop app uses it, over a real socket: browsing (filters, search,
sorting, pages), tier gates, installs (double, concurrent), ratings, signed package downloads
verified with the public key alone, revocation, and the bundled import across restarts."""

from __future__ import annotations

import datetime as dt

import asyncio
import json
import shutil

import pytest

from adiuva_server.app import create_app
from adiuva_server.keys import AUTH, DB, MARKETPLACE
from tests import licenses as L
from tests.conftest import REPO, make_settings, register, set_tier
from tests.plugin_kit import API, package, readme_verify, submit

BUNDLED = {"github-sync", "slack-notifier", "time-tracker"}
FAST = {"free": 100_000, "pro": 100_000, "power": 100_000, "team": 100_000}


@pytest.fixture
def settings(data_dir):
    return make_settings(data_dir, default_tier="team", rate_limits=FAST)


async def _json(resp, status=200):
    text = await resp.text()
    assert resp.status == status, text
    return json.loads(text) if text else None


async def browse(client, headers, **params):
    return await _json(await client.get(f"{API}/plugins", headers=headers, params=params))


async def add_plugins(client, tmp_path, n: int, **common) -> list[str]:
    """n approved plugins through the real submission and review path (in-process)."""
    service = client.app[MARKETPLACE]
    ids = []
    for i in range(n):
        pid = f"extra-{i:02d}"
        data = package(tmp_path, id=pid, name=f"Extra {i:02d}", description=f"extra plugin number {i}", **common)
        await service.submit(data, submitted_by="cli", owner_id=None, admin=True)
        await service.approve(pid, reviewer="test")
        ids.append(pid)
    return ids


async def test_the_bundled_plugins_are_in_the_catalog(client, account):
    page = await browse(client, account.headers)
    assert page["total"] == 3 and page["page"] == 1
    by_id = {p["id"]: p for p in page["items"]}
    assert set(by_id) == BUNDLED
    assert (by_id["github-sync"]["category"], by_id["github-sync"]["price_cents"]) == ("Productivity", 0)
    assert (by_id["slack-notifier"]["category"], by_id["slack-notifier"]["price_cents"],
            by_id["slack-notifier"]["currency"]) == ("Communication", 499, "EUR")
    assert (by_id["time-tracker"]["category"], by_id["time-tracker"]["price_cents"]) == ("Productivity", 999)
    detail = await _json(await client.get(f"{API}/plugins/github-sync", headers=account.headers))
    on_disk = json.loads((REPO / "plugins" / "github-sync" / "manifest.json").read_text())
    assert detail["manifest"] == on_disk
    assert detail["install_count"] == 0 and detail["average_rating"] is None and detail["installed"] is False
    assert len(detail["package"]["checksum"]) == 64 and detail["package"]["signature"]


async def test_filters_search_sorting_and_pages(client, account, tmp_path):
    await add_plugins(client, tmp_path, 22, category="Utilities")
    h = account.headers
    assert (await browse(client, h, category="productivity"))["total"] == 2
    assert {p["id"] for p in (await browse(client, h, category="Communication"))["items"]} == {"slack-notifier"}
    assert (await browse(client, h, category="Analytics"))["total"] == 0
    # Search: name, description, author; LIKE wildcards are literal.
    assert [p["id"] for p in (await browse(client, h, q="slack"))["items"]] == ["slack-notifier"]
    assert (await browse(client, h, q="number 1"))["total"] == 11  # 1, 10-19
    assert (await browse(client, h, q="%"))["total"] == 0
    # Pages of 20, no overlap, the total on each.
    first, second = await browse(client, h, page="1"), await browse(client, h, page="2")
    assert (len(first["items"]), len(second["items"]), first["total"], second["total"]) == (20, 5, 25, 25)
    assert not {p["id"] for p in first["items"]} & {p["id"] for p in second["items"]}
    assert (await browse(client, h, page="3"))["items"] == []
    # Sorting: installs, rating, newest.
    users = [await register(client, f"u{i}@example.org") for i in range(3)]
    for u, pid in zip(users, ["extra-05", "extra-05", "extra-07"]):
        await _json(await client.post(f"{API}/plugins/{pid}/install", headers=u.headers))
    await _json(await client.post(f"{API}/plugins/extra-03/install", headers=users[2].headers))
    by_installs = (await browse(client, h, sort="installs"))["items"]
    assert [p["id"] for p in by_installs[:2]] == ["extra-05", "extra-03"]  # 2, then 1 (ties by name)
    assert [p["install_count"] for p in by_installs[:3]] == [2, 1, 1]
    for u, pid, stars in ((users[0], "extra-05", 3), (users[1], "extra-05", 4), (users[2], "extra-07", 5),
                          (users[2], "extra-03", 2)):
        await _json(await client.put(f"{API}/plugins/{pid}/rating", headers=u.headers, json={"stars": stars}))
    by_rating = (await browse(client, h, sort="rating"))["items"]
    assert [(p["id"], p["average_rating"]) for p in by_rating[:3]] == [("extra-07", 5.0), ("extra-05", 3.5),
                                                                      ("extra-03", 2.0)]
    assert by_rating[3]["average_rating"] is None  # unrated ones after
    newest = (await browse(client, h, sort="newest"))["items"]
    assert newest[0]["id"] == "extra-21" and newest[1]["id"] == "extra-20"
    # Bad query parameters are clean 422s.
    for params in ({"sort": "price"}, {"page": "0"}, {"q": "x" * 101}, {"bogus": "1"}):
        resp = await client.get(f"{API}/plugins", headers=h, params=params)
        assert resp.status == 422 and (await resp.json())["code"] == "validation_error"


async def test_tier_gates_come_from_the_database(client, account):
    h = account.headers
    await _json(await client.post(f"{API}/plugins/github-sync/install", headers=h))
    for tier in ("free", "pro"):
        await set_tier(client, account.email, tier)
        for method, path, body in (("GET", "/plugins", None), ("GET", "/plugins/github-sync", None),
                                   ("POST", "/plugins/time-tracker/install", None),
                                   ("GET", "/plugins/github-sync/package", None),
                                   ("PUT", "/plugins/github-sync/rating", {"stars": 5})):
            resp = await client.request(method, API + path, headers=h, json=body)
            problem = await _json(resp, 403)
            assert problem["code"] == "feature_not_in_tier", (tier, path)
        # The installed list stays readable, and uninstalling is always allowed.
        assert [i["plugin_id"] for i in (await _json(await client.get(f"{API}/plugins/installed", headers=h)))["items"]]
    await _json(await client.delete(f"{API}/plugins/github-sync/install", headers=h), 204)
    assert (await _json(await client.get(f"{API}/plugins/installed", headers=h)))["items"] == []
    await set_tier(client, account.email, "power")
    assert (await browse(client, h))["total"] == 3


async def test_install_and_uninstall_counts_and_double_installs(client, account):
    h = account.headers
    first = await _json(await client.post(f"{API}/plugins/github-sync/install", headers=h))
    again = await _json(await client.post(f"{API}/plugins/github-sync/install", headers=h))
    assert first == again and first["status"] == "installed" and first["payment_state"] == "free"
    detail = await _json(await client.get(f"{API}/plugins/github-sync", headers=h))
    assert (detail["install_count"], detail["installed"]) == (1, True)
    installed = await _json(await client.get(f"{API}/plugins/installed", headers=h))
    assert [(i["plugin_id"], i["status"], i["price_cents"]) for i in installed["items"]] == [("github-sync", "installed", 0)]
    await _json(await client.delete(f"{API}/plugins/github-sync/install", headers=h), 204)
    await _json(await client.delete(f"{API}/plugins/github-sync/install", headers=h), 204)  # twice: still fine
    assert (await _json(await client.get(f"{API}/plugins/github-sync", headers=h)))["install_count"] == 0
    await _json(await client.post(f"{API}/plugins/github-sync/install", headers=h))
    assert (await _json(await client.get(f"{API}/plugins/github-sync", headers=h)))["install_count"] == 1
    for path in ("/plugins/nope/install", "/plugins/nope"):
        assert (await _json(await client.post(API + path, headers=h) if path.endswith("install")
                            else await client.get(API + path, headers=h), 404))["code"] == "not_found"
    assert (await _json(await client.delete(f"{API}/plugins/nope/install", headers=h), 404))["code"] == "not_found"


async def test_concurrent_installs_count_exactly(client):
    users = [await register(client, f"c{i}@example.org") for i in range(8)]
    # Every user installs five times at once, interleaved with everyone else.
    calls = [client.post(f"{API}/plugins/github-sync/install", headers=u.headers) for _ in range(5) for u in users]
    responses = await asyncio.gather(*calls)
    assert {r.status for r in responses} == {200}
    detail = await _json(await client.get(f"{API}/plugins/github-sync", headers=users[0].headers))
    assert detail["install_count"] == len(users)
    # Installs and uninstalls racing: the count is the number of rows left installed.
    calls = [client.delete(f"{API}/plugins/github-sync/install", headers=u.headers) for u in users[:4]]
    calls += [client.post(f"{API}/plugins/github-sync/install", headers=u.headers) for u in users]
    await asyncio.gather(*calls)
    rows = await client.app[DB].fetchone("SELECT count(*) FROM plugin_installs WHERE plugin_id = 'github-sync' "
                                         "AND state = 'installed'")
    detail = await _json(await client.get(f"{API}/plugins/github-sync", headers=users[0].headers))
    assert detail["install_count"] == rows[0]


async def test_ratings_one_per_user_and_changeable(client, account):
    h = account.headers
    not_installed = await _json(await client.put(f"{API}/plugins/github-sync/rating", headers=h, json={"stars": 5}), 409)
    assert not_installed["code"] == "plugin_not_installed"
    await _json(await client.post(f"{API}/plugins/github-sync/install", headers=h))
    rated = await _json(await client.put(f"{API}/plugins/github-sync/rating", headers=h, json={"stars": 5}))
    assert (rated["average_rating"], rated["rating_count"]) == (5.0, 1)
    changed = await _json(await client.put(f"{API}/plugins/github-sync/rating", headers=h, json={"stars": 2}))
    assert (changed["average_rating"], changed["rating_count"]) == (2.0, 1)
    other = await register(client, "bo@example.org")
    await _json(await client.post(f"{API}/plugins/github-sync/install", headers=other.headers))
    await _json(await client.delete(f"{API}/plugins/github-sync/install", headers=other.headers), 204)
    # Uninstalled since: a rating is still theirs to give.
    both = await _json(await client.put(f"{API}/plugins/github-sync/rating", headers=other.headers, json={"stars": 4}))
    assert (both["average_rating"], both["rating_count"]) == (3.0, 2)
    detail = await _json(await client.get(f"{API}/plugins/github-sync", headers=h))
    assert (detail["average_rating"], detail["rating_count"], detail["my_rating"]) == (3.0, 2, 2)
    for bad in ({"stars": 0}, {"stars": 6}, {"stars": "5"}, {"stars": 4.5}, {}):
        assert (await client.put(f"{API}/plugins/github-sync/rating", headers=h, json=bad)).status == 422
    assert (await _json(await client.get(f"{API}/plugins/github-sync", headers=h)))["average_rating"] == 3.0


async def test_a_deleted_user_leaves_counts_exact(client, account):
    other = await register(client, "gone@example.org")
    for u, stars in ((account, 5), (other, 1)):
        await _json(await client.post(f"{API}/plugins/github-sync/install", headers=u.headers))
        await _json(await client.put(f"{API}/plugins/github-sync/rating", headers=u.headers, json={"stars": stars}))
    await client.app[AUTH].store.delete_user("gone@example.org")
    detail = await _json(await client.get(f"{API}/plugins/github-sync", headers=account.headers))
    assert (detail["install_count"], detail["rating_count"], detail["average_rating"]) == (1, 1, 5.0)


async def test_downloaded_packages_verify_with_the_public_key_alone(client, account):
    h = account.headers
    key = await _json(await client.get(f"{API}/plugins/signing-key"))  # no token needed
    assert key["algorithm"] == "Ed25519" and key["scheme"] == "adiuva-plugin-v1"
    for pid in BUNDLED:
        resp = await client.get(f"{API}/plugins/{pid}/package", headers=h)
        assert resp.status == 200 and resp.content_type == "application/gzip"
        data = await resp.read()
        version = resp.headers["X-Plugin-Version"]
        assert resp.headers["X-Plugin-Id"] == pid and resp.headers["X-Signature-Key-Id"] == key["key_id"]
        import hashlib

        assert resp.headers["X-Checksum"] == hashlib.sha256(data).hexdigest()
        assert readme_verify(key["public_key"], pid, version, data, resp.headers["X-Signature"])
        # A byte changed anywhere, another plugin's or version's name: refused.
        tampered = bytearray(data)
        tampered[len(tampered) // 2] ^= 0x01
        assert not readme_verify(key["public_key"], pid, version, bytes(tampered), resp.headers["X-Signature"])
        assert not readme_verify(key["public_key"], pid, "9.9.9", data, resp.headers["X-Signature"])
        assert not readme_verify(key["public_key"], "other-plugin", version, data, resp.headers["X-Signature"])


async def test_paid_plugins_need_licensed_mode(client, account):
    h = account.headers
    for pid in ("slack-notifier", "time-tracker"):
        problem = await _json(await client.post(f"{API}/plugins/{pid}/install", headers=h), 403)
        assert problem["code"] == "licensed_mode_required" and "EUR" in problem["detail"]
    assert (await _json(await client.get(f"{API}/plugins/installed", headers=h)))["items"] == []
    assert (await _json(await client.get(f"{API}/plugins/slack-notifier", headers=h)))["install_count"] == 0
    # The developer submission route too.
    problem = await _json(await submit(client, h, b"anything", "/plugins/submissions"), 403)
    assert problem["code"] == "licensed_mode_required"
    assert (await _json(await client.get(f"{API}/plugins/submissions", headers=h), 403))["code"] == "licensed_mode_required"


async def test_paid_installs_in_licensed_mode_without_stripe_are_503(aiohttp_client, data_dir):
    L.write(data_dir / "license.json", L.signed(L.body(dt.datetime.now(dt.UTC))))
    client = await aiohttp_client(create_app(make_settings(data_dir, licensed=True, default_tier="team",
                                                           license_public_key=L.public_b64(), rate_limits=FAST)))
    acct = await register(client)
    problem = await _json(await client.post(f"{API}/plugins/slack-notifier/install", headers=acct.headers), 503)
    assert problem["code"] == "billing_not_configured"
    assert (await _json(await client.get(f"{API}/plugins/installed", headers=acct.headers)))["items"] == []
    await _json(await client.post(f"{API}/plugins/github-sync/install", headers=acct.headers))  # free: as usual


async def test_revoking_hides_it_and_marks_installations(client, account):
    h = account.headers
    user = await register(client, "user@example.org")
    await _json(await client.post(f"{API}/plugins/github-sync/install", headers=user.headers))
    record = await _json(await client.post(f"{API}/admin/plugins/github-sync/revoke", headers=h,
                                           json={"notes": "leaks tokens"}))
    assert record["status"] == "revoked" and record["reviews"][-1]["decision"] == "revoked"
    assert record["reviews"][-1]["reviewer"] == account.email and record["reviews"][-1]["notes"] == "leaks tokens"
    assert "github-sync" not in {p["id"] for p in (await browse(client, user.headers))["items"]}
    for method, path in (("GET", "/plugins/github-sync"), ("GET", "/plugins/github-sync/package"),
                         ("POST", "/plugins/github-sync/install")):
        assert (await client.request(method, API + path, headers=user.headers)).status == 404
    installed = await _json(await client.get(f"{API}/plugins/installed", headers=user.headers))
    assert [(i["plugin_id"], i["status"]) for i in installed["items"]] == [("github-sync", "revoked")]
    await _json(await client.delete(f"{API}/plugins/github-sync/install", headers=user.headers), 204)
    assert (await _json(await client.get(f"{API}/plugins/installed", headers=user.headers)))["items"] == []
    again = await _json(await client.post(f"{API}/admin/plugins/github-sync/revoke", headers=h, json={}), 409)
    assert again["code"] == "conflict"


async def test_the_bundled_import_is_idempotent_across_restarts_and_upgrades(aiohttp_client, tmp_path):
    bundled = tmp_path / "bundled"
    shutil.copytree(REPO / "plugins", bundled)
    settings = make_settings(tmp_path / "data", plugins_dir=str(bundled), default_tier="team", rate_limits=FAST)

    async def start():
        return await aiohttp_client(create_app(settings))

    client = await start()
    users = [await register(client, f"r{i}@example.org") for i in range(2)]
    for u, stars in zip(users, (5, 4)):
        await _json(await client.post(f"{API}/plugins/github-sync/install", headers=u.headers))
        await _json(await client.put(f"{API}/plugins/github-sync/rating", headers=u.headers, json={"stars": stars}))
    before = await _json(await client.get(f"{API}/plugins/github-sync", headers=users[0].headers))
    await client.close()

    for _ in range(2):  # two plain restarts
        client = await start()
        h = (await _json(await client.post(f"{API}/auth/login", json={"email": users[0].email,
                                                                         "password": users[0].password})))
        headers = {"Authorization": f"Bearer {h['access_token']}"}
        assert (await browse(client, headers))["total"] == 3
        after = await _json(await client.get(f"{API}/plugins/github-sync", headers=headers))
        assert after == before
        versions = await client.app[DB].fetchone("SELECT count(*) FROM plugin_versions")
        assert versions[0] == 3
        await client.close()

    # An upgrade ships github-sync 1.1.0: the new version, the same counts and ratings.
    manifest_path = bundled / "github-sync" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "version": "1.1.0", "description": "Now with labels."}))
    client = await start()
    tokens = await _json(await client.post(f"{API}/auth/login", json={"email": users[0].email,
                                                                        "password": users[0].password}))
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    upgraded = await _json(await client.get(f"{API}/plugins/github-sync", headers=headers))
    assert (upgraded["version"], upgraded["description"]) == ("1.1.0", "Now with labels.")
    assert (upgraded["install_count"], upgraded["rating_count"], upgraded["average_rating"]) == (2, 2, 4.5)
    assert upgraded["package"]["checksum"] != before["package"]["checksum"]
    assert (await browse(client, headers))["total"] == 3
    await client.close()


async def test_an_expired_license_sells_no_paid_plugin(aiohttp_client, data_dir):
    # Expired 30 days ago, past its 14 days of grace: still licensed mode, but no new sales.
    L.write(data_dir / "license.json", L.signed(L.body(dt.datetime.now(dt.UTC) - dt.timedelta(days=60), days=30)))
    client = await aiohttp_client(create_app(make_settings(data_dir, default_tier="team",
                                                           license_public_key=L.public_b64(), rate_limits=FAST)))
    acct = await register(client)
    problem = await _json(await client.post(f"{API}/plugins/slack-notifier/install", headers=acct.headers), 403)
    assert problem["code"] == "license_expired"
    assert (await _json(await client.get(f"{API}/plugins/installed", headers=acct.headers)))["items"] == []
