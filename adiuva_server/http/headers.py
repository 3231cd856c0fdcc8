"""Security headers on every response the API sends.

The API answers JSON and opaque bytes, never HTML: `nosniff` keeps a browser from treating
either as a page (frame and script policies would guard pages this server never serves), and
`no-store` keeps per-user answers out of shared caches unless a handler says otherwise.
`Server` names no versions (aiohttp's default names Python's and its own).
"""

from __future__ import annotations

from aiohttp import web

SERVER_HEADER = "adiuva"


@web.middleware
async def security_headers_middleware(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers.setdefault("Cache-Control", "no-store")
    return response


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # A response hook, not the middleware: it sees streamed, file and WebSocket answers too.
    response.headers["Server"] = SERVER_HEADER


def setup_security_headers(app: web.Application) -> None:
    app.middlewares.append(security_headers_middleware)
    app.on_response_prepare.append(_server_header)
