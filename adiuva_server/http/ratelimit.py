"""Per-user sliding-window request limits by tier (free 20, pro 60, power 120, team 200 a
minute), with X-RateLimit-* headers on every authenticated answer and Retry-After on 429.
Unauthenticated routes (health, the OpenAPI document) are not counted here; login and
register have their own throttles in the auth service."""

from __future__ import annotations

from aiohttp import web

from adiuva_server import errors
from adiuva_server.keys import PRINCIPAL, RATE_LIMITS, SETTINGS


def setup_rate_limits(app: web.Application) -> None:
    settings = app[SETTINGS]
    limits = dict(settings.rate_limits)
    window = settings.rate_window_seconds

    @web.middleware
    async def rate_limit_middleware(request: web.Request, handler) -> web.StreamResponse:
        who = request.get(PRINCIPAL)
        if who is None:
            return await handler(request)
        decision = await request.app[RATE_LIMITS].hit("user:" + who.id, limits[who.tier], window)
        headers = decision.headers()
        if not decision.allowed:
            raise errors.RateLimited(
                decision.retry_after,
                f"limit of {decision.limit} requests per minute for the {who.tier} tier reached",
                headers=headers,
            )
        try:
            response = await handler(request)
        except (errors.AdiuvaError, web.HTTPException) as exc:
            for k, v in headers.items():
                exc.headers.setdefault(k, v)
            raise
        if not response.prepared:
            response.headers.update(headers)
        return response

    app.middlewares.append(rate_limit_middleware)
