"""The application factory. Tests call it too; nothing here runs at import."""

from __future__ import annotations

import logging

from aiohttp import web

from adiuva_server import compose, meta
from adiuva_server.admin import routes as admin_routes
from adiuva_server.auth import routes as auth_routes
from adiuva_server.billing import routes as billing_routes
from adiuva_server.chat import routes as chat_routes
from adiuva_server.config import Settings, ensure_data_dir
from adiuva_server.console import setup_console
from adiuva_server.http.auth import setup_auth
from adiuva_server.http.bodies import setup_bodies
from adiuva_server.http.cors import setup_cors
from adiuva_server.http.headers import setup_security_headers
from adiuva_server.http.inflight import setup_inflight
from adiuva_server.http.metrics import api as metrics_api, setup_metrics
from adiuva_server.http.problem import setup_problems
from adiuva_server.http.protocol import handler_args
from adiuva_server.keys import ROUTES, SETTINGS
from adiuva_server.http.ratelimit import setup_rate_limits
from adiuva_server.vectors import routes as vector_routes
from adiuva_server.storage import routes as storage_routes

log = logging.getLogger(__name__)

# JSON bodies are small; record and backup uploads stream from request.content with their own
# limits (client_max_size does not bound streaming reads).
JSON_BODY_LIMIT = 1024 * 1024

# Each feature: its routes (an `Api`) and, optionally, a `setup(app)` for its own services.
FEATURES = (meta.api, auth_routes.api, storage_routes.api, vector_routes.api, chat_routes.api, chat_routes.plans_api,
            admin_routes.api, metrics_api, billing_routes.api)


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
    # Every backend, store, service and background job, built in one place (compose.py).
    app.cleanup_ctx.append(compose.services)
    for feature in FEATURES:
        feature.setup(app)
    setup_console(app)  # the /admin pages (after the admin feature: they use its AdminService)
    return app
