"""LAN discovery: `adiuva serve` announces `_adiuva._tcp.local.`; a zeroconf browser finds it.

Everything stays on loopback: the servers announce on 127.0.0.1 only and the browser listens
there. Linux delivers multicast on `lo` although `lo` lacks the MULTICAST flag, because zeroconf
names the interface for each socket (IP_ADD_MEMBERSHIP / IP_MULTICAST_IF with 127.0.0.1) and
the kernel loops the packets back: no change to the machine is needed.
"""

from __future__ import annotations

import asyncio
import re
import time

from zeroconf import IPVersion, ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from adiuva_server import __version__
from adiuva_server.config import Settings
from adiuva_server.discovery import SERVICE_TYPE, announce_addresses
from tests.conftest import ServerProcess

FOUND_WITHIN = 20.0  # probing takes ~1.5 s; the machine is loaded


class Browser:
    """A DNS-SD browser on loopback, as the desktop app would run one on its LAN."""

    async def __aenter__(self) -> Browser:
        self.zc = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        self.events: asyncio.Queue[tuple[str, ServiceStateChange]] = asyncio.Queue()
        self.browser = AsyncServiceBrowser(self.zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change])
        self.seen: dict[str, AsyncServiceInfo] = {}
        return self

    async def __aexit__(self, *exc) -> None:
        await self.browser.async_cancel()
        await self.zc.async_close()

    def _on_change(self, zeroconf, service_type, name, state_change) -> None:
        self.events.put_nowait((name, state_change))

    async def _next(self, deadline: float) -> tuple[str, ServiceStateChange] | None:
        try:
            return await asyncio.wait_for(self.events.get(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            return None

    async def services(self, within: float) -> dict[int, AsyncServiceInfo]:
        """Every service announced within `within` seconds, resolved, by port."""
        deadline = time.monotonic() + within
        while (event := await self._next(deadline)) is not None:
            name, change = event
            if change is ServiceStateChange.Removed:
                self.seen.pop(name, None)
                continue
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            if await info.async_request(self.zc.zeroconf, 3000):
                self.seen[name] = info
        return {info.port: info for info in self.seen.values()}

    async def find(self, port: int, within: float = FOUND_WITHIN) -> AsyncServiceInfo:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            found = await self.services(min(1.0, deadline - time.monotonic()))
            if port in found:
                return found[port]
        raise AssertionError(f"no {SERVICE_TYPE} service on port {port} found within {within} s: {sorted(self.seen)}")

    async def removed(self, name: str, within: float = FOUND_WITHIN) -> None:
        deadline = time.monotonic() + within
        while (event := await self._next(deadline)) is not None:
            if event == (name, ServiceStateChange.Removed):
                return
        raise AssertionError(f"{name} was not withdrawn within {within} s")


def txt(info: AsyncServiceInfo) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in info.properties.items() if v is not None}


def stopped_quickly(server: ServerProcess, limit: float = 15.0) -> None:
    started = time.monotonic()
    assert server.stop() == 0, "".join(server.output)
    assert time.monotonic() - started < limit


async def test_serve_announces_itself_with_its_tls_fingerprint_and_withdraws_at_stop(data_dir):
    async with Browser() as browser:
        server = ServerProcess(data_dir, ("--tls",), ADIUVA_MDNS="on")
        try:
            while "fingerprint" not in server.output[-1]:  # the rest of the banner
                server.output.append(server.proc.stdout.readline())
            pin = re.search(r"fingerprint \(pin this in the app\): ([0-9A-F:]{95})", server.output[-1]).group(1)
            info = await browser.find(server.port)
            assert txt(info) == {"version": __version__, "scheme": "https", "path": "/api/v1", "fp": pin}
            assert info.parsed_addresses() == ["127.0.0.1"]
            assert info.name.startswith("Adiuva on ") and info.server.startswith("adiuva-")
            await asyncio.to_thread(stopped_quickly, server)
            await browser.removed(info.name)
        finally:
            server.proc.kill()
            server.proc.wait()
    assert "LAN discovery" not in "".join(server.output)  # no warning


async def test_mdns_off_announces_nothing(tmp_path):
    async with Browser() as browser:
        quiet = ServerProcess(tmp_path / "quiet")  # the tests' default: ADIUVA_MDNS=off
        loud = ServerProcess(tmp_path / "loud", ADIUVA_MDNS="on")
        try:
            info = await browser.find(loud.port)  # the browser does see announcements...
            assert txt(info) == {"version": __version__, "scheme": "http", "path": "/api/v1"}
            found = await browser.services(within=3.0)
            assert quiet.port not in found  # ...but none from the server with ADIUVA_MDNS=off
        finally:
            for server in (quiet, loud):
                server.proc.kill()
                server.proc.wait()


async def test_a_failed_announcement_is_a_warning_and_the_server_serves_on(data_dir):
    import urllib.request

    # 192.0.2.77 (TEST-NET-1) is no address of this host: zeroconf cannot bind to it.
    server = ServerProcess(data_dir, ADIUVA_MDNS="on", ADIUVA_MDNS_INTERFACES="192.0.2.77")
    try:
        time.sleep(2.0)
        with urllib.request.urlopen(server.url + "/api/v1/health", timeout=10) as resp:
            assert resp.status == 200
        stopped_quickly(server)
    finally:
        server.proc.kill()
        server.proc.wait()
    output = "".join(server.output)
    assert "WARNING adiuva_server.discovery: LAN discovery (mDNS) failed on 192.0.2.77" in output, output
    assert "Traceback" not in output


def test_announced_addresses_are_the_ones_the_banner_prints(tmp_path):
    lan = lambda: ["192.168.1.20", "fd00::20"]  # noqa: E731
    settings = Settings(data_dir=tmp_path)
    assert announce_addresses(settings, lan) == ["192.168.1.20"]  # 0.0.0.0: IPv4, as the banner
    assert announce_addresses(Settings(data_dir=tmp_path, host="::"), lan) == ["192.168.1.20", "fd00::20"]
    assert announce_addresses(Settings(data_dir=tmp_path, host="127.0.0.1"), lan) == ["127.0.0.1"]
    assert announce_addresses(Settings(data_dir=tmp_path, mdns_interfaces=("10.0.0.2",)), lan) == ["10.0.0.2"]
    assert Settings.from_env({"ADIUVA_MDNS_INTERFACES": "10.0.0.2, 10.0.0.3"}).mdns_interfaces == ("10.0.0.2", "10.0.0.3")
    assert Settings.from_env({}).mdns and not Settings.from_env({"ADIUVA_MDNS": "off"}).mdns
