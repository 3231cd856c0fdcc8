"""LAN discovery: `adiuva serve` announces itself by mDNS/DNS-SD as `_adiuva._tcp.local.`, so
the desktop app can list the servers in the house instead of asking for a URL.

TXT: `version` (the server's), `scheme` (`http`/`https`), `path` (the API's base path) and, with
TLS, `fp`: the certificate's SHA-256 fingerprint, the one the banner prints for pinning. The
announcement is a hint, never a trust anchor: anyone on the LAN can announce anything, so the
app must still check the fingerprint (or the CA) when it connects.

Announcing runs in the background once the server listens and never holds up start or stop
(each bounded); a failure to announce is logged as a warning and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Callable

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from adiuva_server import __version__
from adiuva_server.config import Settings
from adiuva_server.http.routing import API_PREFIX

log = logging.getLogger(__name__)

SERVICE_TYPE = "_adiuva._tcp.local."
# Probing and the first announcements take ~1.5 s (RFC 6762); a stuck network gets this long.
REGISTER_TIMEOUT = 10.0
# The goodbye packets at stop: a server that cannot send them is forgotten at the records' TTL.
STOP_TIMEOUT = 2.0


def txt_record(scheme: str, fingerprint: str | None) -> dict[str, str]:
    txt = {"version": __version__, "scheme": scheme, "path": API_PREFIX}
    if fingerprint:
        txt["fp"] = fingerprint
    return txt


def announce_addresses(settings: Settings, lan_addresses: Callable[[], list[str]]) -> list[str]:
    """The explicit setting; else the address the server listens on; for a wildcard listen
    address, the LAN addresses the banner prints (IPv4 only for 0.0.0.0, as the banner)."""
    if settings.mdns_interfaces:
        return list(settings.mdns_interfaces)
    if settings.host in ("0.0.0.0", "::", ""):
        return [a for a in lan_addresses() if settings.host == "::" or ":" not in a]
    try:
        return [str(ipaddress.ip_address(settings.host))]
    except ValueError:  # a host name: resolving it could block; the admin can say where
        return []


def _label(text: str) -> str:
    """A DNS label from the host name (the instance name may hold spaces, the host must not)."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")[:40] or "server"


class Announcer:
    """`start()` returns at once and announces in the background; `stop()` withdraws the
    announcement (goodbye packets), bounded by STOP_TIMEOUT."""

    def __init__(self, settings: Settings, port: int, txt: dict[str, str],
                 lan_addresses: Callable[[], list[str]], hostname: str | None = None) -> None:
        self.settings, self.port, self.txt, self.lan_addresses = settings, port, txt, lan_addresses
        self.host = (hostname or socket.gethostname()).split(".")[0]
        self.instance = f"Adiuva on {self.host}"[:63]
        self.info: AsyncServiceInfo | None = None
        self._zc: AsyncZeroconf | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._register())

    async def _register(self) -> None:
        # lan_addresses() may resolve the host name (getaddrinfo): not on the event loop.
        addresses = await asyncio.to_thread(announce_addresses, self.settings, self.lan_addresses)
        if not addresses:
            log.warning("LAN discovery (mDNS): no address to announce %s on; set ADIUVA_MDNS_INTERFACES",
                        self.settings.host)
            return
        try:
            versions = {ipaddress.ip_address(a).version for a in addresses}
            ip_version = IPVersion.V4Only if versions == {4} else IPVersion.V6Only if versions == {6} else IPVersion.All
            self.info = AsyncServiceInfo(
                SERVICE_TYPE, f"{self.instance}.{SERVICE_TYPE}", port=self.port, properties=self.txt,
                parsed_addresses=addresses,
                # Our own host record: answering for the box's `<host>.local.` with only some of
                # its addresses would make other hosts flush the rest (the OS's responder owns it).
                server=f"adiuva-{_label(self.host)}.local.",
            )
            self._zc = AsyncZeroconf(interfaces=addresses, ip_version=ip_version)
            registered = await self._zc.async_register_service(self.info, allow_name_change=True)
            await asyncio.wait_for(registered, REGISTER_TIMEOUT)
            log.info("announced on the LAN (mDNS) as %r on %s", self.info.name.removesuffix("." + SERVICE_TYPE),
                     ", ".join(addresses))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the server serves on: discovery is a convenience
            log.warning("LAN discovery (mDNS) failed on %s: %s; the desktop app needs the URL typed in "
                        "(ADIUVA_MDNS_INTERFACES picks the addresses, ADIUVA_MDNS=off stops trying)",
                        ", ".join(addresses), exc or type(exc).__name__)
            await self._close()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._close()

    async def _close(self) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:  # unregisters (goodbye packets) and closes the sockets
            await asyncio.wait_for(zc.async_close(), STOP_TIMEOUT)
        except Exception as exc:
            log.warning("LAN discovery (mDNS) did not stop cleanly: %s", exc or type(exc).__name__)
            with contextlib.suppress(Exception):
                zc.zeroconf.close()


class _Off:
    async def stop(self) -> None:
        pass


def start(settings: Settings, port: int, scheme: str, fingerprint: str | None,
          lan_addresses: Callable[[], list[str]]) -> Announcer | _Off:
    """Start announcing in the background (unless ADIUVA_MDNS=off); `await x.stop()` at stop."""
    if not settings.mdns:
        return _Off()
    announcer = Announcer(settings, port, txt_record(scheme, fingerprint), lan_addresses)
    announcer.start()
    return announcer
