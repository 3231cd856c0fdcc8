"""CORS for the desktop app (origin `app://.`) and local dev front-ends (CORS_ORIGINS)."""

from __future__ import annotations

from aiohttp import web

from adiuva_server.http.problem import problem_response
from adiuva_server.keys import SETTINGS

ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
ALLOW_HEADERS = (
    "Authorization, Content-Type, Content-Encoding, X-Checksum, If-Match, If-None-Match, If-Modified-Since, "
    "Range, If-Range, X-Backup-Version, X-Backup-Timestamp, X-Backup-Checksum"
)
EXPOSE_HEADERS = (
    "ETag, X-Checksum, Last-Modified, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining, "
    "X-RateLimit-Reset, X-Backup-Version, X-Backup-Timestamp, X-Backup-Checksum, Location"
)


def setup_cors(app: web.Application) -> None:
    origins = frozenset(app[SETTINGS].cors_origins)
    any_origin = "*" in origins

    @web.middleware
    async def cors_middleware(request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and (any_origin or origin in origins)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not allowed:
                return problem_response(403, "origin_not_allowed", "Origin not allowed",
                                        f"origin {origin!r} is not in CORS_ORIGINS")
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Access-Control-Allow-Methods": ALLOW_METHODS,
                    "Access-Control-Allow-Headers": ALLOW_HEADERS,
                    "Access-Control-Max-Age": "600",
                    "Vary": "Origin",
                },
            )
        response = await handler(request)
        if allowed and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
            response.headers.add("Vary", "Origin")
        return response

    app.middlewares.append(cors_middleware)
