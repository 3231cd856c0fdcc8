"""The connection layer under the app: what a client gets before the app sees a request.

- Timeouts: aiohttp's keep-alive timer starts when a connection opens and again after each
  answer, and data that does not complete a request head does not reset it; so it bounds both
  an idle keep-alive connection and a client that never finishes its request line or headers
  (slowloris) with one number, `ADIUVA_HEADER_TIMEOUT`. Bodies: `http.bodies`.
- No reading on after an early answer (413, 415, 401 on an upload): aiohttp went on reading,
  and inflating, the rest of the body for 10 s on the event loop. Now http.bodies stops the
  connection parsing; what still arrives is dropped for at most LINGER_SECONDS (so the client
  reads the answer rather than a reset), then the connection closes.
- Caps on open connections, in all and per client address, so a few hundred slow clients cannot
  exhaust the descriptors the database and uploads need (`adiuva serve` raises RLIMIT_NOFILE
  to its hard limit and keeps the total cap below it).
- Requests aiohttp's own parser refuses (a bad request line, a header over 8 KiB, an encoding it
  cannot decode such as `br`) are answered with problem+json too, and no response names the
  versions of Python or aiohttp in `Server`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from adiuva_server.config import Settings
from adiuva_server.http.accesslog import AccessLogger
from adiuva_server.http.forwarded import is_trusted
from adiuva_server.http.headers import SERVER_HEADER
from adiuva_server.http.problem import problem_response
from adiuva_server.keys import SETTINGS

log = logging.getLogger(__name__)
DESCRIPTORS_RESERVED = 256  # for the database, uploads, backups and logs
REFUSAL_LOG_SECONDS = 60.0
LINGER_SECONDS = 2.0


def handler_args(settings: Settings) -> dict[str, Any]:
    """aiohttp's per-connection settings (`web.Application(handler_args=...)`), so tests and
    `adiuva serve` run connections alike. Only names RequestHandler takes: aiohttp drops every
    custom setting, with a warning, when one is unknown."""
    return {
        "keepalive_timeout": settings.header_timeout,
        # After an early answer aiohttp waits this long for the rest of the body before closing,
        # so the client reads the answer rather than a reset; http.bodies stops it parsing (and
        # inflating) what arrives meanwhile.
        "lingering_time": LINGER_SECONDS,
        "access_log_class": AccessLogger,
    }


class Protocol(RequestHandler):
    """aiohttp's connection, answering the requests its parser refuses with problem+json."""

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
        plain = super().handle_error(request, status, exc, message)  # logs; raises if the answer has begun
        if isinstance(exc, ContentEncodingError):
            resp = problem_response(415, "unsupported_content_encoding", "Unsupported Content-Encoding",
                                    "request bodies may be sent with Content-Encoding gzip or deflate only")
        elif status < 500 and isinstance(exc, HttpProcessingError):
            detail = " ".join(str(exc.message or "").split())[:200] or "the request is not valid HTTP"
            resp = problem_response(status, "malformed_request", "Malformed request", f"invalid HTTP request: {detail}")
        else:
            resp = problem_response(plain.status, "internal_error" if plain.status >= 500 else f"http_{plain.status}",
                                    plain.reason or "Error", "the request could not be handled; see the server log")
        resp.headers["Server"] = SERVER_HEADER  # this answer bypasses the app's response hooks
        resp.force_close()
        return resp


class ConnectionCaps:
    """Open connections, in all and per client address; a connection past a cap is closed at
    once. Trusted proxies carry many clients: only the total cap applies to them."""

    def __init__(self, total: int, per_address: int, trusted_proxies=()) -> None:
        self.total, self.per_address, self.trusted = total, per_address, trusted_proxies
        self.open: dict[object, str] = {}
        self.by_address: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self._logged = 0.0

    def admit(self, handler: object, transport) -> bool:
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) else "local"
        if len(self.open) >= self.total:
            return self._refuse(address, f"{len(self.open)} connections open (ADIUVA_MAX_CONNECTIONS)")
        if self.by_address[address] >= self.per_address and not is_trusted(address, self.trusted):
            return self._refuse(address, f"{self.by_address[address]} connections open from it "
                                         "(ADIUVA_MAX_CONNECTIONS_PER_ADDRESS)")
        self.open[handler] = address
        self.by_address[address] += 1
        return True

    def release(self, handler: object) -> None:
        address = self.open.pop(handler, None)
        if address is not None:
            self.by_address[address] -= 1
            if not self.by_address[address]:
                del self.by_address[address]

    def _refuse(self, address: str, why: str) -> bool:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged >= REFUSAL_LOG_SECONDS:  # one line a minute, not one per attempt
            self._logged = now
            log.warning("refusing connections: %s from %s; %d refused so far", why, address, self.refused)
        return False


class Server(web.Server):
    """aiohttp's server, making `Protocol` connections under `ConnectionCaps`."""

    caps: ConnectionCaps

    def __call__(self) -> RequestHandler:
        return Protocol(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport) -> None:
        super().connection_made(handler, transport)
        if not self.caps.admit(handler, transport):
            # Soon, not now: the connection's task must start before it learns it is lost.
            # abort(), not close(): the descriptor is freed at once.
            asyncio.get_running_loop().call_soon(transport.abort)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.caps.release(handler)
        super().connection_lost(handler, exc)


class Runner(web.AppRunner):
    """`web.AppRunner` serving through `Server`. `adiuva serve` and the tests both use it."""

    def __init__(self, app: web.Application, *, max_connections: int | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # the app's own factory: handler_args, loop, startup
        settings = self.app[SETTINGS]
        # aiohttp builds its Server class by name; ours adds no state but the caps.
        server.__class__ = Server
        server.caps = ConnectionCaps(self._max_connections or settings.max_connections,
                                     settings.max_connections_per_address, settings.trusted_proxies)
        return server


def raise_open_files_limit(wanted_connections: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to its hard limit (a common soft default is 1024) and return
    (connections allowed, the limit): at most the limit minus descriptors kept for other work."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return wanted_connections, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted_connections, 0
    return max(16, min(wanted_connections, soft - DESCRIPTORS_RESERVED)), soft
