"""Every object shared on the aiohttp app, declared in one place as typed keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from adiuva_server.admin.service import AdminService
    from adiuva_server.auth.passwords import PasswordHasher
    from adiuva_server.auth.service import AuthService
    from adiuva_server.billing.service import BillingService
    from adiuva_server.chat.orchestrator import Orchestrator
    from adiuva_server.cluster import Shared
    from adiuva_server.config import Settings
    from adiuva_server.console.routes import ConsoleState
    from adiuva_server.console.store import ConsoleSessions
    from adiuva_server.db import Database
    from adiuva_server.db.postgres import PgDatabase
    from adiuva_server.http.metrics import Metrics
    from adiuva_server.http.routing import RouteSpec
    from adiuva_server.marketplace.service import MarketplaceService
    from adiuva_server.jobs import Jobs
    from adiuva_server.ratelimit import RateLimitStore
    from adiuva_server.vectors.service import VectorService
    from adiuva_server.clock import Clock
    from adiuva_server.license.state import LicenseState
    from adiuva_server.storage.service import StorageService

SETTINGS = web.AppKey("settings", "Settings")
DB = web.AppKey("db", "Database")
# DATABASE_URL=postgresql://...: the pool the PostgreSQL stores share (absent on SQLite).
PG = web.AppKey("pg", "PgDatabase")
HASHER = web.AppKey("hasher", "PasswordHasher")
AUTH = web.AppKey("auth", "AuthService")
RATE_LIMITS = web.AppKey("rate_limits", "RateLimitStore")
ROUTES = web.AppKey("routes", "list[RouteSpec]")
VECTORS = web.AppKey("vectors", "VectorService")
STORAGE = web.AppKey("storage", "StorageService")
CHAT = web.AppKey("chat", "Orchestrator")
ADMIN = web.AppKey("admin", "AdminService")
CONSOLE = web.AppKey("console", "ConsoleState")
MARKETPLACE = web.AppKey("marketplace", "MarketplaceService")
BILLING = web.AppKey("billing", "BillingService")
# The server's clock (tests put a movable one here before start-up) and the license's live state.
CLOCK = web.AppKey("clock", "Clock")
LICENSE = web.AppKey("license", "LicenseState")
CONSOLE_SESSIONS = web.AppKey("console_sessions", "ConsoleSessions")
JOBS = web.AppKey("jobs", "Jobs")
# What several server processes share (in process, or Redis): rate limits, socket slots, plans,
# job leases, change notices.
SHARED = web.AppKey("shared", "Shared")

INFLIGHT = web.AppKey("inflight", object)
METRICS = web.AppKey("metrics", "Metrics")

# Per-request storage.
PRINCIPAL = web.RequestKey("principal", object)
CLIENT_ADDRESS = web.RequestKey("client_address", str)
