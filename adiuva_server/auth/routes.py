"""HTTP routes of accounts: thin, they read the request, call the service, shape the answer."""

from __future__ import annotations

import functools

from aiohttp import web

from adiuva_server.auth.models import AuthTokens, Credentials, Me, RefreshRequest
from adiuva_server.auth.service import IssuedTokens, Principal
from adiuva_server.http.auth import principal
from adiuva_server.http.forwarded import client_address
from adiuva_server.http.routing import JSON, Api
from adiuva_server.keys import AUTH

api = Api("auth")


def _tokens(issued: IssuedTokens) -> AuthTokens:
    return AuthTokens(access_token=issued.access_token, refresh_token=issued.refresh_token, expires_in=issued.expires_in)


@api.post(
    "/auth/register", summary="Create an account and sign in", auth=False, body=Credentials,
    response=AuthTokens, status=201, errors=(403, 409, 422, 429),
)
async def register(request: web.Request, body: Credentials) -> AuthTokens:
    issued = await request.app[AUTH].register(body.email, body.password, client_address(request))
    return _tokens(issued)


@api.post(
    "/auth/login", summary="Sign in with email and password", auth=False, body=Credentials,
    response=AuthTokens, errors=(401, 403, 422, 429, 503),
)
async def login(request: web.Request, body: Credentials) -> AuthTokens:
    issued = await request.app[AUTH].login(body.email, body.password, client_address(request))
    return _tokens(issued)


@api.post(
    "/auth/refresh", summary="Exchange a refresh token for new tokens (the old one stops working)",
    auth=False, body=RefreshRequest, response=AuthTokens, errors=(401, 422, 429),
)
async def refresh(request: web.Request, body: RefreshRequest) -> AuthTokens:
    return _tokens(await request.app[AUTH].refresh(body.refresh_token, client_address(request)))


@functools.lru_cache(maxsize=4096)
def _me_json(who: Principal) -> bytes:
    return Me(id=who.id, email=who.email, tier=who.tier, created_at=who.created_at).model_dump_json().encode()


@api.get("/auth/me", summary="The signed-in account", response=Me, errors=(401, 429))
async def me(request: web.Request) -> web.Response:
    # The principal was read from the database by the auth middleware for this very request.
    # The desktop app asks this more than anything else, and the answer is a pure function of
    # the principal (its tier included), so its JSON is built once per distinct principal.
    return web.Response(body=_me_json(principal(request)), content_type=JSON)
