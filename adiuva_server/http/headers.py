"""Security headers on every response the API sends.

The API answers JSON and opaque bytes, never HTML: `nosniff` keeps a browser from treating
either as a page (frame and script policies would guard pages this server never serves), and
`no-store` keeps per-user answers out of shared caches unless a handler says otherwise.
"""

from __future__ import annotations

from aiohttp import web


@web.middleware
async def security_headers_middleware(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def setup_security_headers(app: web.Application) -> None:
    app.middlewares.append(security_headers_middleware)
