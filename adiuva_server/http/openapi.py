"""The OpenAPI 3.1 document, built from the declared routes and their pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from adiuva_server import __version__
from adiuva_server.http.routing import RouteSpec

_PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "description": "stable snake_case error code"},
    },
}
_STATUS_TEXT = {304: "Not modified (conditional request)", 400: "Malformed request", 401: "Not authenticated", 402: "Quota exceeded", 403: "Forbidden",
                404: "Not found", 408: "Request body timed out", 409: "Conflict", 412: "Precondition failed", 413: "Body too large",
                415: "Unsupported Content-Encoding", 416: "Range not satisfiable", 422: "Validation error", 429: "Rate limited",
                503: "Unavailable"}


def build_openapi(specs: list[RouteSpec]) -> dict[str, Any]:
    models = {m for s in specs for m in (s.body, s.query, s.response) if m is not None}
    ordered = sorted(models, key=lambda m: m.__name__)
    keyed, schema_defs = models_json_schema(
        [(m, "validation" if any(m in (s.body, s.query) for s in specs) else "serialization") for m in ordered],
        ref_template="#/components/schemas/{model}",
    )
    refs = {model: keyed[(model, mode)] for (model, mode) in keyed}
    components = dict(schema_defs.get("$defs", {}))
    components["Problem"] = _PROBLEM
    paths: dict[str, Any] = {}
    for spec in specs:
        op: dict[str, Any] = {
            "operationId": f"{spec.method.lower()}_{spec.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "summary": spec.summary,
            "tags": list(spec.tags),
            "responses": {},
        }
        if spec.auth:
            op["security"] = [{"bearer": []}]
        else:
            op["security"] = []
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_params(spec.path)
        ]
        if spec.query is not None:
            qs = spec.query.model_json_schema()
            for name, prop in qs.get("properties", {}).items():
                params.append({"name": name, "in": "query", "required": name in qs.get("required", []), "schema": prop})
        params += [{"name": n, "in": "header", "required": n in spec.required_headers, "description": d,
                    "schema": {"type": "string"}} for n, d in spec.request_headers.items()]
        if params:
            op["parameters"] = params
        if spec.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[spec.body]}}}
        elif spec.raw_body:
            op["requestBody"] = {
                "required": True,
                "description": "; ".join(spec.raw_body.values()),
                "content": {ct: {"schema": {"type": "string", "contentMediaType": ct}} for ct in spec.raw_body},
            }
        ok: dict[str, Any] = {"description": "Success"}
        if spec.response is not None:
            ok["content"] = {"application/json": {"schema": refs[spec.response]}}
        elif spec.raw_response:
            ok["content"] = {ct: {"schema": {"type": "string", "contentMediaType": ct}} for ct in spec.raw_response}
        if spec.response_headers:
            ok["headers"] = {n: {"description": d, "schema": {"type": "string"}} for n, d in spec.response_headers.items()}
        op["responses"][str(spec.status)] = ok
        implied = {401} if spec.auth else set()
        if spec.body is not None:
            implied |= {400, 422}  # a body that is not JSON; one that does not validate
        if spec.body is not None or spec.raw_body:
            implied |= {408, 413, 415}  # http.bodies: a stalled body, too large, an unknown encoding
        if spec.query is not None or spec.required_headers:
            implied.add(422)
        for status in sorted(set(spec.errors) | implied):
            if status < 400:  # 304: no body
                op["responses"][str(status)] = {"description": _STATUS_TEXT.get(status, "Redirection")}
                continue
            op["responses"][str(status)] = {
                "description": _STATUS_TEXT.get(status, "Error"),
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            }
        paths.setdefault(spec.full_path, {})[spec.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Adiuva server API", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


def _path_params(path: str) -> list[str]:
    import re

    return re.findall(r"\{(\w+)(?::[^}]*)?\}", path)
