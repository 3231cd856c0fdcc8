"""The client's address: the socket peer, or, only when that peer is a configured trusted
proxy (ADIUVA_TRUSTED_PROXIES), the right-most untrusted hop of X-Forwarded-For. Believing
X-Forwarded-For from anyone would let a password guesser pick a fresh address per request."""

from __future__ import annotations

import ipaddress

from aiohttp import web

from adiuva_server.keys import CLIENT_ADDRESS, SETTINGS


def is_trusted(addr: str, networks) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(request: web.Request) -> str:
    cached = request.get(CLIENT_ADDRESS)
    if cached is not None:
        return cached
    peer = request.remote or "unknown"
    networks = request.app[SETTINGS].trusted_proxies
    address = peer
    if networks and is_trusted(peer, networks):
        hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", ()) for h in v.split(",")]
        for hop in reversed([h for h in hops if h]):
            address = hop
            if not is_trusted(hop, networks):
                break
    request[CLIENT_ADDRESS] = address
    return address
