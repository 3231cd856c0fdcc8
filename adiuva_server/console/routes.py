"""The admin console's pages. Each handler reads the form or query, calls the AdminService (or,
for the status page, the admin API's own status function) and renders a page; every POST checks
the form's CSRF token first and answers with a redirect (or, for a one-time secret, a page).

Sessions: an opaque random id in a cookie (HttpOnly, SameSite=Strict, Secure under TLS,
Path=/admin), stored hashed in the database with the user's id and session_version; each
request re-checks that the user is still an enabled admin at that version, so a password change,
disabling or demotion ends the session at once."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import hmac
import json
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path

import pydantic
from aiohttp import web

from adiuva_server import errors
from adiuva_server.admin import routes as admin_api
from adiuva_server.admin.models import License, UserQuery
from adiuva_server.admin.store import UserWithUsage
from adiuva_server.auth.service import MAX_PASSWORD_LENGTH
from adiuva_server.auth.store import User
from adiuva_server.config import ENV_NAMES, TIERS, Settings
from adiuva_server.console.render import Asset, Safe, Templates, esc, join, load_assets
from adiuva_server.console.settings_view import setting_rows
from adiuva_server.console.store import ConsoleSession, ConsoleSessions
from adiuva_server.http.forwarded import client_address
from adiuva_server.keys import ADMIN, AUTH, CONSOLE, CONSOLE_SESSIONS, LICENSE, SETTINGS

COOKIE = "adiuva_console"
PRE_COOKIE = "adiuva_console_csrf"  # before sign-in: the CSRF token of the sign-in and setup forms
SESSION_SECONDS = 12 * 3600
PAGE_SIZE = 50
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
_MAX_COOKIE = 128
_DONE = {  # ?done=<code> after a redirect: fixed texts only, so a link cannot put words on the page
    "tier": "Tier changed.", "disabled": "Account disabled; its sessions have ended.", "enabled": "Account enabled.",
    "unlocked": "Sign-in back-off lifted.", "password": "Password changed; the account's sessions have ended.",
    "deleted": "Account deleted.", "backup": "Backup started.",
    "doctor": "Doctor run started; reload this page in a moment to see its result.",
}


@dataclasses.dataclass
class ConsoleState:
    sessions: ConsoleSessions
    templates: Templates
    assets: dict[str, Asset]
    setup_token: str | None = None  # while no account exists: the banner's one-time link
    fingerprint: str | None = None


@dataclasses.dataclass
class Visit:
    """Who is asking: a signed-in admin (session, user) or no one, and the CSRF token their forms carry."""
    session_id: str | None
    session: ConsoleSession | None
    user: User | None
    csrf: str
    new_pre_cookie: bool = False


def first_run_url(app: web.Application, base_url: str) -> str | None:
    """The one-time setup link for the serve banner, while no account exists."""
    token = app[CONSOLE].setup_token
    return f"{base_url}/admin/setup?token={token}" if token else None


def setup_console(app: web.Application) -> None:
    r = app.router
    r.add_get("/admin", _page(status_page))
    r.add_get("/admin/", _redirect_home)
    r.add_get("/admin/static/{name}", static)
    r.add_post("/admin/doctor", _page(run_doctor))
    r.add_get("/admin/login", _page(login_page, signed_in=False))
    r.add_post("/admin/login", _page(login, signed_in=False))
    r.add_post("/admin/logout", _page(logout))
    r.add_get("/admin/setup", _page(setup_page, signed_in=False))
    r.add_post("/admin/setup", _page(setup, signed_in=False))
    r.add_get("/admin/users", _page(users_page))
    r.add_post("/admin/users", _page(create_user))
    r.add_get("/admin/users/{user_id}", _page(user_page))
    r.add_post("/admin/users/{user_id}/tier", _page(set_tier))
    r.add_post("/admin/users/{user_id}/disabled", _page(set_disabled))
    r.add_post("/admin/users/{user_id}/unlock", _page(unlock))
    r.add_post("/admin/users/{user_id}/password", _page(set_password))
    r.add_get("/admin/users/{user_id}/delete", _page(confirm_delete))
    r.add_post("/admin/users/{user_id}/delete", _page(delete_user))
    r.add_get("/admin/backups", _page(backups_page))
    r.add_post("/admin/backups", _page(create_backup))
    r.add_get("/admin/backups/progress", _page(backup_progress))
    r.add_post("/admin/backups/{name}/verify", _page(verify_backup))
    r.add_get("/admin/backups/{name}/download", _page(download_backup))
    r.add_get("/admin/settings", _page(settings_page))
    app.cleanup_ctx.append(_console)


async def _console(app: web.Application):
    # After the admin feature's context: the AdminService exists.
    state = ConsoleState(app[CONSOLE_SESSIONS], Templates(), load_assets())
    if (await app[ADMIN].counts()).users == 0:
        state.setup_token = secrets.token_urlsafe(32)
    app[CONSOLE] = state
    yield


# -- the wrapper: session, CSRF, errors, headers --------------------------------------------------

Handler = Callable[[web.Request, Visit], Awaitable[web.StreamResponse]]


def _page(handler: Handler, *, signed_in: bool = True) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    @functools.wraps(handler)
    async def page(request: web.Request) -> web.StreamResponse:
        visit = await _visit(request)
        try:
            if signed_in and visit.session is None:
                if request.method == "GET":
                    response = _redirect("/admin/login")
                else:
                    response = _message(request, visit, "Signed out", "Sign in first; nothing was changed.",
                                        status=403, link=("/admin/login", "Sign in"))
            elif request.method == "POST" and not await _csrf_ok(request, visit):
                response = _message(request, visit, "Form refused",
                                    "This form did not carry its security token (it may be from an old page). "
                                    "Nothing was changed; reload the page and try again.", status=403)
            else:
                response = await handler(request, visit)
        except errors.AdiuvaError as exc:
            response = _message(request, visit, exc.title, exc.detail, status=exc.status, headers=exc.headers)
        if visit.new_pre_cookie:
            _set_cookie(request, response, PRE_COOKIE, visit.csrf, None)
        _secure(response)
        return response

    return page


def _secure(response: web.StreamResponse) -> None:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"  # the setup link's token must not leak
    response.headers["X-Frame-Options"] = "DENY"


async def _visit(request: web.Request) -> Visit:
    state = request.app[CONSOLE]
    session_id = request.cookies.get(COOKIE)
    if session_id and len(session_id) <= _MAX_COOKIE:
        session = await state.sessions.get(session_id, int(time.time()))
        if session is not None:
            user = await request.app[AUTH].store.auth_state(session.user_id)
            if (user is not None and user.is_admin and not user.disabled
                    and user.session_version == session.session_version):
                return Visit(session_id, session, user, session.csrf_token)
            await state.sessions.end(session_id)  # ended by a new password, disabling or demotion
    pre = request.cookies.get(PRE_COOKIE)
    if pre and 32 <= len(pre) <= _MAX_COOKIE:
        return Visit(None, None, None, pre)
    return Visit(None, None, None, secrets.token_urlsafe(32), new_pre_cookie=True)


async def _csrf_ok(request: web.Request, visit: Visit) -> bool:
    form = await request.post()
    sent = form.get("csrf")
    # Before sign-in the token must match the cookie the form's page set (a new one means none was sent).
    expected = None if visit.new_pre_cookie else visit.csrf
    return isinstance(sent, str) and expected is not None and hmac.compare_digest(sent.encode(), expected.encode())


def _set_cookie(request: web.Request, response: web.StreamResponse, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, path="/admin", httponly=True, samesite="Strict", max_age=max_age,
                        secure=request.app[SETTINGS].tls or request.secure)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


async def _redirect_home(request: web.Request) -> web.Response:
    response = _redirect("/admin")
    _secure(response)
    return response


# -- rendering -----------------------------------------------------------------------------------


def _t(request: web.Request) -> Templates:
    return request.app[CONSOLE].templates


def _asset_url(request: web.Request, name: str) -> str:
    return f"/admin/static/{name}?v={request.app[CONSOLE].assets[name].version}"


def _html(request: web.Request, visit: Visit, title: str, main: Safe, *, status: int = 200, current: str = "",
          notice: tuple[str, str] | None = None, script: bool = False, headers=None) -> web.Response:
    t = _t(request)
    nav = Safe("")
    if visit.session is not None:
        nav = t.render("nav", csrf=visit.csrf, email=visit.user.email,
                       **{f"{p}_class": "current" if p == current else "" for p in ("status", "users", "backups", "settings")})
    if notice is None and (done := _DONE.get(request.query.get("done", ""))):
        notice = ("ok", done)
    js = Safe(f'<script src="{esc(_asset_url(request, "console.js"))}" defer></script>') if script else Safe("")
    body = t.render("layout", title=title, css_url=_asset_url(request, "console.css"), script=js, nav=nav,
                    icon_url=_asset_url(request, "favicon.svg"),
                    notice=t.render("notice", kind=notice[0], text=notice[1]) if notice else Safe(""), main=main)
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8", headers=headers)


def _message(request: web.Request, visit: Visit, heading: str, text: str, *, status: int,
             link: tuple[str, str] | None = None, headers=None) -> web.Response:
    href, label = link or (("/admin", "Back to the console") if visit.session else ("/admin/login", "Sign in"))
    main = _t(request).render("message", heading=heading, text=text, link=href, link_text=label)
    return _html(request, visit, heading, main, status=status, headers=headers)


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    days, hours, mins = minutes // 1440, minutes // 60 % 24, minutes % 60
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {mins} min" if hours else f"{mins} min"


def _when(iso: str | None) -> str:
    if not iso:
        return "unknown"
    try:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def _options(values, selected: str) -> Safe:
    return join(Safe(f'<option value="{esc(v)}"{" selected" if v == selected else ""}>{esc(v)}</option>') for v in values)


async def static(request: web.Request) -> web.Response:
    asset = request.app[CONSOLE].assets.get(request.match_info["name"])
    if asset is None:
        raise web.HTTPNotFound()
    response = web.Response(body=asset.body, content_type=asset.content_type,
                            headers={"Cache-Control": "public, max-age=31536000, immutable"})
    _secure(response)
    return response


def _form_text(form, name: str, limit: int = 254) -> str:
    value = form.get(name, "")
    if not isinstance(value, str) or len(value) > limit:
        raise errors.ValidationError(f"{name}: too long or not text")
    return value


# -- sign-in, sign-out, first run -----------------------------------------------------------------


async def login_page(request: web.Request, visit: Visit, *, email: str = "", error: str | None = None,
                     status: int = 200, headers=None) -> web.Response:
    if visit.session is not None:
        return _redirect("/admin")
    if error is None and request.app[CONSOLE].setup_token:
        notice = ("ok", "This server has no account yet: open the setup link `adiuva serve` printed.")
    else:
        notice = ("error", error) if error else None
    main = _t(request).render("login", csrf=visit.csrf, email=email)
    return _html(request, visit, "Sign in", main, status=status, notice=notice, headers=headers)


async def login(request: web.Request, visit: Visit) -> web.Response:
    form = await request.post()
    email = _form_text(form, "email")
    password = _form_text(form, "password", MAX_PASSWORD_LENGTH)
    auth = request.app[AUTH]
    try:
        # The API's own login: the same argon2 check, the same throttles per address and account.
        tokens = await auth.login(email, password, client_address(request))
    except errors.RateLimited as exc:
        return await login_page(request, visit, email=email, status=429, headers=exc.headers,
                                error=f"Too many failed sign-ins; try again in {exc.headers['Retry-After']} s.")
    except (errors.InvalidCredentials, errors.AccountDisabled, errors.ServiceUnavailable) as exc:
        return await login_page(request, visit, email=email, status=exc.status, headers=exc.headers,
                                error=exc.title + ".")
    who = await auth.authenticate_token(tokens.access_token)
    user = await request.app[ADMIN].accounts.get_by_id(who.id)
    if user is None or not user.is_admin:
        return _message(request, visit, "Admins only",
                        f"{who.email} is not an admin of this server: the console is for its admins. "
                        "The Adiuva desktop app is where this account is used.", status=403,
                        link=("/admin/login", "Sign in as an admin"))
    return await _signed_in(request, user)


async def _signed_in(request: web.Request, user: User) -> web.Response:
    session_id, _ = await request.app[CONSOLE].sessions.start(user.id, user.session_version, int(time.time()),
                                                              SESSION_SECONDS)
    response = _redirect("/admin")
    _set_cookie(request, response, COOKIE, session_id, SESSION_SECONDS)
    response.del_cookie(PRE_COOKIE, path="/admin")
    return response


async def logout(request: web.Request, visit: Visit) -> web.Response:
    await request.app[CONSOLE].sessions.end(visit.session_id)
    response = _redirect("/admin/login")
    response.del_cookie(COOKIE, path="/admin")
    return response


async def _setup_open(request: web.Request, token: object) -> bool:
    """Whether `token` is the pending setup token; once any account exists there is none."""
    state = request.app[CONSOLE]
    if state.setup_token and (await request.app[ADMIN].counts()).users > 0:
        state.setup_token = None  # an account was made another way (the CLI, the API)
    expected = state.setup_token
    return (isinstance(token, str) and expected is not None
            and hmac.compare_digest(token.encode(), expected.encode()))


def _setup_closed(request: web.Request, visit: Visit) -> web.Response:
    return _message(request, visit, "Setup link not valid",
                    "This link works once, and only while the server has no account. "
                    "If the server has an admin already, sign in; else restart it for a new link.",
                    status=403, link=("/admin/login", "Sign in"))


async def setup_page(request: web.Request, visit: Visit, *, email: str = "", error: str | None = None,
                     status: int = 200) -> web.Response:
    token = request.query.get("token") if request.method == "GET" else (await request.post()).get("token")
    if not await _setup_open(request, token):
        return _setup_closed(request, visit)
    main = _t(request).render("setup", csrf=visit.csrf, token=token, email=email,
                              min_length=request.app[SETTINGS].password_min_length)
    return _html(request, visit, "First run", main, status=status, notice=("error", error) if error else None)


async def setup(request: web.Request, visit: Visit) -> web.Response:
    form = await request.post()
    if not await _setup_open(request, form.get("token")):
        return _setup_closed(request, visit)
    state = request.app[CONSOLE]
    token, state.setup_token = state.setup_token, None  # taken before any await: used once
    email = _form_text(form, "email")
    try:
        created, _ = await request.app[ADMIN].create_user(email, _form_text(form, "password", MAX_PASSWORD_LENGTH),
                                                          None, admin=True)
    except errors.AdiuvaError as exc:
        state.setup_token = token  # nothing was made: the link still works
        return await setup_page(request, visit, email=email, error=exc.detail, status=exc.status)
    return await _signed_in(request, created.user)


# -- status ---------------------------------------------------------------------------------------


async def status_page(request: web.Request, visit: Visit) -> web.Response:
    import segno

    settings: Settings = request.app[SETTINGS]
    status = await admin_api.status(request)  # exactly what GET /api/v1/admin/status answers
    backups = await request.app[ADMIN].server_backups()
    dated = [(m.created_at, p.name) for p, _, m in backups if m is not None]
    last = max(dated) if dated else None
    server_url = str(request.url.origin())
    fingerprint = await _fingerprint(request)
    connect = f"{server_url}#sha256={fingerprint}" if fingerprint else server_url
    qr = segno.make(connect, error="m").svg_data_uri(scale=4, border=2)
    b = status.backends
    main = _t(request).render(
        "status", version=status.version, uptime=_duration(status.uptime_seconds), data_dir=settings.data_dir,
        backends=f"database {b.database}, objects {b.blobs}, rate limits {b.rate_limits}",
        database_size=_bytes(status.database_bytes), license=_license_text(status.license), default_tier=status.default_tier,
        last_backup=f"{_when(last[0])} ({last[1]})" if last else "none yet",
        users=status.counts.users, records=status.counts.records, vectors=status.counts.vectors,
        storage=_bytes(status.storage_bytes), backups=_bytes(status.backup_bytes),
        llm_provider=status.llm.provider, llm_model=status.llm.model, llm_router_model=status.llm.router_model,
        llm_models=", ".join(status.llm.models), qr=qr, connect_url=connect, server_url=server_url,
        fingerprint=_t(request).render("fingerprint", fingerprint=fingerprint) if fingerprint else Safe(""),
        llm_availability=_llm_rows(request, status.llm), csrf=visit.csrf, **_doctor_parts(request, status.doctor),
    )
    return _html(request, visit, "Status", main, current="status")


def _license_text(lic: License) -> str:
    """The status page's license line: the mode and state, then what it means."""
    mode = "licensed mode" if lic.licensed else "homelab mode"
    return f"{mode} ({lic.state.replace('_', ' ')}): {lic.reason}"


def _check(request: web.Request, kind: str, state: str, text: object, detail: str | None = None) -> Safe:
    return _t(request).render("check_row", kind=kind, state=state, text=text,
                              detail=Safe(f"<br><small>{esc(detail)}</small>") if detail else Safe(""))


def _llm_rows(request: web.Request, llm) -> Safe:
    rows = [_check(request, "ok" if a.available else "fail", "available" if a.available else "not available",
                   Safe(f"<code>{esc(model)}</code>"), None if a.available else a.reason or a.cause)
            for model, a in llm.availability.items()]
    return join(rows) if rows else _check(request, "warn", "none", "no model is configured")


_LEVELS = {"ok": ("ok", "ok"), "warn": ("warn", "warning"), "FAIL": ("fail", "problem")}


def _doctor_parts(request: web.Request, doctor) -> dict[str, object]:
    run = doctor.last_run
    if run is None:
        summary: object = "Not run yet."
        findings = Safe("")
    else:
        took = f"{run.duration_seconds:.1f} s"
        summary = (f"Last run {_when(run.started_at)} (took {took}): {run.ok} ok, {run.warnings} "
                   f"warning{'s' * (run.warnings != 1)}, {run.problems} problem{'s' * (run.problems != 1)}.")
        if run.error:
            summary = f"The last run, {_when(run.started_at)}, failed: {run.error}"
        findings = join(_check(request, *_LEVELS[f.level], f"{f.area}: {f.message}") for f in run.findings)
    if doctor.interval_seconds <= 0:
        schedule = "Scheduled runs are off (ADIUVA_DOCTOR_INTERVAL=0); it runs when asked."
    elif doctor.next_run_at:
        schedule = f"Next scheduled run {_when(doctor.next_run_at)}, every {_duration(doctor.interval_seconds)}."
    else:
        schedule = f"Runs every {_duration(doctor.interval_seconds)}."
    schedule += " It checks as `adiuva doctor` does, without --fix: it changes nothing."
    running = Safe('<p class="muted" role="status">A run is in progress; reload the page to see its result.</p>'
                   if doctor.running else "")
    return {"doctor_summary": summary, "doctor_findings": findings, "doctor_schedule": schedule,
            "doctor_running": running}


async def run_doctor(request: web.Request, visit: Visit) -> web.Response:
    request.app[ADMIN].doctor.trigger()  # the same as POST /api/v1/admin/doctor
    return _redirect("/admin?done=doctor")


async def _fingerprint(request: web.Request) -> str | None:
    settings: Settings = request.app[SETTINGS]
    state = request.app[CONSOLE]
    if settings.tls and state.fingerprint is None:
        from adiuva_server import tls

        cert = settings.tls_cert or settings.data_dir / tls.CERT_FILE
        try:
            state.fingerprint = tls.fingerprint(await asyncio.to_thread(cert.read_bytes))
        except (OSError, ValueError):
            return None
    return state.fingerprint if settings.tls else None


# -- users ----------------------------------------------------------------------------------------


def _state(u: User) -> str:
    return "disabled" if u.disabled else "active"


async def users_page(request: web.Request, visit: Visit) -> web.Response:
    try:
        query = UserQuery.model_validate({"q": request.query.get("q") or None, "page": request.query.get("page", 1),
                                          "limit": PAGE_SIZE})
    except pydantic.ValidationError:
        query = UserQuery(limit=PAGE_SIZE)
    found, total = await request.app[ADMIN].list_users(query.q, query.page, query.limit)
    t = _t(request)
    rows = join(t.render("user_row", id=u.user.id, email=u.user.email, tier=u.user.tier, state=_state(u.user),
                         admin=Safe('<span class="badge">admin</span>') if u.user.is_admin else Safe(""),
                         records=u.usage.records, storage=_bytes(u.usage.storage_bytes),
                         backups=_bytes(u.usage.backup_bytes), vectors=u.usage.vectors, created=_when(u.user.created_at))
                for u in found)
    pages = []
    q = f"&q={esc(urllib.parse.quote(query.q))}" if query.q else ""
    if query.page > 1:
        pages.append(Safe(f'<a href="/admin/users?page={query.page - 1}{q}">Previous</a>'))
    if query.page * query.limit < total:
        pages.append(Safe(f'<a href="/admin/users?page={query.page + 1}{q}">Next</a>'))
    first = (query.page - 1) * query.limit
    summary = f"{first + 1}-{first + len(found)} of {total}" if found else ("No matches." if query.q else "No accounts.")
    main = t.render("users", q=query.q or "", rows=rows, summary=summary, pages=join(pages, " "), csrf=visit.csrf,
                    tier_options=_options(TIERS, request.app[LICENSE].default_tier))
    return _html(request, visit, "Users", main, current="users")


async def create_user(request: web.Request, visit: Visit) -> web.Response:
    form = await request.post()
    password = _form_text(form, "password", MAX_PASSWORD_LENGTH) or None
    created, generated = await request.app[ADMIN].create_user(
        _form_text(form, "email"), password, _form_text(form, "tier") or None, admin=form.get("admin") == "1")
    t = _t(request)
    # A page, not a redirect: a generated password is shown here once and stored nowhere.
    main = t.render("created", id=created.user.id, email=created.user.email, tier=created.user.tier,
                    password=t.render("generated_password", password=generated) if generated else Safe(""))
    return _html(request, visit, "Account created", main, status=201, current="users")


async def _user(request: web.Request) -> UserWithUsage:
    return await request.app[ADMIN].user(request.match_info["user_id"])


async def user_page(request: web.Request, visit: Visit) -> web.Response:
    found = await _user(request)
    u, usage = found.user, found.usage
    main = _t(request).render(
        "user", id=u.id, email=u.email, tier=u.tier, role="admin" if u.is_admin else "user", state=_state(u),
        created=_when(u.created_at), records=usage.records, storage=_bytes(usage.storage_bytes),
        backups=_bytes(usage.backup_bytes), vectors=usage.vectors, csrf=visit.csrf, tier_options=_options(TIERS, u.tier),
        disable_value="0" if u.disabled else "1", disable_label="Enable account" if u.disabled else "Disable account",
        disable_class="" if u.disabled else "danger", min_length=request.app[SETTINGS].password_min_length,
    )
    return _html(request, visit, u.email, main, current="users")


def _back_to_user(request: web.Request, done: str) -> web.Response:
    return _redirect(f"/admin/users/{request.match_info['user_id']}?done={done}")


async def set_tier(request: web.Request, visit: Visit) -> web.Response:
    form = await request.post()
    await request.app[ADMIN].update_user(request.match_info["user_id"], tier=_form_text(form, "tier"))
    return _back_to_user(request, "tier")


async def set_disabled(request: web.Request, visit: Visit) -> web.Response:
    disabled = (await request.post()).get("disabled") == "1"
    await request.app[ADMIN].update_user(request.match_info["user_id"], disabled=disabled)
    return _back_to_user(request, "disabled" if disabled else "enabled")


async def unlock(request: web.Request, visit: Visit) -> web.Response:
    await request.app[ADMIN].unlock(request.match_info["user_id"])
    return _back_to_user(request, "unlocked")


async def set_password(request: web.Request, visit: Visit) -> web.Response:
    form = await request.post()
    await request.app[ADMIN].update_user(request.match_info["user_id"],
                                         password=_form_text(form, "password", MAX_PASSWORD_LENGTH))
    return _back_to_user(request, "password")


async def confirm_delete(request: web.Request, visit: Visit, *, error: str | None = None) -> web.Response:
    u = (await _user(request)).user
    main = _t(request).render("confirm_delete", id=u.id, email=u.email, csrf=visit.csrf)
    return _html(request, visit, f"Delete {u.email}", main, current="users", status=422 if error else 200,
                 notice=("error", error) if error else None)


async def delete_user(request: web.Request, visit: Visit) -> web.Response:
    u = (await _user(request)).user
    if _form_text(await request.post(), "confirm").strip().lower() != u.email:
        return await confirm_delete(request, visit, error="The email typed does not match; nothing was deleted.")
    await request.app[ADMIN].delete_user(u.id)
    return _redirect("/admin/users?done=deleted")


# -- backups --------------------------------------------------------------------------------------


async def backups_page(request: web.Request, visit: Visit, *, notice: tuple[str, str] | None = None) -> web.Response:
    from adiuva_server.server_backup import backup_dir

    service = request.app[ADMIN]
    t = _t(request)
    rows = join(t.render("backup_row", name=p.name, created=_when(m.created_at if m else None), size=_bytes(size),
                         counts=", ".join(f"{v} {k}" for k, v in sorted(m.counts.items())) if m else "unreadable manifest",
                         csrf=visit.csrf)
                for p, size, m in reversed(await service.server_backups()))
    job = service.backup_job
    job_html = Safe("")
    if job is not None and not job.finished:
        percent = f"{100 * job.done_bytes // max(job.total_bytes, 1)}%"
        job_html = t.render("backup_job", running="true", state=f"Backup running: {percent}",
                            total=max(job.total_bytes, 1), done=job.done_bytes, percent=percent)
    elif job is not None and notice is None:  # the outcome of the last one started here
        notice = ("error", f"The last backup failed: {job.error}") if job.error else ("ok", f"Backup {job.name} written.")
    main = t.render("backups", folder=backup_dir(request.app[SETTINGS]), job=job_html, csrf=visit.csrf,
                    rows=rows or Safe('<tr><td colspan="5" class="muted">No server backups yet.</td></tr>'))
    return _html(request, visit, "Backups", main, current="backups", notice=notice, script=True)


async def create_backup(request: web.Request, visit: Visit) -> web.Response:
    request.app[ADMIN].start_server_backup()
    return _redirect("/admin/backups?done=backup")


async def backup_progress(request: web.Request, visit: Visit) -> web.Response:
    job = request.app[ADMIN].backup_job
    body = dataclasses.asdict(job) if job is not None else {"finished": True}
    return web.Response(text=json.dumps(body), content_type="application/json")


async def verify_backup(request: web.Request, visit: Visit) -> web.Response:
    from adiuva_server.server_backup import BackupError

    name = request.match_info["name"]
    try:
        manifest = await request.app[ADMIN].verify_server_backup(name)
    except BackupError as exc:
        return await backups_page(request, visit, notice=("error", exc.detail))
    return await backups_page(request, visit, notice=(
        "ok", f"{name} verified: {len(manifest.files)} files hash right and the database passes its integrity check."))


async def download_backup(request: web.Request, visit: Visit) -> web.StreamResponse:
    path: Path = await request.app[ADMIN].server_backup_path(request.match_info["name"])
    return web.FileResponse(path, headers={"Content-Type": "application/x-tar",
                                           "Content-Disposition": f'attachment; filename="{path.name}"'})


# -- settings -------------------------------------------------------------------------------------


async def settings_page(request: web.Request, visit: Visit) -> web.Response:
    t = _t(request)
    rows = join(t.render("setting_row", name=name, value=value, source=source, variables=", ".join(ENV_NAMES.get(name, ())))
                for name, value, source in setting_rows(request.app[SETTINGS]))
    return _html(request, visit, "Settings", _t(request).render("settings", rows=rows), current="settings")
