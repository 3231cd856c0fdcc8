"""Security headers on every response the API sends."""

from __future__ import annotations

from aiohttp import web

_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}


@web.middleware
async def security_headers_middleware(request: web.Request, handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:
        response.headers.extend(_HEADERS)
        # API answers are per user: no shared cache may keep them unless a handler says so.
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def setup_security_headers(app: web.Application) -> None:
    app.middlewares.append(security_headers_middleware)
