"""`adiuva serve`: run the server in the foreground."""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import signal
import socket
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from adiuva_server import __version__, discovery, tls
from adiuva_server.app import create_app
from adiuva_server.chat.status import announce_llm
from adiuva_server.config import Settings
from adiuva_server.console.routes import first_run_url
from adiuva_server.http.accesslog import EscapingFormatter
from adiuva_server.http.protocol import Runner, raise_open_files_limit
from adiuva_server.keys import INFLIGHT, SETTINGS
from adiuva_server.server_backup import hold_server_lock, remove_leftovers

log = logging.getLogger("adiuva")
CLOSE_GRACE_SECONDS = 2.0


class MalformedRequestsInOneLine(logging.Filter):
    """aiohttp logs every request it cannot parse (a bad request line, a header over 8 KiB, a
    body that does not decode) at ERROR with a traceback. That is the client's fault, and a way
    to flood the log: one INFO line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (HttpProcessingError, RequestPayloadError)):
            return True
        record.msg, record.args = f"{record.getMessage()}: {str(exc).strip()}".replace("\n", " "), None
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def lan_addresses() -> list[str]:
    """This host's non-loopback IP addresses, best guess first (no packet is sent)."""
    found: list[str] = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))  # UDP connect only picks the outgoing interface
                found.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.append(info[4][0])
    except OSError:
        pass
    result = []
    for addr in found:
        try:
            ip = ipaddress.ip_address(addr.split("%", 1)[0])
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified) and str(ip) not in result:
            result.append(str(ip))
    return result


def urls(host: str, port: int, scheme: str = "http") -> list[str]:
    def fmt(addr: str) -> str:
        return f"{scheme}://[{addr}]:{port}" if ":" in addr else f"{scheme}://{addr}:{port}"

    if host in ("0.0.0.0", "::", ""):
        wildcard_v6 = host == "::"
        addrs = [a for a in lan_addresses() if wildcard_v6 or ":" not in a]
        return [fmt(a) for a in addrs] + [fmt("127.0.0.1")]
    return [fmt(host)]


def new_accounts_line(settings: Settings) -> str:
    """Which tier new accounts get, and how to change that (a free account stores nothing)."""
    mode = "licensed mode" if settings.licensed else "homelab mode"
    return (f"  New accounts get the {settings.default_tier} tier ({mode}; ADIUVA_DEFAULT_TIER changes it, "
            "`adiuva user set-tier EMAIL TIER` changes one account).")


def run(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Control characters a client sent (a path with %0a) are escaped in every record.
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler])
    logging.getLogger("aiohttp.server").addFilter(MalformedRequestsInOneLine())
    asyncio.run(serve(settings))


async def serve(settings: Settings) -> None:
    """Start, announce the URLs once the socket listens, wait for SIGINT/SIGTERM, then stop
    accepting, let in-flight requests finish (up to shutdown_timeout) and close the database."""
    app = create_app(settings)
    settings = app[SETTINGS]
    ssl_context, pin = None, None
    if settings.tls:
        if settings.tls_cert and settings.tls_key:
            cert, key = settings.tls_cert, settings.tls_key
        else:
            cert, key = tls.self_signed(settings.data_dir, lan_addresses())
        ssl_context = tls.server_context(cert, key)
        pin = tls.fingerprint(cert.read_bytes())
    with hold_server_lock(settings.data_dir):
        if removed := await asyncio.to_thread(remove_leftovers, settings):
            log.info("removed %d leftover(s) of interrupted server backups", removed)
        await _run(app, settings, ssl_context, pin)


async def _run(app: web.Application, settings: Settings, ssl_context, pin: str | None) -> None:
    # aiohttp's own wait for handlers at cleanup: in-flight requests have had shutdown_timeout
    # already (below) and chat sockets are closed on shutdown, so only a short grace is left.
    # The access log, timeouts and no-lingering come with the app (handler_args); the runner adds
    # the connection caps, kept below the open-files limit.
    max_connections, nofile = raise_open_files_limit(settings.max_connections)
    if max_connections < settings.max_connections:
        log.warning("open-files limit %d: at most %d connections (ADIUVA_MAX_CONNECTIONS=%d)",
                    nofile, max_connections, settings.max_connections)
    runner = Runner(app, max_connections=max_connections, shutdown_timeout=CLOSE_GRACE_SECONDS)
    await runner.setup()
    # What start-up made (modules, settings, caches) lives as long as the process: out of the
    # collector's sight, so a full collection no longer walks it (57 ms pauses measured under
    # bulk sync before).
    gc.freeze()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        port = settings.port or runner.addresses[0][1]
        lines = [f"Adiuva server {__version__} is running.", f"  data dir: {settings.data_dir}",
                 "  Point the Adiuva desktop app at:"]
        lines += [f"    {u}" for u in urls(settings.host, port, "https" if ssl_context else "http")]
        if pin:
            lines.append(f"  TLS certificate SHA-256 fingerprint (pin this in the app): {pin}")
        if settings.signups_open:
            lines.append("  Sign-ups are open (ADIUVA_SIGNUPS=closed stops them); the first account is the admin.")
        lines.append(new_accounts_line(settings))
        # The admin console's first run: a one-time link, printed here only (never logged).
        if setup_url := first_run_url(app, urls(settings.host, port, "https" if ssl_context else "http")[0]):
            lines.append(f"  No account yet: create the admin account at {setup_url}")
        print("\n".join(lines), flush=True)
        # Chat: the LLM's provider and model now; whether it is reachable and pulled once checked.
        announce_llm(app)
        # LAN discovery (mDNS): announced in the background, withdrawn first thing at stop.
        announcer = discovery.start(settings, port, "https" if ssl_context else "http", pin, lan_addresses)
        try:
            await stop.wait()
        finally:
            await announcer.stop()
        log.info("shutting down: no new connections; letting requests in flight finish")
        app[INFLIGHT].draining = True
        for running in list(runner.sites):
            await running.stop()
        if not await app[INFLIGHT].wait_idle(settings.shutdown_timeout):
            log.warning("%d request(s) still running after %.0f s; cutting them off",
                        app[INFLIGHT].count, settings.shutdown_timeout)
    finally:
        await runner.cleanup()
    log.info("stopped cleanly")
