"""The admin console (/admin) without a browser: the first-run link, sessions and their cookie,
CSRF, admins only, secrets kept off the settings page. The real server on a socket, a real
SQLite file; tests/test_console_browser.py drives the same pages in chromium."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

from adiuva_server.app import create_app
from adiuva_server.console.routes import CSP, first_run_url
from tests.conftest import ServerProcess, make_settings, register

PASSWORD = "correct horse battery"


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html
    return found.group(1)


async def setup_admin(client, email: str = "root@example.org", password: str = PASSWORD):
    url = first_run_url(client.app, "")
    assert url
    resp = await client.get(url)
    assert resp.status == 200, await resp.text()
    html = await resp.text()
    token = re.search(r'name="token" value="([^"]+)"', html).group(1)
    resp = await client.post("/admin/setup", data={"csrf": csrf_of(html), "token": token, "email": email,
                                                   "password": password}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    return resp


async def sign_in(client, email: str, password: str = PASSWORD, status: int = 303):
    resp = await client.get("/admin/login")
    assert resp.status == 200
    resp = await client.post("/admin/login", data={"csrf": csrf_of(await resp.text()), "email": email,
                                                   "password": password}, allow_redirects=False)
    assert resp.status == status, await resp.text()
    return resp


async def signed_in(client) -> bool:
    resp = await client.get("/admin", allow_redirects=False)
    return resp.status == 200


async def api_login(client, email: str, password: str = PASSWORD) -> dict:
    resp = await client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert resp.status == 200, await resp.text()
    return {"Authorization": f"Bearer {(await resp.json())['access_token']}"}


async def user_id(client, admin_headers, email: str) -> str:
    resp = await client.get("/api/v1/admin/users", params={"q": email}, headers=admin_headers)
    return (await resp.json())["items"][0]["id"]


# -- first run ------------------------------------------------------------------------------------


async def test_setup_link_works_once_and_makes_the_first_admin(client):
    url = first_run_url(client.app, "")
    token = url.split("token=", 1)[1]
    assert len(token) >= 40
    assert (await client.get("/admin/setup?token=" + "x" * len(token))).status == 403
    assert (await client.get("/admin/setup")).status == 403
    page = await client.get(url)
    html = await page.text()
    resp = await client.post("/admin/setup", data={"csrf": csrf_of(html), "token": token, "email": "root@example.org",
                                                   "password": PASSWORD}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/admin"
    assert await signed_in(client)
    me = await client.get("/api/v1/auth/me", headers=await api_login(client, "root@example.org"))
    assert (await me.json())["email"] == "root@example.org"
    headers = await api_login(client, "root@example.org")
    assert (await client.get("/api/v1/admin/users", headers=headers)).status == 200  # an admin
    # Used: the same form again makes nothing, the link no longer opens, the banner has none.
    again = await client.post("/admin/setup", data={"csrf": csrf_of(html), "token": token, "email": "eve@example.org",
                                                    "password": PASSWORD}, allow_redirects=False)
    assert again.status == 403
    assert (await client.get(url)).status == 403
    assert first_run_url(client.app, "") is None
    users = await (await client.get("/api/v1/admin/users", headers=headers)).json()
    assert [u["email"] for u in users["items"]] == ["root@example.org"]


async def test_a_refused_setup_keeps_the_link_and_makes_nothing(client):
    url = first_run_url(client.app, "")
    token = url.split("token=", 1)[1]
    html = await (await client.get(url)).text()
    resp = await client.post("/admin/setup", data={"csrf": csrf_of(html), "token": token, "email": "root@example.org",
                                                   "password": "short"})
    assert resp.status == 422
    assert "at least 8 characters" in await resp.text()
    assert (await client.get(url)).status == 200
    assert first_run_url(client.app, "") == url


async def test_setup_link_closes_when_an_account_is_made_another_way(client):
    url = first_run_url(client.app, "")
    await register(client, "ada@example.org")
    assert (await client.get(url)).status == 403
    assert first_run_url(client.app, "") is None


async def test_no_setup_link_when_accounts_exist(aiohttp_client, settings):
    first = await aiohttp_client(create_app(settings))
    await register(first, "ada@example.org")
    await first.close()
    second = await aiohttp_client(create_app(settings))
    assert first_run_url(second.app, "") is None


def test_the_setup_token_is_printed_once_and_never_logged(data_dir):
    server = ServerProcess(data_dir)
    lines = list(server.output)
    drain = threading.Thread(target=lambda: lines.extend(server.proc.stdout), daemon=True)
    drain.start()
    deadline = time.monotonic() + 20
    while not any("setup?token=" in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    (banner,) = [line for line in lines if "setup?token=" in line]
    url = banner.split()[-1]
    assert url.startswith(server.url + "/admin/setup?token=")
    token = url.split("token=", 1)[1]
    with urllib.request.urlopen(url) as resp:
        assert resp.status == 200
    try:
        urllib.request.urlopen(url.replace(token, token[:-2] + "zz"))
    except urllib.error.HTTPError as exc:
        assert exc.code == 403
    server.proc.terminate()
    server.proc.wait(timeout=30)
    drain.join(timeout=10)
    output = "".join(lines)
    assert '"GET /admin/setup" 200' in output  # the access log saw the request...
    assert output.count(token[:20]) == 1  # ...and only the banner holds the token


# -- sessions -------------------------------------------------------------------------------------


async def test_session_cookie_is_opaque_httponly_strict_and_scoped_to_admin(client, data_dir):
    resp = await setup_admin(client)
    cookie = resp.cookies["adiuva_console"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/admin"
    assert not cookie["secure"]  # plain HTTP here; see the TLS test
    value = cookie.value
    assert len(value) >= 40 and "root" not in value and "." not in value  # random, not a signed claim
    conn = sqlite3.connect(data_dir / "adiuva.db")
    rows = conn.execute("SELECT id_hash FROM console_sessions").fetchall()
    conn.close()
    assert rows == [(hashlib.sha256(value.encode()).digest(),)]  # stored hashed only
    # The CSRF cookie of the sign-in form is gone with sign-in; the API never sees the cookie.
    assert "adiuva_console_csrf" in resp.cookies and resp.cookies["adiuva_console_csrf"].value == ""
    assert (await client.get("/api/v1/auth/me")).status == 401


async def test_session_cookie_is_secure_under_tls(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, tls=True)))
    url = first_run_url(client.app, "")
    page = await client.get(url)
    assert page.cookies["adiuva_console_csrf"]["secure"]
    token = url.split("token=", 1)[1]
    resp = await client.post("/admin/setup", data={"csrf": csrf_of(await page.text()), "token": token,
                                                   "email": "root@example.org", "password": PASSWORD},
                             allow_redirects=False, headers={"Cookie": f"adiuva_console_csrf={csrf_of(await page.text())}"})
    assert resp.status == 303, await resp.text()
    assert resp.cookies["adiuva_console"]["secure"]


async def test_a_new_password_ends_the_console_session(client):
    await setup_admin(client)
    assert await signed_in(client)
    headers = await api_login(client, "root@example.org")
    me = await user_id(client, headers, "root@example.org")
    resp = await client.patch(f"/api/v1/admin/users/{me}", json={"password": "another fine password"}, headers=headers)
    assert resp.status == 200
    resp = await client.get("/admin", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/admin/login"


async def test_disabling_or_demoting_an_admin_ends_their_console_session(aiohttp_client, settings):
    root = await aiohttp_client(create_app(settings))
    await setup_admin(root)
    headers = await api_login(root, "root@example.org")
    for email in ("second@example.org", "third@example.org"):
        resp = await root.post("/api/v1/admin/users", json={"email": email, "password": PASSWORD, "admin": True},
                               headers=headers)
        assert resp.status == 201
    other = await aiohttp_client(root.server)  # a second browser on the same server
    await sign_in(other, "second@example.org")
    assert await signed_in(other)
    await root.patch(f"/api/v1/admin/users/{await user_id(root, headers, 'second@example.org')}",
                     json={"disabled": True}, headers=headers)
    assert not await signed_in(other)
    await sign_in(other, "third@example.org")
    assert await signed_in(other)
    await root.patch(f"/api/v1/admin/users/{await user_id(root, headers, 'third@example.org')}",
                     json={"admin": False}, headers=headers)
    assert not await signed_in(other)
    assert await signed_in(root)


async def test_sign_out_ends_the_session_on_the_server(client):
    resp = await setup_admin(client)
    stolen = resp.cookies["adiuva_console"].value
    page = await client.get("/admin")
    resp = await client.post("/admin/logout", data={"csrf": csrf_of(await page.text())}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/admin/login"
    # The old cookie, replayed, no longer signs anyone in.
    resp = await client.get("/admin", headers={"Cookie": f"adiuva_console={stolen}"}, allow_redirects=False)
    assert resp.status == 303


async def test_only_admins_may_sign_in(client):
    await setup_admin(client)
    await client.post("/admin/logout", data={"csrf": csrf_of(await (await client.get("/admin")).text())})
    await register(client, "bob@example.org", PASSWORD)
    resp = await sign_in(client, "bob@example.org", status=403)
    assert "not an admin" in await resp.text()
    assert "adiuva_console" not in resp.cookies
    assert not await signed_in(client)
    resp = await sign_in(client, "bob@example.org", "wrong password", status=401)
    assert "Invalid email or password" in await resp.text()


async def test_sign_in_uses_the_apis_throttle(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir, login_failures_per_account=3)))
    await setup_admin(client)
    await client.post("/admin/logout", data={"csrf": csrf_of(await (await client.get("/admin")).text())})
    for _ in range(3):
        await sign_in(client, "root@example.org", "wrong password", status=401)
    resp = await sign_in(client, "root@example.org", status=429)  # the right password, throttled
    assert "Too many failed sign-ins" in await resp.text() and int(resp.headers["Retry-After"]) > 0
    resp = await client.post("/api/v1/auth/login", json={"email": "root@example.org", "password": PASSWORD})
    assert resp.status == 429  # one throttle for both doors


async def test_pages_need_a_session(client):
    for path in ("/admin", "/admin/users", "/admin/backups", "/admin/settings"):
        resp = await client.get(path, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == "/admin/login", path
    resp = await client.post("/admin/backups", data={}, allow_redirects=False)
    assert resp.status == 403


# -- CSRF -----------------------------------------------------------------------------------------


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(client):
    await setup_admin(client)
    bob = await register(client, "bob@example.org", PASSWORD)
    headers = await api_login(client, "root@example.org")
    bob_id = await user_id(client, headers, "bob@example.org")
    page = await client.get(f"/admin/users/{bob_id}")
    token = csrf_of(await page.text())
    for data in ({"tier": "free"}, {"tier": "free", "csrf": ""}, {"tier": "free", "csrf": token[:-1] + "A"}):
        resp = await client.post(f"/admin/users/{bob_id}/tier", data=data, allow_redirects=False)
        assert resp.status == 403, data
        assert "Form refused" in await resp.text()
    assert (await (await client.get("/api/v1/auth/me", headers=bob.headers)).json())["tier"] == "team"
    resp = await client.post(f"/admin/users/{bob_id}/tier", data={"tier": "free", "csrf": token}, allow_redirects=False)
    assert resp.status == 303
    assert (await (await client.get("/api/v1/auth/me", headers=bob.headers)).json())["tier"] == "free"


async def test_sign_in_form_needs_its_csrf_cookie(client):
    await setup_admin(client)
    client.session.cookie_jar.clear()
    page = await client.get("/admin/login")
    token = csrf_of(await page.text())
    client.session.cookie_jar.clear()  # a form posted from elsewhere carries no cookie
    resp = await client.post("/admin/login", data={"csrf": token, "email": "root@example.org", "password": PASSWORD},
                             allow_redirects=False)
    assert resp.status == 403 and "adiuva_console" not in resp.cookies


# -- pages ----------------------------------------------------------------------------------------


async def test_every_console_page_has_the_strict_csp_and_no_inline_script_or_style(client):
    await setup_admin(client)
    bob = await register(client, "bob@example.org", PASSWORD)
    headers = await api_login(client, "root@example.org")
    bob_id = await user_id(client, headers, "bob@example.org")
    for path in ("/admin", "/admin/users", f"/admin/users/{bob_id}", f"/admin/users/{bob_id}/delete",
                 "/admin/backups", "/admin/settings", "/admin/static/console.css"):
        resp = await client.get(path)
        assert resp.status == 200, path
        assert resp.headers["Content-Security-Policy"] == CSP
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        html = await resp.text()
        if resp.content_type == "text/html":
            assert '<meta name="viewport"' in html
            assert "<style" not in html and " style=" not in html
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), path  # every script is a file
            assert not re.search(r"\son[a-z]+=", html), path  # no inline event handlers
    assert bob.email


async def test_values_are_escaped(client):
    await setup_admin(client)
    evil = "<script>alert(1)</script>"
    resp = await client.get("/admin/users", params={"q": evil})
    html = await resp.text()
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


async def test_users_page_lists_searches_and_shows_usage(client):
    await setup_admin(client)
    await register(client, "bob@example.org", PASSWORD)
    await register(client, "carol@example.org", PASSWORD)
    html = await (await client.get("/admin/users")).text()
    assert "bob@example.org" in html and "carol@example.org" in html and "1-3 of 3" in html
    html = await (await client.get("/admin/users?q=CAROL")).text()
    assert "carol@example.org" in html and "bob@example.org" not in html


async def test_create_user_shows_a_generated_password_once(client):
    await setup_admin(client)
    page = await client.get("/admin/users")
    resp = await client.post("/admin/users", data={"csrf": csrf_of(await page.text()), "email": "dan@example.org",
                                                   "password": "", "tier": "pro"})
    assert resp.status == 201
    password = re.search(r'<code class="secret">([^<]+)</code>', await resp.text()).group(1)
    me = await client.get("/api/v1/auth/me", headers=await api_login(client, "dan@example.org", password))
    assert (await me.json())["tier"] == "pro"
    again = await client.post("/admin/users", data={"csrf": csrf_of(await page.text()), "email": "dan@example.org",
                                                    "password": PASSWORD, "tier": "pro"})
    assert again.status == 409


async def test_delete_needs_the_email_typed(client):
    await setup_admin(client)
    bob = await register(client, "bob@example.org", PASSWORD)
    bob_id = await user_id(client, await api_login(client, "root@example.org"), "bob@example.org")
    page = await client.get(f"/admin/users/{bob_id}/delete")
    token = csrf_of(await page.text())
    resp = await client.post(f"/admin/users/{bob_id}/delete", data={"csrf": token, "confirm": "bob"})
    assert resp.status == 422
    assert (await client.get("/api/v1/auth/me", headers=bob.headers)).status == 200
    resp = await client.post(f"/admin/users/{bob_id}/delete", data={"csrf": token, "confirm": " Bob@example.org "},
                             allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/admin/users?done=deleted"
    assert (await client.get("/api/v1/auth/me", headers=bob.headers)).status == 401
    assert (await client.get(f"/admin/users/{bob_id}")).status == 404


async def test_settings_page_redacts_secrets_and_says_where_values_came_from(aiohttp_client, data_dir):
    secret = "sk_test_" + "s3cr3t" * 6
    jwt = "j" * 48
    settings = make_settings(data_dir, stripe_secret_key=secret, jwt_secret=jwt, llm_api_base="http://me:hunter2@llm:4000")
    client = await aiohttp_client(create_app(settings))
    await setup_admin(client)
    html = await (await client.get("/admin/settings")).text()
    for leaked in (secret, jwt, "hunter2"):
        assert leaked not in html
    row = re.search(r"<code>stripe_secret_key</code></td><td[^>]*>([^<]*)</td><td><span class=\"source (\w+)", html)
    assert row.groups() == ("•••••• (set)", "flag")
    assert re.search(r"<code>port</code></td><td[^>]*>\d+</td><td><span class=\"source default", html)
    assert "http://me:******@llm:4000" in html


def test_settings_sources_distinguish_default_environment_and_flag(tmp_path):
    from adiuva_server.config import Settings

    s = Settings.from_env({"ADIUVA_DATA_DIR": str(tmp_path), "LLM_MODEL": "gpt-4o", "ADIUVA_PORT": " "}, host="::1")
    assert (s.sources["data_dir"], s.sources["llm_model"], s.sources["llm_router_model"]) == ("environment",) * 3
    assert s.sources["host"] == "flag" and s.sources["port"] == "default"


def test_every_variable_config_reads_has_its_setting_named_for_the_console():
    """A new setting's variable must be in config.ENV_NAMES, or the settings page says "default"."""
    from pathlib import Path

    from adiuva_server.config import ENV_NAMES
    from tests.test_docs import SETTING

    source = (Path(__file__).resolve().parent.parent / "adiuva_server" / "config.py").read_text()
    read = set(SETTING.findall(source.split("\nENV_NAMES", 1)[0]))
    named = {n for names in ENV_NAMES.values() for n in names}
    assert len(read) > 40 and read - named == set(), "add these to config.ENV_NAMES"


async def test_backups_page_creates_lists_verifies_and_downloads(client, data_dir):
    await setup_admin(client)
    page = await client.get("/admin/backups")
    token = csrf_of(await page.text())
    assert "No server backups yet" in await page.text()
    resp = await client.post("/admin/backups", data={"csrf": token}, allow_redirects=False)
    assert resp.status == 303
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        progress = await (await client.get("/admin/backups/progress")).json()
        if progress["finished"]:
            break
        time.sleep(0.05)
    assert progress["finished"] and progress["error"] is None and progress["done_bytes"] > 0
    name = progress["name"]
    html = await (await client.get("/admin/backups")).text()
    assert name in html and f"Backup {name} written." in html
    resp = await client.post(f"/admin/backups/{name}/verify", data={"csrf": token})
    assert f"{name} verified" in await resp.text()
    resp = await client.get(f"/admin/backups/{name}/download")
    assert resp.status == 200 and resp.headers["Content-Disposition"] == f'attachment; filename="{name}"'
    assert await resp.read() == (data_dir / "server-backups" / name).read_bytes()
    # Only a listed archive, never a path.
    assert (await client.get("/admin/backups/..%2Fadiuva.db/download")).status == 404
    assert (await client.get("/admin/backups/adiuva.db/download")).status == 404
    # A corrupted archive fails its verification, and says so.
    archive = data_dir / "server-backups" / name
    raw = bytearray(archive.read_bytes())
    raw[2048] ^= 0xFF
    archive.write_bytes(bytes(raw))
    resp = await client.post(f"/admin/backups/{name}/verify", data={"csrf": token})
    assert "failed verification" in await resp.text()


async def test_status_page_shows_the_servers_state_and_a_qr_code(client):
    await setup_admin(client)
    html = await (await client.get("/admin")).text()
    assert "0.1.0" in html or "Version" in html
    assert 'src="data:image/svg+xml' in html
    assert "homelab mode" in html and "none yet" in html


async def test_status_page_under_tls_shows_the_certificate_fingerprint(aiohttp_client, data_dir):
    from adiuva_server import tls

    data_dir.mkdir(mode=0o700, parents=True)
    cert, _ = tls.self_signed(data_dir, [])  # as `adiuva serve --tls` makes it
    client = await aiohttp_client(create_app(make_settings(data_dir, tls=True)))
    url = first_run_url(client.app, "")
    page = await client.get(url)
    csrf = csrf_of(await page.text())
    resp = await client.post("/admin/setup", data={"csrf": csrf, "token": url.split("token=", 1)[1],
                                                   "email": "root@example.org", "password": PASSWORD},
                             headers={"Cookie": f"adiuva_console_csrf={csrf}"}, allow_redirects=False)
    session = resp.cookies["adiuva_console"].value  # Secure: the test client would not send it over HTTP
    html = await (await client.get("/admin", headers={"Cookie": f"adiuva_console={session}"})).text()
    pin = tls.fingerprint(cert.read_bytes())
    assert pin in html
    assert f"#sha256={pin}" in re.search(r'alt="QR code of ([^"]+)"', html).group(1)


def test_the_console_assets_ship_with_the_package():
    """pyproject's package-data and the PyInstaller hook must carry templates and static files."""
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    data = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["adiuva_server"]
    assert "console/templates/*.html" in data and "console/static/*" in data
    hook = (repo / "adiuva_server/_pyinstaller/hook-adiuva_server.py").read_text()
    assert "console" in hook
    out = subprocess.run([sys.executable, "-c", "from adiuva_server.console.render import Templates, load_assets;"
                          "print(len(Templates()._templates), sorted(load_assets()))"],
                         capture_output=True, text=True, check=True, cwd=repo)
    assert "console.css" in out.stdout and "console.js" in out.stdout


async def wait_for_doctor(client, headers, runs_before: str | None = None) -> dict:
    """The admin status once a doctor run newer than `runs_before` (its finished_at) is in it."""
    import asyncio

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        doctor = (await (await client.get("/api/v1/admin/status", headers=headers)).json())["doctor"]
        run = doctor["last_run"]
        if run is not None and run["finished_at"] != runs_before and not doctor["running"]:
            return doctor
        await asyncio.sleep(0.05)
    raise AssertionError(f"no doctor run in 60 s: {doctor}")


async def test_status_page_shows_llm_availability_and_the_doctor_summary(aiohttp_client, data_dir):
    from tests.conftest import free_port

    port = free_port()  # Ollama configured where nothing listens
    client = await aiohttp_client(create_app(make_settings(data_dir, ollama_host=f"http://127.0.0.1:{port}",
                                                           llm_models=("gpt-4o",), doctor_interval=0)))
    await setup_admin(client)
    headers = await api_login(client, "root@example.org")
    html = await (await client.get("/admin")).text()
    assert "<h2>Doctor</h2>" in html and "Not run yet." in html and "Scheduled runs are off" in html
    # Each model's availability, with the reason when it is not available.
    reach = html.split("<h3>Reachability</h3>", 1)[1].split("</ul>", 1)[0]
    assert '<span class="state fail">not available</span> <code>ollama/llama3.2</code>' in reach
    assert f"127.0.0.1:{port}" in reach
    assert "<code>gpt-4o</code>" in reach
    # A run from the page: CSRF-checked, in the background, its result then on the page.
    resp = await client.post("/admin/doctor", data={}, allow_redirects=False)
    assert resp.status == 403 and (await (await client.get("/api/v1/admin/status", headers=headers)).json()
                                   )["doctor"] == {"running": False, "interval_seconds": 0, "next_run_at": None,
                                                   "last_run": None}
    resp = await client.post("/admin/doctor", data={"csrf": csrf_of(html)}, allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == "/admin?done=doctor"
    doctor = await wait_for_doctor(client, headers)
    html = await (await client.get("/admin")).text()
    assert "Not run yet." not in html
    run = doctor["last_run"]
    assert f"{run['ok']} ok, {run['warnings']} warning" in html and run["warnings"] >= 1  # Ollama unreachable
    assert '<span class="state ok">ok</span> database: integrity ok' in html
    assert f"Ollama at http://127.0.0.1:{port} is not reachable" in html
    assert '<span class="state warn">warning</span> llm:' in html
