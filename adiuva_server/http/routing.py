"""Routes declared with their models: the same pydantic classes validate requests, shape
responses and generate the OpenAPI document, so the document cannot drift from the code."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pydantic
from aiohttp import web

from adiuva_server import errors
from adiuva_server.http.bodies import read_body
from adiuva_server.keys import ROUTES, SETTINGS

JSON = "application/json"
OFFLOAD_JSON_BYTES = 64 * 1024
API_PREFIX = "/api/v1"


@dataclass(frozen=True)
class RouteSpec:
    method: str
    path: str  # relative to /api/v1
    handler: Callable[..., Awaitable[Any]]
    summary: str
    tags: tuple[str, ...] = ()
    auth: bool = True
    body: type[pydantic.BaseModel] | None = None
    query: type[pydantic.BaseModel] | None = None
    response: type[pydantic.BaseModel] | None = None
    status: int = 200
    errors: tuple[int, ...] = ()
    # For routes whose body or response is not JSON: {content type: description}.
    raw_body: dict[str, str] = field(default_factory=dict)
    raw_response: dict[str, str] = field(default_factory=dict)
    response_headers: dict[str, str] = field(default_factory=dict)
    request_headers: dict[str, str] = field(default_factory=dict)
    required_headers: tuple[str, ...] = ()  # of request_headers: a 422 without them
    # A JSON body larger than the app-wide limit: settings -> bytes (e.g. vector upserts).
    body_limit: Callable[[Any], int] | None = None
    # False: `body` (and `body_limit`) only document the request; the handler reads and
    # validates it itself (its own bounded, streaming-safe read).
    read_body: bool = True

    @property
    def full_path(self) -> str:
        return API_PREFIX + self.path


class Api:
    """The routes of one feature. `api.post("/auth/login", body=..., response=...)` decorates
    a handler `async def h(request, body) -> Model`; `api.setup(app)` adds them."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.specs: list[RouteSpec] = []
        self._contexts: list[Callable] = []
        self._on_shutdown: list[Callable] = []

    def cleanup_ctx(self, fn: Callable) -> Callable:
        """Register an async generator that opens this feature's services (after the database
        and the core services) and closes them at shutdown."""
        self._contexts.append(fn)
        return fn

    def on_shutdown(self, fn: Callable) -> Callable:
        """Register `async fn(app)` to run when the server stops, before it waits for handlers
        (close long-lived connections here, or the stop waits for them)."""
        self._on_shutdown.append(fn)
        return fn

    def route(self, method: str, path: str, *, summary: str, **options: Any) -> Callable:
        def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            options.setdefault("tags", (self.tag,))
            spec = RouteSpec(method, path, _wrap(fn, options), summary, **options)
            spec.handler.route_spec = spec  # type: ignore[attr-defined]
            self.specs.append(spec)
            return fn

        return decorate

    def get(self, path: str, **kw: Any) -> Callable:
        return self.route("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Callable:
        return self.route("POST", path, **kw)

    def put(self, path: str, **kw: Any) -> Callable:
        return self.route("PUT", path, **kw)

    def delete(self, path: str, **kw: Any) -> Callable:
        return self.route("DELETE", path, **kw)

    def setup(self, app: web.Application) -> None:
        for spec in self.specs:
            app.router.add_route(spec.method, spec.full_path, spec.handler)
        app[ROUTES].extend(self.specs)
        app.cleanup_ctx.extend(self._contexts)
        app.on_shutdown.extend(self._on_shutdown)


def route_spec(request: web.Request) -> RouteSpec | None:
    return getattr(request.match_info.handler, "route_spec", None)


def json_response(model: pydantic.BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type=JSON, headers=headers)


def validation_problem(exc: pydantic.ValidationError, where: str) -> errors.AdiuvaError:
    problems = exc.errors(include_url=False, include_input=False, include_context=False)
    if any(p["type"] == "json_invalid" for p in problems):
        return errors.MalformedRequest("the request body is not valid JSON")
    fields = [
        {"loc": [where, *(str(part) for part in p["loc"])], "msg": p["msg"], "type": p["type"]}
        for p in problems
    ]
    first = fields[0]
    detail = f"{'.'.join(first['loc'][1:]) or where}: {first['msg']}"
    return errors.ValidationError(detail, extra={"errors": fields})


def _wrap(fn: Callable[..., Awaitable[Any]], options: dict[str, Any]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    body_model: type[pydantic.BaseModel] | None = options.get("body") if options.get("read_body", True) else None
    query_model: type[pydantic.BaseModel] | None = options.get("query")
    status: int = options.get("status", 200)
    body_limit: Callable[[Any], int] | None = options.get("body_limit")

    if body_model is None and query_model is None:  # most GETs: nothing to read or validate

        @functools.wraps(fn)
        async def plain_handler(request: web.Request) -> web.StreamResponse:
            return _respond(await fn(request), status)

        return plain_handler

    @functools.wraps(fn)
    async def handler(request: web.Request) -> web.StreamResponse:
        kwargs: dict[str, Any] = {}
        if body_model is not None:
            limit = body_limit(request.app[SETTINGS]) if body_limit is not None else request.client_max_size
            raw = await read_body(request, limit)
            if not raw:
                raise errors.MalformedRequest("a JSON request body is required")
            try:
                if len(raw) > OFFLOAD_JSON_BYTES:
                    # Parsing a multi-MB body takes tens of ms: not on the event loop.
                    kwargs["body"] = await asyncio.to_thread(body_model.model_validate_json, raw)
                else:
                    kwargs["body"] = body_model.model_validate_json(raw)
            except pydantic.ValidationError as exc:
                raise validation_problem(exc, "body") from None
        if query_model is not None:
            try:
                kwargs["query"] = query_model.model_validate(dict(request.query))
            except pydantic.ValidationError as exc:
                raise validation_problem(exc, "query") from None
        return _respond(await fn(request, **kwargs), status)

    return handler


def _respond(result: Any, status: int) -> web.StreamResponse:
    if isinstance(result, web.StreamResponse):
        return result
    if result is None:
        return web.Response(status=204)
    return json_response(result, status)
