"""Review: every automated check (one test each, over the admin API on a real socket, named
in the answer), approval/rejection/revocation by the admin API and the real CLI (a subprocess on
the same data dir as the running server), re-review of a new version, developer submissions in
licensed mode."""

from __future__ import annotations

import datetime as dt

import asyncio
import base64
import json
import os
import tarfile

import pytest

from adiuva_server.app import create_app
from adiuva_server.keys import DB
from tests import licenses as L
from tests.conftest import make_settings, register, run_cli
from tests.plugin_kit import API, package, plugin_folder, raw_tar, readme_verify, submit, tar_file

FAST = {"free": 100_000, "pro": 100_000, "power": 100_000, "team": 100_000}
LIMITS = {"plugin_max_package_bytes": 256 * 1024, "plugin_max_unpacked_bytes": 512 * 1024, "plugin_max_files": 20}


@pytest.fixture
def settings(data_dir):
    return make_settings(data_dir, default_tier="team", rate_limits=FAST, **LIMITS)


async def failed_checks(client, headers, data: bytes) -> list[str]:
    resp = await submit(client, headers, data)
    body = await resp.json()
    assert resp.status == 422 and body["code"] == "plugin_checks_failed", body
    for f in body["failed"]:
        assert f["check"] in body["detail"] and f["detail"]
    return sorted({f["check"] for f in body["failed"]})


async def nothing_pending(client, headers) -> bool:
    return (await (await client.get(f"{API}/admin/plugins/pending", headers=headers)).json())["items"] == []


# -- each rule, one test ----------------------------------------------------------------------


async def test_a_valid_package_passes_and_waits_for_review(client, account, tmp_path):
    resp = await submit(client, account.headers, package(tmp_path))
    body = await resp.json()
    assert resp.status == 201, body
    assert (body["plugin_id"], body["version"], body["status"]) == ("focus-timer", "1.0.0", "pending_review")
    pending = (await (await client.get(f"{API}/admin/plugins/pending", headers=account.headers)).json())["items"]
    assert [p["plugin_id"] for p in pending] == ["focus-timer"]
    browse = await (await client.get(f"{API}/plugins", headers=account.headers)).json()
    assert "focus-timer" not in {p["id"] for p in browse["items"]}  # users see approved plugins only
    assert (await client.get(f"{API}/plugins/focus-timer", headers=account.headers)).status == 404


async def test_id_format(client, account, tmp_path):
    for bad in ("Focus_Timer", "focus timer", "x", "ünï", "a" * 65):
        assert "id_format" in await failed_checks(client, account.headers, package(tmp_path, id=bad))
    assert await nothing_pending(client, account.headers)


async def test_id_reserved(client, account, tmp_path):
    assert await failed_checks(client, account.headers, package(tmp_path, id="adiuva-sync")) == ["id_reserved"]


async def test_name_unique(client, account, tmp_path):
    assert await failed_checks(client, account.headers, package(tmp_path, name="GitHub Sync")) == ["name_unique"]
    assert await failed_checks(client, account.headers, package(tmp_path, name="github sync")) == ["name_unique"]


async def test_version_semver(client, account, tmp_path):
    for bad in ("1.0", "v1.0.0", "1.0.0.0", "01.0.0", "latest"):
        assert "version_semver" in await failed_checks(client, account.headers, package(tmp_path, version=bad))


async def test_version_newer(client, account, tmp_path):
    for old in ("1.0.0", "0.9.9", "1.0.0-rc.1"):
        checks = await failed_checks(client, account.headers,
                                     package(tmp_path, id="github-sync", name="GitHub Sync", version=old))
        assert checks == ["version_newer"], old
    resp = await submit(client, account.headers, package(tmp_path, id="github-sync", name="GitHub Sync", version="1.0.1"))
    assert resp.status == 201, await resp.text()


async def test_permissions_allowed(client, account, tmp_path):
    for bad in (["contacts:read"], ["tasks:delete"], ["tasks:read", "network"], ["*"]):
        assert await failed_checks(client, account.headers, package(tmp_path, permissions=bad)) == ["permissions_allowed"]
    ok = package(tmp_path, permissions=[f"{a}:{m}" for a in ("tasks", "projects", "notes", "timelines", "calendar")
                                        for m in ("read", "write")])
    assert (await submit(client, account.headers, ok)).status == 201


async def test_manifest_fields(client, account, tmp_path):
    cases = [{"author": None}, {"price_cents": -1}, {"price_cents": "499"}, {"price_cents": True},
             {"currency": "euro"}, {"category": "Games"}, {"description": ""}, {"name": " padded "},
             {"homepage": 5}, {"main": "missing.js"}, {"main": "../index.js"}, {"permissions": "tasks:read"}]
    for overrides in cases:
        assert await failed_checks(client, account.headers, package(tmp_path, **overrides)) == ["manifest_fields"], overrides
    unknown = plugin_folder(tmp_path)
    m = json.loads((unknown / "manifest.json").read_text())
    (unknown / "manifest.json").write_text(json.dumps({**m, "postinstall": "curl | sh"}))
    from adiuva_server.marketplace.checks import build_package

    assert await failed_checks(client, account.headers, build_package(unknown)) == ["manifest_fields"]


async def test_manifest_binary(client, account, tmp_path):
    blob = base64.b64encode(os.urandom(300)).decode()
    for overrides in ({"description": f"icon: {blob}"}, {"description": "data:image/png;base64,iVBORw0KGgo="},
                      {"author": "Grace\x00Hopper"}):
        assert "manifest_binary" in await failed_checks(client, account.headers, package(tmp_path, **overrides))
    big = plugin_folder(tmp_path)
    m = json.loads((big / "manifest.json").read_text())
    (big / "manifest.json").write_text(json.dumps(m) + " " * 17 * 1024)
    from adiuva_server.marketplace.checks import build_package

    assert await failed_checks(client, account.headers, build_package(big)) == ["manifest_binary"]


async def test_package_archive(client, account, tmp_path):
    import gzip
    import io
    import zipfile

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("manifest.json", "{}")
    good = package(tmp_path)
    for bad in (b"not a package", zipped.getvalue(), gzip.compress(b"plain text, no tar"), good[:-20], good + b"junk",
                raw_tar([tar_file("index.js", b"export default {};")]),  # no manifest
                raw_tar([tar_file("manifest.json", b"{not json")])):
        assert await failed_checks(client, account.headers, bad) == ["package_archive"]


async def test_package_size(client, account, tmp_path):
    # What it unpacks to: 1 MB of one letter compresses to a few KB.
    bomb = package(tmp_path, files={"index.js": "export default {};", "big.txt": "a" * (LIMITS["plugin_max_unpacked_bytes"] + 1)})
    assert len(bomb) < 16 * 1024
    assert await failed_checks(client, account.headers, bomb) == ["package_size"]
    # The archive itself: over the limit is refused while it is read (413), nothing recorded.
    noise = base64.b64encode(os.urandom(LIMITS["plugin_max_package_bytes"])).decode()
    resp = await submit(client, account.headers, package(tmp_path, files={"index.js": "1;", "noise.txt": noise}))
    assert resp.status == 413 and (await resp.json())["code"] == "payload_too_large"
    assert await nothing_pending(client, account.headers)


async def test_package_file_count(client, account, tmp_path):
    files = {f"lib/part{i}.js": f"export const n = {i};" for i in range(LIMITS["plugin_max_files"] + 1)}
    files["index.js"] = "export default {};"
    assert await failed_checks(client, account.headers, package(tmp_path, files=files)) == ["package_file_count"]


async def test_package_links(client, account, tmp_path):
    folder = plugin_folder(tmp_path)
    os.symlink("/etc/passwd", folder / "passwd.txt")
    from adiuva_server.marketplace.checks import build_package

    assert await failed_checks(client, account.headers, build_package(folder)) == ["package_links"]
    manifest = json.dumps({k: v for k, v in json.loads((folder / "manifest.json").read_text()).items()}).encode()
    hard = tarfile.TarInfo("copy.js")
    hard.type, hard.linkname = tarfile.LNKTYPE, "index.js"
    data = raw_tar([tar_file("manifest.json", manifest), tar_file("index.js", b"1;"), (hard, None)])
    assert await failed_checks(client, account.headers, data) == ["package_links"]


async def test_package_paths(client, account, tmp_path):
    manifest = json.dumps({"id": "focus-timer", "name": "Focus Timer", "description": "d", "version": "1.0.0",
                           "author": "Grace", "category": "Productivity", "price_cents": 0, "currency": "EUR",
                           "permissions": []}).encode()
    for evil in ("../evil.js", "/etc/cron.d/evil.js", "lib/../../evil.js", "lib\\..\\evil.js", "index.js"):
        data = raw_tar([tar_file("manifest.json", manifest), tar_file("index.js", b"1;"), tar_file(evil, b"2;")])
        assert await failed_checks(client, account.headers, data) == ["package_paths"], evil


async def test_package_file_types(client, account, tmp_path):
    for files in ({"index.js": "1;", "helper.exe": b"MZ\x90\x00"}, {"index.js": "1;", "native.so": b"\x7fELF"},
                  {"index.js": b"\x7fELF\x02\x01\x01\x00"}, {"index.js": "1;", "icon.png": b"GIF89a"},
                  {"index.js": "1;", "notes.txt": b"\xff\xfe latin-1 \xe9"}):
        assert await failed_checks(client, account.headers, package(tmp_path, files=files)) == ["package_file_types"]
    fifo = tarfile.TarInfo("pipe.js")
    fifo.type = tarfile.FIFOTYPE
    manifest = (plugin_folder(tmp_path) / "manifest.json").read_bytes()
    data = raw_tar([tar_file("manifest.json", manifest), tar_file("index.js", b"1;"), (fifo, None)])
    assert await failed_checks(client, account.headers, data) == ["package_file_types"]
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
    assert (await submit(client, account.headers, package(tmp_path, files={"index.js": "1;", "icon.png": png}))).status == 201


async def test_review_pending_and_every_failure_named_at_once(client, account, tmp_path):
    assert (await submit(client, account.headers, package(tmp_path))).status == 201
    assert await failed_checks(client, account.headers, package(tmp_path, version="1.1.0")) == ["review_pending"]
    several = package(tmp_path, id="adiuva-x", version="1", permissions=["root"], files={"index.js": "1;", "a.exe": "x"})
    assert await failed_checks(client, account.headers, several) == ["id_reserved", "package_file_types",
                                                                    "permissions_allowed", "version_semver"]


async def test_plugin_revoked_takes_no_new_versions(client, account, tmp_path):
    await client.post(f"{API}/admin/plugins/github-sync/revoke", headers=account.headers, json={})
    assert await failed_checks(client, account.headers,
                               package(tmp_path, id="github-sync", name="GitHub Sync", version="2.0.0")) == ["plugin_revoked"]


async def test_the_bundled_plugins_pass_every_check(tmp_path):
    from adiuva_server.marketplace.checks import Limits, build_package, check_package
    from tests.conftest import REPO

    for folder in (REPO / "plugins").iterdir():
        _, failures = check_package(build_package(folder), Limits(5 * 1024**2, 20 * 1024**2, 200))
        assert failures == [], folder.name


# -- licensed mode: developers and id ownership -----------------------------------------------


@pytest.fixture
async def licensed(aiohttp_client, tmp_path):
    L.write(tmp_path / "licensed" / "license.json", L.signed(L.body(dt.datetime.now(dt.UTC))))
    return await aiohttp_client(create_app(make_settings(tmp_path / "licensed", licensed=True, default_tier="team",
                                                         license_public_key=L.public_b64(), rate_limits=FAST, **LIMITS)))


async def test_developers_submit_in_licensed_mode_and_ids_are_theirs(licensed, tmp_path):
    admin = await register(licensed, "admin@example.org")
    grace, mallory = await register(licensed, "grace@example.org"), await register(licensed, "mallory@example.org")
    resp = await submit(licensed, grace.headers, package(tmp_path), "/plugins/submissions")
    assert resp.status == 201, await resp.text()
    mine = await (await licensed.get(f"{API}/plugins/submissions", headers=grace.headers)).json()
    assert [(s["plugin_id"], s["status"]) for s in mine["items"]] == [("focus-timer", "pending_review")]
    assert (await (await licensed.get(f"{API}/plugins/submissions", headers=mallory.headers)).json())["items"] == []
    await licensed.post(f"{API}/admin/plugins/focus-timer/approve", headers=admin.headers, json={})
    # Another developer cannot publish versions of Grace's plugin, nor of a bundled one.
    for data in (package(tmp_path, version="2.0.0"), package(tmp_path, id="github-sync", name="Sync", version="9.0.0")):
        resp = await submit(licensed, mallory.headers, data, "/plugins/submissions")
        body = await resp.json()
        assert resp.status == 422 and [f["check"] for f in body["failed"]] == ["id_unique"], body
    resp = await submit(licensed, grace.headers, package(tmp_path, version="1.1.0"), "/plugins/submissions")
    assert resp.status == 201, await resp.text()
    # Non-admins cannot review.
    resp = await licensed.post(f"{API}/admin/plugins/focus-timer/approve", headers=grace.headers, json={})
    assert resp.status == 403 and (await resp.json())["code"] == "admin_required"


async def test_two_developers_racing_for_one_id(licensed, tmp_path):
    await register(licensed, "admin@example.org")
    devs = [await register(licensed, f"dev{i}@example.org") for i in range(6)]
    data = package(tmp_path, id="race-plugin", name="Race Plugin")
    responses = await asyncio.gather(*(submit(licensed, d.headers, data, "/plugins/submissions") for d in devs))
    assert sorted(r.status for r in responses) == [201] + [422] * 5
    rows = await licensed.app[DB].fetchall("SELECT owner_id FROM plugins WHERE id = 'race-plugin'")
    assert len(rows) == 1


# -- decisions: the admin API and the CLI ------------------------------------------------------


async def test_approve_reject_and_re_review_of_a_new_version(client, account, tmp_path):
    h = account.headers
    user = await register(client, "user@example.org")
    await client.post(f"{API}/plugins/github-sync/install", headers=user.headers)
    old = await client.get(f"{API}/plugins/github-sync/package", headers=user.headers)
    old_bytes = await old.read()

    assert (await submit(client, h, package(tmp_path, id="github-sync", name="GitHub Sync", version="1.1.0",
                                             description="With labels."))).status == 201
    # While 1.1.0 waits, 1.0.0 stays listed and installable.
    detail = await (await client.get(f"{API}/plugins/github-sync", headers=user.headers)).json()
    assert detail["version"] == "1.0.0"
    assert await (await client.get(f"{API}/plugins/github-sync/package", headers=user.headers)).read() == old_bytes
    assert (await client.post(f"{API}/plugins/github-sync/install", headers=h)).status == 200

    approved = await client.post(f"{API}/admin/plugins/github-sync/approve", headers=h, json={"notes": "diff read"})
    body = await approved.json()
    assert approved.status == 200 and body["status"] == "approved" and body["reviewer"] == account.email
    assert body["notes"] == "diff read" and body["reviewed_at"]
    detail = await (await client.get(f"{API}/plugins/github-sync", headers=user.headers)).json()
    assert (detail["version"], detail["description"], detail["install_count"]) == ("1.1.0", "With labels.", 2)
    new = await client.get(f"{API}/plugins/github-sync/package", headers=user.headers)
    key = await (await client.get(f"{API}/plugins/signing-key")).json()
    assert readme_verify(key["public_key"], "github-sync", "1.1.0", await new.read(), new.headers["X-Signature"])

    assert (await submit(client, h, package(tmp_path, id="github-sync", name="GitHub Sync", version="1.2.0"))).status == 201
    bad = await client.post(f"{API}/admin/plugins/github-sync/reject", headers=h, json={"reason": " "})
    assert bad.status == 422
    rejected = await (await client.post(f"{API}/admin/plugins/github-sync/reject", headers=h,
                                        json={"reason": "asks for the network"})).json()
    assert (rejected["status"], rejected["notes"], rejected["reviewer"]) == ("rejected", "asks for the network", account.email)
    assert (await (await client.get(f"{API}/plugins/github-sync", headers=user.headers)).json())["version"] == "1.1.0"
    # The same version number may come back after a rejection.
    assert (await submit(client, h, package(tmp_path, id="github-sync", name="GitHub Sync", version="1.2.0"))).status == 201

    record = await (await client.get(f"{API}/admin/plugins/github-sync", headers=h)).json()
    assert [(r["version"], r["decision"], r["reviewer"]) for r in record["reviews"]] == [
        ("1.0.0", "approved", "bundled"), ("1.1.0", "approved", account.email), ("1.2.0", "rejected", account.email)]
    assert all(r["decided_at"] for r in record["reviews"])
    assert [(v["version"], v["status"]) for v in record["versions"]] == [
        ("1.0.0", "approved"), ("1.1.0", "approved"), ("1.2.0", "rejected"), ("1.2.0", "pending_review")]
    for path, body in (("approve", {}), ("reject", {"reason": "x"})):
        resp = await client.post(f"{API}/admin/plugins/time-tracker/{path}", headers=h, json=body)
        assert resp.status == 404, path


async def test_the_cli_submits_lists_and_decides_while_the_server_runs(client, account, tmp_path, data_dir):
    folder = plugin_folder(tmp_path / "src")

    def cli(*args):
        return asyncio.to_thread(run_cli, data_dir, "plugin", *args)

    done = await cli("submit", str(folder))
    assert done.returncode == 0 and "waits for review" in done.stdout, done.stderr
    listed = await cli("pending", "--json")
    assert [json.loads(line)["plugin_id"] for line in listed.stdout.splitlines()] == ["focus-timer"]
    # The server's cached catalog page (before the approval) must not outlive another process's commit.
    before = await (await client.get(f"{API}/plugins", headers=account.headers, params={"q": "pomodoro"})).json()
    assert before["items"] == []
    approved = await cli("approve", "focus-timer", "--notes", "looks fine")
    assert approved.returncode == 0 and "approved and signed" in approved.stdout, approved.stderr
    browse = await (await client.get(f"{API}/plugins", headers=account.headers, params={"q": "pomodoro"})).json()
    assert [p["id"] for p in browse["items"]] == ["focus-timer"]
    record = await (await client.get(f"{API}/admin/plugins/focus-timer", headers=account.headers)).json()
    assert record["reviews"][-1]["reviewer"].startswith("cli") and record["reviews"][-1]["notes"] == "looks fine"

    failing = plugin_folder(tmp_path / "src", id="adiuva-fake", permissions=["contacts:read"])
    refused = await cli("submit", str(failing))
    assert refused.returncode == 1
    assert "id_reserved:" in refused.stderr and "permissions_allowed:" in refused.stderr

    assert (await cli("submit", str(plugin_folder(tmp_path / "src", version="1.1.0")))).returncode == 0
    no_reason = await cli("reject", "focus-timer")
    assert no_reason.returncode == 2  # --reason is required
    rejected = await cli("reject", "focus-timer", "--reason", "crashes")
    assert rejected.returncode == 0, rejected.stderr
    assert (await cli("pending")).stdout.strip() == "nothing waits for review"
    await client.post(f"{API}/plugins/focus-timer/install", headers=account.headers)
    revoked = await cli("revoke", "focus-timer", "--notes", "malware")
    assert revoked.returncode == 0 and "1 installation(s)" in revoked.stdout, revoked.stderr
    installed = await (await client.get(f"{API}/plugins/installed", headers=account.headers)).json()
    assert [(i["plugin_id"], i["status"]) for i in installed["items"]] == [("focus-timer", "revoked")]
    browse = await (await client.get(f"{API}/plugins", headers=account.headers, params={"q": "pomodoro"})).json()
    assert browse["items"] == []
    unknown = await cli("approve", "nope")
    assert unknown.returncode == 1 and "no version of nope" in unknown.stderr
