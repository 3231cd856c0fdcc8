"""Every error leaves the server as RFC 9457 problem details with a stable `code`:
our own exceptions, aiohttp's (404, 405, 413, ...) and anything unexpected (logged, never shown)."""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from adiuva_server import errors

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def problem_response(status: int, code: str, title: str, detail: str, headers=None, extra=None) -> web.Response:
    body = {"type": f"https://adiuva.app/problems/{code}", "title": title, "status": status, "detail": detail, "code": code}
    if extra:
        body.update(extra)
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type=PROBLEM_JSON, headers=headers
    )


def from_error(exc: errors.AdiuvaError) -> web.Response:
    return problem_response(exc.status, exc.code, exc.title, exc.detail, exc.headers, exc.extra)


def from_http_exception(exc: web.HTTPException) -> web.Response:
    status = exc.status
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else exc.reason
    detail = exc.text if exc.text and not exc.text.startswith(f"{status}:") else phrase
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
    if status == 405:
        detail = f"method not allowed; allowed: {headers.get('Allow', '')}"
    return problem_response(status, _CODES.get(status, f"http_{status}"), phrase, detail, headers)


@web.middleware
async def problem_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.AdiuvaError as exc:
        if exc.status >= 500:  # 503: a dependency (the LLM) is down, not a fault of ours
            log.log(logging.WARNING if exc.status == 503 else logging.ERROR, "%s %s: %s",
                    request.method, request.path, exc.detail)
        response = from_error(exc)
        if isinstance(exc, errors.ClientClosedRequest):
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc)
    except RequestPayloadError as exc:  # a body aiohttp could not decode (Content-Encoding, chunks)
        detail = " ".join(str(exc).split())
        response = problem_response(400, "malformed_request", "Malformed request", f"the request body could not be read: {detail}")
        response.force_close()  # the rest of the body cannot be framed: this connection is done
        return response
    except asyncio.CancelledError:
        raise
    except ConnectionResetError:  # the client went away mid-request (an upload cut off): no fault
        response = from_error(errors.ClientClosedRequest("the client closed the connection"))
        response.force_close()
        return response
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(500, "internal_error", "Internal server error", "an unexpected error occurred; see the server log")


def setup_problems(app: web.Application) -> None:
    app.middlewares.append(problem_middleware)
