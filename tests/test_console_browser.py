"""The admin console in a real browser: Debian's chromium driven by Playwright against
`adiuva serve` in a subprocess on a loopback port. From the banner's first-run link to sign-out,
with the API checked after each change. ADIUVA_UPDATE_SCREENSHOTS=1 rewrites docs/screenshots/."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from adiuva_server.console.routes import CSP
from tests.conftest import REPO, ServerProcess

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "correct horse battery"


class DrainedServer:
    """`adiuva serve` whose output is read to the end by a thread (a full pipe would block it)."""

    def __init__(self, data_dir: Path) -> None:
        self.server = ServerProcess(data_dir)
        self.url = self.server.url
        self.lines = list(self.server.output)
        self._drain = threading.Thread(target=lambda: self.lines.extend(self.server.proc.stdout), daemon=True)
        self._drain.start()

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the server's output:\n{''.join(self.lines)}")

    def stop(self) -> None:
        if self.server.proc.poll() is None:
            self.server.proc.terminate()
        try:
            self.server.proc.wait(timeout=30)
        except Exception:
            self.server.proc.kill()
            self.server.proc.wait()
        self._drain.join(timeout=10)


@pytest.fixture
def server(data_dir):
    running = DrainedServer(data_dir)
    yield running
    running.stop()


@pytest.fixture
def shots(tmp_path) -> Path:
    if os.environ.get("ADIUVA_UPDATE_SCREENSHOTS") == "1":
        folder = REPO / "docs" / "screenshots"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return tmp_path


def watch(page: Page, problems: list[str]) -> Page:
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    return page


def test_the_console_in_chromium(server, shots):
    assert Path(CHROMIUM).exists(), "install Debian's chromium (.ci/run does where it is missing)"
    setup_url = server.wait_for("/admin/setup?token=").split()[-1]
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        api = p.request.new_context(base_url=server.url)
        try:
            context = browser.new_context(viewport={"width": 1100, "height": 760})
            page = watch(context.new_page(), problems)

            # First run: the banner's link opens the form that makes the first admin.
            response = page.goto(setup_url)
            assert response.status == 200
            assert response.headers["content-security-policy"] == CSP
            page.fill("input[name=email]", "root@example.org")
            page.fill("input[name=password]", PASSWORD)
            page.screenshot(path=shots / "setup.png")
            page.click("button[type=submit]")
            expect(page).to_have_url(f"{server.url}/admin")
            expect(page.locator("h1")).to_have_text("Status")
            expect(page.locator("img.qr")).to_be_visible()
            # The link is used up.
            assert page.request.get(setup_url).status == 403

            # Two accounts through the API, as the desktop app makes them.
            bob = api.post("/api/v1/auth/register", data={"email": "bob@example.org", "password": PASSWORD}).json()
            carol = api.post("/api/v1/auth/register", data={"email": "carol@example.org", "password": PASSWORD}).json()
            bob_auth = {"Authorization": f"Bearer {bob['access_token']}"}
            assert api.get("/api/v1/auth/me", headers=bob_auth).json()["tier"] == "team"

            # Sign out, and sign in again with the form.
            page.click("nav button:has-text('Sign out')")
            expect(page).to_have_url(f"{server.url}/admin/login")
            page.fill("input[name=email]", "root@example.org")
            page.fill("input[name=password]", PASSWORD)
            page.screenshot(path=shots / "login.png")
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_have_text("Status")
            expect(page.locator("dl").nth(1)).to_contain_text("Users3")
            page.screenshot(path=shots / "status.png", full_page=True)

            # Users: the list, then bob's tier, which the API honours on the next request.
            page.click("nav a:has-text('Users')")
            expect(page.locator("table.users")).to_contain_text("bob@example.org")
            expect(page.locator("table.users")).to_contain_text("carol@example.org")
            page.fill("input[name=q]", "bo")
            page.click("form.search button")
            expect(page.locator("table.users tbody tr")).to_have_count(1)
            page.click("nav a:has-text('Users')")
            page.screenshot(path=shots / "users.png", full_page=True)
            page.click("text=bob@example.org")
            page.select_option("select[name=tier]", "free")
            page.click("button:has-text('Set tier')")
            expect(page.locator(".notice")).to_have_text("Tier changed.")
            assert api.get("/api/v1/auth/me", headers=bob_auth).json()["tier"] == "free"
            bob_id = re.search(r"/admin/users/([0-9a-f-]{36})", page.url).group(1)

            # Unlock: bob guesses wrong until the account's back-off holds even his right password.
            for _ in range(30):
                guess = api.post("/api/v1/auth/login", data={"email": "bob@example.org", "password": "nope nope"})
                assert guess.status in (401, 429)
                if guess.status == 429:
                    break
            assert api.post("/api/v1/auth/login", data={"email": "bob@example.org", "password": PASSWORD}).status == 429
            page.click("button:has-text('Unlock sign-in')")
            expect(page.locator(".notice")).to_have_text("Sign-in back-off lifted.")
            assert api.post("/api/v1/auth/login", data={"email": "bob@example.org", "password": PASSWORD}).status == 200
            page.screenshot(path=shots / "user.png", full_page=True)

            # A form posted without its CSRF token (the browser's own cookies, no token) changes nothing.
            refused = context.request.post(f"{server.url}/admin/users/{bob_id}/tier", form={"tier": "power"},
                                           max_redirects=0)
            assert refused.status == 403 and "Form refused" in refused.text()
            assert api.get("/api/v1/auth/me", headers=bob_auth).json()["tier"] == "free"

            # Backups: make one (the page follows its progress), see it listed, verify it. Carol's
            # 12 MB record makes the backup outlast the redirect, so the progress script usually runs.
            blob = os.urandom(12 * 1024 * 1024)
            stored = api.post("/api/v1/storage/records?table=notes", data=blob, headers={
                "Authorization": f"Bearer {carol['access_token']}", "Content-Type": "application/octet-stream",
                "X-Checksum": hashlib.sha256(blob).hexdigest()})
            assert stored.status == 201, stored.text()
            polled: list[str] = []
            page.on("request", lambda r: polled.append(r.url) if r.url.endswith("/admin/backups/progress") else None)
            page.click("nav a:has-text('Backups')")
            expect(page.locator("td.muted")).to_have_text("No server backups yet.")
            page.click("button:has-text('Create a backup now')")
            row = page.locator("table tbody tr code", has_text=re.compile(r"^adiuva-\d{8}T\d{6}Z\.tar$"))
            expect(row).to_have_count(1, timeout=60_000)
            expect(page.locator(".notice")).to_contain_text("written.")
            name = row.inner_text()
            print(f"backup progress polled {len(polled)} time(s)")
            assert api.get("/api/v1/admin/backups").status == 401  # the API wants its token, not the cookie
            page.click("button:has-text('Verify')")
            expect(page.locator(".notice")).to_contain_text(f"{name} verified")
            page.screenshot(path=shots / "backups.png", full_page=True)

            page.click("nav a:has-text('Settings')")
            expect(page.locator("table.settings")).to_contain_text("jwt_secret")
            expect(page.locator("tr", has_text="jwt_secret").locator("td.value")).to_contain_text("(set)")
            page.screenshot(path=shots / "settings.png")

            # On a phone.
            phone = watch(browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1,
                                              storage_state=context.storage_state()).new_page(), problems)
            phone.goto(f"{server.url}/admin/users")
            expect(phone.locator("table.users")).to_contain_text("bob@example.org")
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390
            phone.screenshot(path=shots / "phone-users.png", full_page=True)

            # A non-admin, in a browser of their own, is refused.
            other = watch(browser.new_context().new_page(), problems)
            other.goto(f"{server.url}/admin")
            expect(other).to_have_url(f"{server.url}/admin/login")
            other.fill("input[name=email]", "bob@example.org")
            other.fill("input[name=password]", PASSWORD)
            with other.expect_response(f"{server.url}/admin/login") as answer:
                other.click("button[type=submit]")
            assert answer.value.status == 403
            expect(other.locator("h1")).to_have_text("Admins only")
            assert other.goto(f"{server.url}/admin/users").url == f"{server.url}/admin/login"
        finally:
            api.dispose()
            browser.close()
    # The non-admin's refusal is a 403 page, which chromium reports as a console error about the
    # resource; anything else (a CSP violation, a script error, a missing asset) is a defect.
    refusal = "console error: Failed to load resource: the server responded with a status of 403 (Forbidden)"
    assert problems == [refusal], problems
    output = "".join(server.lines)
    assert output.count(setup_url.split("token=", 1)[1]) == 1  # the banner only, never the access log
