"""Routes about the server itself: health and the OpenAPI document."""

from __future__ import annotations

import json

from aiohttp import web

from adiuva_server import __version__
from adiuva_server.auth.models import Health
from adiuva_server.http.openapi import build_openapi
from adiuva_server.http.routing import Api
from adiuva_server.keys import ROUTES

api = Api("meta")
_HEALTH = Health(version=__version__).model_dump_json().encode()


@api.get("/health", summary="Liveness and version", auth=False, response=Health)
async def health(request: web.Request) -> web.Response:
    return web.Response(body=_HEALTH, content_type="application/json")


_OPENAPI_DOC = web.AppKey("openapi_doc", bytes)


@api.cleanup_ctx
async def _build_openapi(app: web.Application):
    # Every feature has added its routes by now; the document is built once.
    app[_OPENAPI_DOC] = json.dumps(build_openapi(app[ROUTES])).encode()
    yield


@api.get("/openapi.json", summary="This API's OpenAPI 3.1 document", auth=False)
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_OPENAPI_DOC], content_type="application/json")
