"""Licensed mode: the signed license file, `adiuva license install|show` (the real CLI in a
subprocess), its states on a real server (the clock moved, never slept on), max_users under
concurrent registrations, and what admins see (status API, doctor, console)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import logging
import stat

import pytest

from adiuva_server import errors
from adiuva_server.app import create_app
from adiuva_server.config import Settings
from adiuva_server.keys import AUTH, CLOCK, LICENSE
from adiuva_server.license.format import PRODUCTION_PUBLIC_KEY
from adiuva_server.license.state import LicenseState, LicenseStatus
from tests import licenses as L
from tests.conftest import make_settings, register, run_cli

FAST = {"rate_limits": {"free": 10_001, "pro": 10_002, "power": 10_003, "team": 10_004}}


def key_env(key=L.TEST_KEY) -> dict[str, str]:
    return {"ADIUVA_LICENSE_PUBLIC_KEY": L.public_b64(key)}


def licensed_settings(data_dir, doc, **overrides) -> Settings:
    L.write(data_dir / "license.json", doc)
    return make_settings(data_dir, license_public_key=L.public_b64(), **FAST, **overrides)


# -- the CLI --------------------------------------------------------------------------------------


def test_install_then_show(tmp_path, data_dir):
    now = dt.datetime.now(dt.UTC)
    src = L.write(tmp_path / "granted.json", L.signed(L.body(now, days=200, max_users=50)))
    done = run_cli(data_dir, "license", "install", str(src), **key_env())
    assert done.returncode == 0, done.stderr
    assert "installed the license of Example Hosting Ltd" in done.stdout and "state: valid" in done.stdout
    installed = data_dir / "license.json"
    assert installed.read_bytes() == src.read_bytes()
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600
    assert [p.name for p in data_dir.iterdir() if p.name.startswith(".license-")] == []  # no temp left

    shown = run_cli(data_dir, "license", "show", **key_env())
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert "state: valid" in out and "licensee: Example Hosting Ltd" in out and "features: billing, marketplace" in out
    assert "(199 day(s) left)" in out and "max users: 50" in out and "homelab" not in out
    assert "verified with ADIUVA_LICENSE_PUBLIC_KEY" in out


@pytest.mark.parametrize("case", ["tampered", "wrong key", "production key"])
def test_install_refuses_a_bad_signature(tmp_path, data_dir, case):
    doc = L.signed(L.body(dt.datetime.now(dt.UTC)))
    env = key_env()
    if case == "tampered":
        doc = L.tampered(doc, max_users=100000)
    elif case == "wrong key":
        doc = L.signed(doc["license"], L.OTHER_KEY)
    else:  # the test key's license, checked with the built-in production key
        env = {}
    src = L.write(tmp_path / "lic.json", doc)
    done = run_cli(data_dir, "license", "install", str(src), **env)
    assert done.returncode == 1
    assert "the signature does not match" in done.stderr and "changed after it was signed" in done.stderr
    assert not (data_dir / "license.json").exists()


def test_production_and_test_keys_are_apart(data_dir):
    assert L.public_b64() != PRODUCTION_PUBLIC_KEY and L.public_b64(L.OTHER_KEY) != PRODUCTION_PUBLIC_KEY
    L.write(data_dir / "license.json", L.signed(L.body(dt.datetime.now(dt.UTC))))
    # No ADIUVA_LICENSE_PUBLIC_KEY: the built-in key refuses it, and the server stays in homelab mode.
    settings = make_settings(data_dir)
    assert settings.license_public_key == "" and settings.licensed is False and settings.default_tier == "team"
    state = LicenseState.load(settings)
    assert state.status is LicenseStatus.INVALID and "signature does not match" in state.reason


MALFORMED = {
    "not JSON": (b"{nope", "not JSON"),
    "no signature": (json.dumps({"license": {}}).encode(), 'exactly "license" and "signature"'),
    "extra top field": (None, 'exactly "license" and "signature"'),
    "signature not base64": (None, "not base64"),
    "missing licensee": ("licensee", '"licensee" must be a non-empty string'),
    "bad date": ("expires_at", '"expires_at" must be an ISO 8601'),
    "expiry before issue": ("order", '"expires_at" must be after "issued_at"'),
    "max_users zero": ("max_users", '"max_users" must be a whole number of at least 1'),
    "unknown feature": ("features", "unknown feature(s) teleport"),
    "unknown field": ("field", "unknown field(s) seats"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_install_refuses_malformed(tmp_path, data_dir, case):
    what, message = MALFORMED[case]
    now = dt.datetime.now(dt.UTC)
    good = L.body(now)
    if isinstance(what, bytes):
        raw = what
    else:
        doc = L.signed(good)
        if case == "extra top field":
            doc["key_id"] = "x"
        elif case == "signature not base64":
            doc["signature"] = "!!not base64!!"
        else:
            # Properly signed, so only the field check can refuse it.
            bad = dict(good)
            if what == "licensee":
                del bad["licensee"]
            elif what == "expires_at":
                bad["expires_at"] = "next tuesday"
            elif what == "order":
                bad["expires_at"] = (now - dt.timedelta(days=30)).isoformat()
            elif what == "max_users":
                bad["max_users"] = 0
            elif what == "features":
                bad["features"] = ["billing", "teleport"]
            else:
                bad["seats"] = 5
            doc = L.signed(bad)
        raw = json.dumps(doc).encode()
    src = L.write(tmp_path / "lic.json", raw)
    done = run_cli(data_dir, "license", "install", str(src), **key_env())
    assert done.returncode == 1 and message in done.stderr, done.stderr
    assert not (data_dir / "license.json").exists()


def test_install_refuses_expired_but_takes_one_in_grace(tmp_path, data_dir):
    now = dt.datetime.now(dt.UTC)
    old = L.write(tmp_path / "old.json", L.signed(L.body(now - dt.timedelta(days=400), days=380, grace_days=7)))
    done = run_cli(data_dir, "license", "install", str(old), **key_env())
    assert done.returncode == 1 and "has expired" in done.stderr, done.stderr
    assert not (data_dir / "license.json").exists()

    grace = L.write(tmp_path / "grace.json", L.signed(L.body(now - dt.timedelta(days=400), days=397)))
    done = run_cli(data_dir, "license", "install", str(grace), **key_env())
    assert done.returncode == 0, done.stderr
    assert "state: in_grace" in done.stdout and "everything keeps working until" in done.stderr


def test_install_keeps_the_old_license_when_refusing(tmp_path, data_dir):
    now = dt.datetime.now(dt.UTC)
    first = L.write(tmp_path / "first.json", L.signed(L.body(now)))
    assert run_cli(data_dir, "license", "install", str(first), **key_env()).returncode == 0
    bad = L.write(tmp_path / "bad.json", L.tampered(L.signed(L.body(now, licensee="Other")), licensee="Mallory"))
    assert run_cli(data_dir, "license", "install", str(bad), **key_env()).returncode == 1
    assert (data_dir / "license.json").read_bytes() == first.read_bytes()


def test_show_without_a_license_says_homelab_mode(data_dir):
    done = run_cli(data_dir, "license", "show")
    assert done.returncode == 0 and done.stdout.splitlines()[0] == "homelab mode"
    assert "state: none" in done.stdout and f"no license file at {data_dir / 'license.json'}" in done.stdout


def test_show_says_why_a_license_is_not_used(data_dir):
    L.write(data_dir / "license.json", L.tampered(L.signed(L.body(dt.datetime.now(dt.UTC))), features=["sso"]))
    done = run_cli(data_dir, "license", "show", **key_env())
    assert done.returncode == 0 and done.stdout.splitlines()[0] == "homelab mode"
    assert "state: invalid" in done.stdout and "signature does not match" in done.stdout


def test_license_file_setting_and_a_pem_key(tmp_path, data_dir):
    elsewhere = L.write(tmp_path / "etc" / "adiuva-license.json", L.signed(L.body(dt.datetime.now(dt.UTC))))
    done = run_cli(data_dir, "license", "show", ADIUVA_LICENSE_FILE=str(elsewhere),
                   ADIUVA_LICENSE_PUBLIC_KEY=L.public_pem())
    assert done.returncode == 0 and "state: valid" in done.stdout and str(elsewhere) in done.stdout


@pytest.mark.parametrize("key", ["not base64 !", "AAAA", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"])
def test_a_bad_public_key_setting_stops_the_start(data_dir, key):
    done = run_cli(data_dir, "license", "show", ADIUVA_LICENSE_PUBLIC_KEY=key)
    assert done.returncode == 2 and "ADIUVA_LICENSE_PUBLIC_KEY" in done.stderr


# -- the states on a running server -----------------------------------------------------------------


async def serve(aiohttp_client, settings, clock):
    app = create_app(settings)
    app[CLOCK] = clock
    return await aiohttp_client(app)


async def status_license(client, admin) -> dict:
    resp = await client.get("/api/v1/admin/status", headers=admin.headers)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["license"]


@pytest.mark.parametrize("offset_days, state, new_sales", [
    (-100, "valid", True),      # 100 days before expiry
    (-29, "expiring", True),    # inside the last 30 days
    (3, "in_grace", True),      # 3 days after expiry, grace 14
    (15, "expired", False),     # past the grace
])
async def test_states_in_admin_status(aiohttp_client, data_dir, offset_days, state, new_sales):
    expires = L.T0 + dt.timedelta(days=100)
    settings = licensed_settings(data_dir, L.signed(L.body(L.T0, days=100, max_users=9)))
    clock = L.FakeClock(expires + dt.timedelta(days=offset_days))
    client = await serve(aiohttp_client, settings, clock)
    admin = await register(client, "root@example.org")
    lic = await status_license(client, admin)
    assert lic["state"] == state and lic["licensed"] is True and lic["new_sales"] is new_sales
    assert lic["licensee"] == "Example Hosting Ltd" and lic["features"] == ["billing", "marketplace"]
    assert lic["max_users"] == 9 and lic["days_left"] == -offset_days
    assert lic["expires_at"].startswith(expires.strftime("%Y-%m-%dT%H:%M"))
    assert lic["grace_ends_at"].startswith((expires + dt.timedelta(days=14)).strftime("%Y-%m-%d"))
    state_obj: LicenseState = client.app[LICENSE]
    assert state_obj.allows("billing") and state_obj.allows("marketplace") and not state_obj.allows("sso")
    assert state_obj.allows_new_sales() is new_sales and state_obj.allows_new_sales("sso") is False
    if state == "in_grace":
        assert "everything keeps working until" in lic["reason"]
    if state == "expired":
        assert "no new subscriptions or paid installs" in lic["reason"] and "readable" in lic["reason"]
        with pytest.raises(errors.LicenseExpired):
            state_obj.require_new_sales("billing")
    else:
        state_obj.require_new_sales("billing")


@pytest.mark.parametrize("kind", ["none", "tampered", "wrong key", "malformed", "unknown feature", "future"])
async def test_no_usable_license_is_homelab_mode(aiohttp_client, data_dir, kind, caplog):
    doc = L.signed(L.body(L.T0))
    if kind == "tampered":
        doc = L.tampered(doc, licensee="Someone Else")
    elif kind == "wrong key":
        doc = L.signed(doc["license"], L.OTHER_KEY)
    elif kind == "malformed":
        doc = b'{"license": '
    elif kind == "unknown feature":
        doc = L.signed(L.body(L.T0, features=["billing", "time_travel"]))
    elif kind == "future":
        doc = L.signed(L.body(L.T0 + dt.timedelta(days=10)))
    if kind == "none":
        settings = make_settings(data_dir, license_public_key=L.public_b64(), **FAST)
    else:
        settings = licensed_settings(data_dir, doc)
    clock = L.FakeClock()
    with caplog.at_level(logging.INFO, logger="adiuva_server.license.state"):
        client = await serve(aiohttp_client, settings, clock)
        admin = await register(client, "root@example.org")
        lic = await status_license(client, admin)
        assert lic["licensed"] is False and lic["new_sales"] is False and lic["licensee"] is None
        assert lic["state"] == ("none" if kind == "none" else "invalid")
        assert "homelab mode" in lic["reason"]
        expected = {"none": "no license file", "tampered": "signature does not match",
                    "wrong key": "signature does not match", "malformed": "not JSON",
                    "unknown feature": "unknown feature(s) time_travel", "future": "in the future"}[kind]
        assert expected in lic["reason"]
        me = await (await client.get("/api/v1/auth/me", headers=admin.headers)).json()
        assert me["tier"] == "team"
        assert not client.app[LICENSE].allows("billing")
        # Said once, at start; the daily checks that follow keep quiet about the same thing.
        state = client.app[LICENSE]
        for day in range(3):
            checks = state.checks
            await clock.advance(days=1)
            await until(lambda: state.checks > checks)
    said = [r for r in caplog.records if expected in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == (logging.INFO if kind == "none" else logging.WARNING)


async def until(predicate, timeout: float = 10.0) -> None:
    """Wait for the server's background work (not for time: the clock only moves when told)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_daily_recheck_follows_the_clock_and_the_file(aiohttp_client, data_dir, caplog):
    """Expiry takes effect without a restart, and the daily check reads the file again: a renewal
    counts, and so does a file that turns bad."""
    path = data_dir / "license.json"
    settings = licensed_settings(data_dir, L.signed(L.body(L.T0, days=31, max_users=100)))
    clock = L.FakeClock()
    caplog.set_level(logging.INFO, logger="adiuva_server.license.state")
    client = await serve(aiohttp_client, settings, clock)
    state: LicenseState = client.app[LICENSE]
    admin = await register(client, "root@example.org")
    assert (await status_license(client, admin))["state"] == "valid"
    checks = state.checks

    await clock.advance(days=2)  # 29 days left: expiring, warned by the day's check
    await until(lambda: state.checks > checks)
    assert (await status_license(client, admin))["state"] == "expiring"
    assert any(r.levelno == logging.WARNING and "expires on" in r.getMessage() for r in caplog.records)

    await clock.advance(days=30)  # a day past expiry: in grace, the warning says until when
    await until(lambda: state.checks > checks + 1)
    assert state.status is LicenseStatus.IN_GRACE
    assert any("everything keeps working until 2026-02-15" in r.getMessage() for r in caplog.records)

    await clock.advance(days=14)  # past the grace
    await until(lambda: state.checks > checks + 2)
    lic = await status_license(client, admin)
    assert lic["state"] == "expired" and lic["licensed"] is True and not state.allows_new_sales()
    # Still licensed mode: new accounts get free.
    ada = await register(client, "ada@example.org")
    assert (await (await client.get("/api/v1/auth/me", headers=ada.headers)).json())["tier"] == "free"

    # The renewal, installed while the server runs: it counts at the next daily check.
    L.write(path, L.signed(L.body(clock.now(), days=365, id="lic-0002")))
    assert state.status is LicenseStatus.EXPIRED
    await clock.advance(days=1)
    await until(lambda: state.checks > checks + 3)
    lic = await status_license(client, admin)
    assert lic["state"] == "valid" and lic["id"] == "lic-0002" and state.allows_new_sales("billing")

    # A file that turns bad: homelab mode from the next check, said why.
    L.write(path, L.tampered(L.signed(L.body(clock.now())), max_users=10**6))
    await clock.advance(days=1)
    await until(lambda: state.checks > checks + 4)
    lic = await status_license(client, admin)
    assert lic["state"] == "invalid" and lic["licensed"] is False and "signature does not match" in lic["reason"]
    bob = await register(client, "bob@example.org")
    assert (await (await client.get("/api/v1/auth/me", headers=bob.headers)).json())["tier"] == "team"


async def test_expired_license_keeps_data_readable(aiohttp_client, data_dir):
    settings = licensed_settings(data_dir, L.signed(L.body(L.T0, days=10)))
    clock = L.FakeClock()
    client = await serve(aiohttp_client, settings, clock)
    ada = await register(client)
    await client.app[AUTH].store.update_user(ada.email, tier="pro")
    data = b"encrypted bytes"
    resp = await client.post("/api/v1/storage/records?table=notes", data=data,
                             headers={**ada.headers, "X-Checksum": hashlib.sha256(data).hexdigest()})
    assert resp.status == 201, await resp.text()
    record = (await resp.json())["id"]
    await clock.advance(days=30)
    assert client.app[LICENSE].status is LicenseStatus.EXPIRED
    resp = await client.get(f"/api/v1/storage/records/{record}", headers=ada.headers)
    assert resp.status == 200 and await resp.read() == data
    resp = await client.get("/api/v1/storage/changes", headers=ada.headers)
    assert resp.status == 200


# -- default tier ------------------------------------------------------------------------------------


async def test_licensed_mode_gives_new_accounts_free(aiohttp_client, data_dir):
    now = dt.datetime.now(dt.UTC)
    settings = licensed_settings(data_dir, L.signed(L.body(now)))
    assert settings.licensed is True and settings.default_tier == "free"
    client = await serve(aiohttp_client, settings, L.FakeClock(now))
    ada = await register(client)
    resp = await client.get("/api/v1/auth/me", headers=ada.headers)
    assert (await resp.json())["tier"] == "free"
    admin_status = await status_license(client, ada)  # the first account is the admin
    assert admin_status["licensed"] is True


async def test_default_tier_setting_wins_in_licensed_mode(aiohttp_client, data_dir):
    now = dt.datetime.now(dt.UTC)
    L.write(data_dir / "license.json", L.signed(L.body(now)))
    settings = Settings.from_env({"ADIUVA_DEFAULT_TIER": "pro", **key_env()}, data_dir=data_dir, env="test")
    assert settings.licensed is True and settings.default_tier == "pro"
    client = await serve(aiohttp_client, settings, L.FakeClock(now))
    ada = await register(client)
    assert (await (await client.get("/api/v1/auth/me", headers=ada.headers)).json())["tier"] == "pro"


# -- max_users ------------------------------------------------------------------------------------


async def test_max_users_refuses_registrations_beyond_it(aiohttp_client, data_dir):
    settings = licensed_settings(data_dir, L.signed(L.body(L.T0, max_users=2)))
    client = await serve(aiohttp_client, settings, L.FakeClock())
    await register(client, "a@example.org")
    await register(client, "b@example.org")
    resp = await client.post("/api/v1/auth/register", json={"email": "c@example.org", "password": "correct horse battery"})
    assert resp.status == 403 and resp.content_type == "application/problem+json"
    problem = await resp.json()
    assert problem["code"] == "license_user_limit" and "allows 2 accounts" in problem["detail"]
    resp = await client.post("/api/v1/auth/login", json={"email": "c@example.org", "password": "correct horse battery"})
    assert resp.status == 401  # nothing was created


async def test_max_users_holds_under_concurrent_registrations(aiohttp_client, data_dir):
    # Cheap hashes, all at once: the registrations reach the store together.
    settings = licensed_settings(data_dir, L.signed(L.body(L.T0, max_users=5)), registrations_per_address=1000,
                                 argon2_memory_kib=8 * 1024, argon2_time_cost=1, max_concurrent_hashes=32)
    client = await serve(aiohttp_client, settings, L.FakeClock())
    await register(client, "root@example.org")

    async def one(i):
        resp = await client.post("/api/v1/auth/register", json={"email": f"u{i}@example.org", "password": "correct horse battery"})
        return resp.status, (await resp.json()).get("code")

    outcomes = await asyncio.gather(*(one(i) for i in range(24)))
    assert [s for s, _ in outcomes].count(201) == 4
    assert all(code == "license_user_limit" for s, code in outcomes if s != 201)
    assert len(await client.app[AUTH].store.list_users()) == 5

    # And straight at the store, where nothing (no hashing) spaces the creations out.
    store = client.app[AUTH].store
    outcomes = await asyncio.gather(*(store.create_user(f"s{i}@example.org", "x", "free", admin=False, max_users=6)
                                      for i in range(20)), return_exceptions=True)
    assert sum(not isinstance(o, Exception) for o in outcomes) == 1
    assert all(isinstance(o, errors.LicenseUserLimit) for o in outcomes if isinstance(o, Exception))
    assert len(await store.list_users()) == 6


def test_max_users_holds_for_the_cli_too(tmp_path, data_dir):
    now = dt.datetime.now(dt.UTC)
    src = L.write(tmp_path / "lic.json", L.signed(L.body(now, max_users=1)))
    assert run_cli(data_dir, "license", "install", str(src), **key_env()).returncode == 0
    done = run_cli(data_dir, "user", "add", "root@example.org", "--admin", "--create", **key_env())
    assert done.returncode == 0, done.stderr
    done = run_cli(data_dir, "user", "add", "ada@example.org", **key_env())
    assert done.returncode == 1 and "allows 1 accounts" in done.stderr


# -- doctor and console ------------------------------------------------------------------------------


def test_doctor_and_show_warn_of_an_expiring_license(tmp_path, data_dir):
    now = dt.datetime.now(dt.UTC)
    assert run_cli(data_dir, "user", "add", "root@example.org", "--admin", "--create").returncode == 0
    done = run_cli(data_dir, "doctor")
    assert "license: no license file: homelab mode" in done.stdout, done.stdout
    L.write(data_dir / "license.json", L.signed(L.body(now, days=10)))
    done = run_cli(data_dir, "doctor", **key_env())
    assert "[warn] license: expiring: the license of Example Hosting Ltd expires on" in done.stdout, done.stdout
    shown = run_cli(data_dir, "license", "show", **key_env())
    assert "state: expiring" in shown.stdout and "(9 day(s) left)" in shown.stdout
    assert "warning: the license of Example Hosting Ltd expires on" in shown.stdout
    done = run_cli(data_dir, "doctor")  # the built-in key: the test license cannot be used
    assert "[FAIL] license: the license file" in done.stdout and done.returncode == 1


async def test_console_status_page_shows_the_license(aiohttp_client, data_dir):
    from tests.test_console import setup_admin

    settings = licensed_settings(data_dir, L.signed(L.body(L.T0, days=20)))
    client = await serve(aiohttp_client, settings, L.FakeClock())
    await setup_admin(client)
    page = await (await client.get("/admin")).text()
    assert "licensed mode (expiring): the license of Example Hosting Ltd expires on 2026-01-21" in page


def test_server_backups_carry_the_license(tmp_path, data_dir):
    now = dt.datetime.now(dt.UTC)
    src = L.write(tmp_path / "lic.json", L.signed(L.body(now)))
    assert run_cli(data_dir, "user", "add", "root@example.org", "--admin", "--create").returncode == 0
    assert run_cli(data_dir, "license", "install", str(src), **key_env()).returncode == 0
    archive = tmp_path / "server.tar"
    done = run_cli(data_dir, "backup", "create", "--out", str(archive))
    assert done.returncode == 0, done.stderr
    restored = tmp_path / "restored"
    done = run_cli(data_dir, "backup", "restore", str(archive), "--data-dir", str(restored))
    assert done.returncode == 0, done.stderr
    assert (restored / "license.json").read_bytes() == src.read_bytes()
    assert stat.S_IMODE((restored / "license.json").stat().st_mode) == 0o600
    shown = run_cli(restored, "license", "show", **key_env())
    assert "state: valid" in shown.stdout
