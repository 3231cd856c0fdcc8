"""HTTP routes of the vector store: thin, they read the request, call the service, shape the answer."""

from __future__ import annotations

import base64

from aiohttp import web

from adiuva_server.http.auth import principal
from adiuva_server.http.routing import Api
from adiuva_server.keys import VECTORS
from adiuva_server.vectors.models import (
    DeleteRequest,
    DeleteResponse,
    MatchOut,
    SearchRequest,
    SearchResponse,
    UpsertRequest,
    UpsertResponse,
)

api = Api("vectors")


@api.post(
    "/storage/vectors/upsert", summary="Insert or replace vectors (all or nothing)", body=UpsertRequest,
    response=UpsertResponse, errors=(400, 401, 402, 413, 422, 429),
    body_limit=lambda settings: settings.vector_max_request_bytes,
)
async def upsert(request: web.Request, body: UpsertRequest) -> UpsertResponse:
    who = principal(request)
    result = await request.app[VECTORS].upsert(who.id, who.tier, body.collection, body.metric, body.vectors)
    c = result.collection
    return UpsertResponse(collection=c.name, dimension=c.dimension, metric=c.metric,
                          inserted=result.inserted, replaced=result.replaced, count=c.count)


@api.post(
    "/storage/vectors/search", summary="The caller's nearest vectors to a query, nearest first",
    body=SearchRequest, response=SearchResponse, errors=(400, 401, 422, 429),
)
async def search(request: web.Request, body: SearchRequest) -> SearchResponse:
    matches = await request.app[VECTORS].search(principal(request).id, body.collection, body.values, body.top_k,
                                                body.values_b64)
    return SearchResponse(matches=[
        MatchOut(id=m.id, distance=m.distance, payload=base64.b64encode(m.payload).decode(), checksum=m.checksum)
        for m in matches
    ])


@api.delete(
    "/storage/vectors", summary="Delete vectors by id (unknown ids are ignored)", body=DeleteRequest,
    response=DeleteResponse, errors=(400, 401, 422, 429),
)
async def delete(request: web.Request, body: DeleteRequest) -> DeleteResponse:
    who = principal(request)
    return DeleteResponse(deleted=await request.app[VECTORS].delete(who.id, who.tier, body.collection, body.ids))
