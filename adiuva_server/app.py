"""The application factory. Tests call it too; nothing here runs at import."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from adiuva_server import meta
from adiuva_server.admin import routes as admin_routes
from adiuva_server.auth import routes as auth_routes
from adiuva_server.auth.passwords import PasswordHasher
from adiuva_server.auth.service import AuthService
from adiuva_server.auth.store import SQLiteAccountStore
from adiuva_server.chat import routes as chat_routes
from adiuva_server.config import Settings, ensure_data_dir
from adiuva_server.console import setup_console
from adiuva_server.db import Database
from adiuva_server.http.auth import setup_auth
from adiuva_server.http.bodies import setup_bodies
from adiuva_server.http.cors import setup_cors
from adiuva_server.http.headers import setup_security_headers
from adiuva_server.http.inflight import setup_inflight
from adiuva_server.http.metrics import api as metrics_api, setup_metrics
from adiuva_server.http.problem import setup_problems
from adiuva_server.http.protocol import handler_args
from adiuva_server.http.ratelimit import setup_rate_limits
from adiuva_server.marketplace import routes as marketplace_routes
from adiuva_server.keys import AUTH, DB, HASHER, RATE_LIMITS, ROUTES, SETTINGS
from adiuva_server.ratelimit import MemoryRateLimitStore
from adiuva_server.server_backup import scheduled_backups
from adiuva_server.vectors import routes as vector_routes
from adiuva_server.storage import routes as storage_routes

log = logging.getLogger(__name__)

# JSON bodies are small; record and backup uploads stream from request.content with their own
# limits (client_max_size does not bound streaming reads).
JSON_BODY_LIMIT = 1024 * 1024
HOUSEKEEPING_SECONDS = 60.0

# Each feature: its routes (an `Api`) and, optionally, a `setup(app)` for its own services.
FEATURES = (meta.api, auth_routes.api, storage_routes.api, vector_routes.api, chat_routes.api, chat_routes.plans_api,
            admin_routes.api, metrics_api, marketplace_routes.api, marketplace_routes.admin_api)


def create_app(settings: Settings) -> web.Application:
    settings = ensure_data_dir(settings)
    # handler_args: aiohttp's per-connection settings (timeouts, no lingering, the access log),
    # on the app so that tests and `adiuva serve` run connections alike.
    app = web.Application(client_max_size=JSON_BODY_LIMIT, handler_args=handler_args(settings))
    app[SETTINGS] = settings
    app[ROUTES] = []
    # Middleware order, outermost first: in-flight tracking (for graceful shutdown), CORS (so
    # errors carry CORS headers too), security headers, request bodies (encodings refused before
    # a byte is read, a body timeout, no reading on after an early answer), problem+json for
    # every error, authentication, per-user rate limits.
    # Metrics go first of all (outermost): they time everything and see every final status.
    setup_metrics(app)
    setup_inflight(app)
    setup_cors(app)
    setup_security_headers(app)
    setup_bodies(app)
    setup_problems(app)
    setup_auth(app)
    setup_rate_limits(app)
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_services)
    app.cleanup_ctx.append(scheduled_backups)
    for feature in FEATURES:
        feature.setup(app)
    setup_console(app)  # the /admin pages (after the admin feature: they use its AdminService)
    return app


async def _database(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[DB] = await Database.open(settings.db_path, synchronous=settings.sqlite_synchronous, watch_commits=True)
    try:
        yield
    finally:
        await app[DB].close()


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[HASHER] = PasswordHasher(settings)
    app[RATE_LIMITS] = MemoryRateLimitStore()
    app[AUTH] = AuthService(settings, SQLiteAccountStore(app[DB]), app[HASHER], app[RATE_LIMITS])
    task = asyncio.create_task(_housekeeping(app))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        app[HASHER].close()


async def _housekeeping(app: web.Application) -> None:
    """Forget idle rate-limit windows every minute; drop expired refresh tokens."""
    while True:
        try:
            await app[RATE_LIMITS].sweep()
            purged = await app[AUTH].store.purge_expired_sessions(int(time.time()))
            if purged:
                log.debug("purged %d expired refresh tokens", purged)
        except Exception:
            log.exception("housekeeping failed; will retry")
        await asyncio.sleep(HOUSEKEEPING_SECONDS)
