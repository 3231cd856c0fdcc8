"""Bearer authentication for every route declared with `auth=True` (the default)."""

from __future__ import annotations

from aiohttp import web

from adiuva_server.http.routing import route_spec
from adiuva_server.keys import AUTH, PRINCIPAL


def principal(request: web.Request):
    """The authenticated caller of this request (set by the auth middleware)."""
    return request[PRINCIPAL]


def setup_auth(app: web.Application) -> None:
    @web.middleware
    async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
        spec = route_spec(request)
        if spec is not None and spec.auth:
            # A cached token check and the account's live state (on SQLite one primary-key read
            # on the loop, ~10 us, never a thread hand-off): the tier and the account state
            # come from the database on every request.
            request[PRINCIPAL] = await request.app[AUTH].authenticate(request.headers.get("Authorization"))
        return await handler(request)

    app.middlewares.append(auth_middleware)
