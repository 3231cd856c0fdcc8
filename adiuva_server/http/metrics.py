"""`/metrics` in Prometheus' text format, for the homelab's Prometheus (or Grafana Agent, ...).

One registry per app (tests build many apps in one process): no module-level metrics.

- Requests are labelled by the route's canonical path (`/api/v1/storage/records/{record_id}`),
  never the raw URL: a label per distinct URL would let any client grow the server's memory and
  every scrape without bound. Unmatched URLs share one label; so do unusual methods.
- Login failures and throttles are read off the answers of the auth routes (their problem
  `code`), LLM calls and errors off the answers of the chat routes: the services stay unaware.
- Totals from the database (storage bytes, vectors, users) are read at scrape time on the
  database's worker threads and cached for a few seconds, so a scraper hammering the endpoint
  costs at most one read per interval; the backup folder is listed off the event loop too.
- Access: a bearer token (`ADIUVA_METRICS_TOKEN`), compared in constant time. Without one the
  endpoint does not exist (404, as for any unknown path).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from adiuva_server import errors
from adiuva_server.http.problem import PROBLEM_JSON
from adiuva_server.http.routing import API_PREFIX, Api, RouteSpec
from adiuva_server.keys import ADMIN, INFLIGHT, METRICS, SETTINGS
from adiuva_server.server_backup import _ARCHIVE_NAME, backup_dir

METRICS_PATH = "/metrics"
TOTALS_CACHE_SECONDS = 5.0
UNMATCHED = "unmatched"
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
# Seconds; from a cached GET (~0.1 ms) to an LLM answer (LLM_TIMEOUT, 60 s by default).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
AUTH_ROUTES = frozenset(f"{API_PREFIX}/auth/{name}" for name in ("login", "register", "refresh"))
LLM_ROUTES = frozenset((("POST", f"{API_PREFIX}/chat"), ("POST", f"{API_PREFIX}/plans/{{plan_id}}/run")))

@dataclasses.dataclass(frozen=True)
class Totals:
    users: int
    records: int
    record_bytes: int
    backups: int
    backup_bytes: int
    vectors: int
    server_backups: int
    newest_server_backup: float | None  # Unix time, from the archive's name


def _server_backups(folder) -> tuple[int, float | None]:
    """Complete archives in the server's backup folder (partial ones end in `.partial`) and the
    time the newest was taken, which its name records in UTC."""
    try:
        names = [p.name for p in folder.iterdir() if _ARCHIVE_NAME.match(p.name)]
    except FileNotFoundError:
        return 0, None
    if not names:
        return 0, None
    stamp = max(n[len("adiuva-"):len("adiuva-") + 16] for n in names)
    return len(names), dt.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC).timestamp()


class Metrics:
    """The app's registry, its request metrics, and the scrape-time collector."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adiuva_http_requests", "HTTP requests answered, by route and status",
                                ("method", "route", "status"), registry=r)
        self.latency = Histogram("adiuva_http_request_duration_seconds",
                                 "Time from the request to the handler's answer, by route",
                                 ("method", "route"), buckets=LATENCY_BUCKETS, registry=r)
        self.auth_failures = Counter("adiuva_auth_failures", "Refused sign-ins, registrations and refreshes, by problem code",
                                     ("route", "code"), registry=r)
        self.auth_throttled = Counter("adiuva_auth_throttled", "Sign-ins, registrations and refreshes answered 429",
                                      ("route",), registry=r)
        self.llm_calls = Counter("adiuva_llm_calls", "Chat and plan-run requests that reached the language model",
                                 ("route",), registry=r)
        self.llm_errors = Counter("adiuva_llm_errors", "Chat and plan-run requests the model failed (5xx), by problem code",
                                  ("route", "code"), registry=r)
        r.register(_ScrapeTimeCollector(self))
        # `labels()` validates and locks on every call; the children are cached per label set
        # (the label sets are bounded, see the module docstring).
        self._counted: dict[tuple[str, str, int], Any] = {}
        self._timed: dict[tuple[str, str], Any] = {}
        self._totals: Totals | None = None
        self._totals_at = 0.0
        self.totals_ttl = TOTALS_CACHE_SECONDS
        self._totals_lock = asyncio.Lock()

    # -- the hot path ---------------------------------------------------------------------

    def record(self, request: web.Request, status: int, seconds: float, response: web.StreamResponse | None) -> None:
        resource = request.match_info.route.resource
        if resource is None:
            route = UNMATCHED
            method = request.method if request.method in METHODS else "other"
        else:
            route, method = resource.canonical, request.method
        key = (method, route, status)
        child = self._counted.get(key)
        if child is None:
            child = self._counted[key] = self.requests.labels(method, route, str(status))
        child.inc()
        if not isinstance(response, web.WebSocketResponse):  # a socket's lifetime is no latency
            timer = self._timed.get(key[:2])
            if timer is None:
                timer = self._timed[key[:2]] = self.latency.labels(method, route)
            timer.observe(seconds)
        if route in AUTH_ROUTES:
            if status in (401, 403):
                self.auth_failures.labels(route, _problem_code(response)).inc()
            elif status == 429:
                self.auth_throttled.labels(route).inc()
        elif (method, route) in LLM_ROUTES and (status < 400 or status >= 499):
            # Answers refused before the model was asked (validation, tier, quota) are no call.
            self.llm_calls.labels(route).inc()
            if status >= 500:
                self.llm_errors.labels(route, _problem_code(response)).inc()

    # -- scrape time ----------------------------------------------------------------------

    async def totals(self) -> Totals:
        async with self._totals_lock:  # concurrent scrapes share one read
            if self._totals is None or time.monotonic() - self._totals_at >= self.totals_ttl:
                counts = dataclasses.astuple(await self.app[ADMIN].store.totals())  # one snapshot
                backups = await asyncio.to_thread(_server_backups, backup_dir(self.app[SETTINGS]))
                self._totals = Totals(*counts, *backups)
                self._totals_at = time.monotonic()
            return self._totals

    async def exposition(self) -> bytes:
        await self.totals()
        return generate_latest(self.registry)  # ~1 us a sample: cheap for our bounded labels


class _ScrapeTimeCollector(Collector):
    """Values read at scrape time: the totals fetched just before, and the in-flight count the
    graceful shutdown keeps anyway (so the hot path pays nothing for that gauge)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        app = self.metrics.app
        if INFLIGHT in app:
            yield GaugeMetricFamily("adiuva_http_requests_in_flight", "HTTP requests being handled (WebSockets not counted)",
                                    value=app[INFLIGHT].count)
        t = self.metrics._totals
        if t is None:
            return
        yield GaugeMetricFamily("adiuva_users", "Accounts", value=t.users)
        yield GaugeMetricFamily("adiuva_records", "Live encrypted records", value=t.records)
        storage = GaugeMetricFamily("adiuva_storage_bytes", "Bytes of encrypted user data stored, by kind", labels=("kind",))
        storage.add_metric(("records",), t.record_bytes)
        storage.add_metric(("backups",), t.backup_bytes)
        yield storage
        yield GaugeMetricFamily("adiuva_user_backups", "Desktop-app backups stored", value=t.backups)
        yield GaugeMetricFamily("adiuva_vectors", "Vectors stored", value=t.vectors)
        yield GaugeMetricFamily("adiuva_server_backups", "Server backup archives in <data dir>/server-backups",
                                value=t.server_backups)
        if t.newest_server_backup is not None:
            yield GaugeMetricFamily("adiuva_server_backup_age_seconds", "Age of the newest server backup archive",
                                    value=max(0.0, time.time() - t.newest_server_backup))


def _problem_code(response: web.StreamResponse | None) -> str:
    """The `code` of a problem+json answer (only error answers of a few routes get here)."""
    if isinstance(response, web.Response) and response.content_type == PROBLEM_JSON and response.body:
        try:
            code = json.loads(response.body).get("code")
        except (ValueError, AttributeError):
            code = None
        if isinstance(code, str) and code.isidentifier() and len(code) <= 64:
            return code
    return "unknown"


def _bearer_digest(value: str) -> bytes:
    # Hashing first makes the comparison independent of the lengths, too.
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


async def metrics_handler(request: web.Request) -> web.Response:
    token = request.app[SETTINGS].metrics_token
    if not token:
        raise web.HTTPNotFound()  # no token configured: no metrics, and nothing to learn
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    good = hmac.compare_digest(_bearer_digest(presented.strip()), _bearer_digest(token))
    if not (good and scheme.lower() == "bearer"):
        # The same answer for a missing and a wrong token.
        raise errors.Unauthorized("a valid metrics token is required (ADIUVA_METRICS_TOKEN)",
                                  headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
    body = await request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@dataclasses.dataclass(frozen=True)
class _RootRouteSpec(RouteSpec):
    """A documented route outside /api/v1 (Prometheus scrapes /metrics by default)."""

    @property
    def full_path(self) -> str:
        return self.path


# The route, as a feature of its own (app.FEATURES), so the OpenAPI document lists it.
api = Api("meta")
api.specs.append(_RootRouteSpec(
    "GET", METRICS_PATH, metrics_handler, "Prometheus metrics (bearer ADIUVA_METRICS_TOKEN; 404 when unset)",
    tags=("meta",), auth=False, errors=(401, 404), raw_response={CONTENT_TYPE_LATEST.split(";")[0]: "Prometheus text format"},
))


def setup_metrics(app: web.Application) -> None:
    """Add the metrics middleware. Call it first: outermost, it times everything the server
    does and sees the final status of every answer, problem+json errors included."""
    app[METRICS] = metrics = Metrics(app)
    perf_counter = time.perf_counter

    @web.middleware
    async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
        start = perf_counter()
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # redirects and the like escape the problem middleware
            metrics.record(request, exc.status, perf_counter() - start, None)
            raise
        except asyncio.CancelledError:
            metrics.record(request, 499, perf_counter() - start, None)
            raise
        metrics.record(request, response.status, perf_counter() - start, response)
        return response

    app.middlewares.append(metrics_middleware)
