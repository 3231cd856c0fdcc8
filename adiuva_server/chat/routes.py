"""Chat and plan routes: thin; the orchestrator does the work."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import weakref
from collections.abc import AsyncIterator

import pydantic
import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web

from adiuva_server import errors
from adiuva_server.chat.models import (
    BatchInfo, BatchList, BatchResult, ChatModels, ChatReply, ChatRequest, ChatResponse, ModelAvailability, PlanRunRequest,
    PlaybookList, StreamQuery,
)
from adiuva_server.chat.plans import ExecutionPlan, PlanSpec, PlaybookSummary
from adiuva_server.http.auth import principal
from adiuva_server.http.disconnect import cancel_on_disconnect
from adiuva_server.http.routing import Api, validation_problem
from adiuva_server.keys import AUTH, CHAT, RATE_LIMITS, SETTINGS, SHARED

log = logging.getLogger(__name__)

api = Api("chat")
plans_api = Api("plans")
WS_MESSAGE_LIMIT = 1024 * 1024
# Requests that may wait on a socket while an answer streams. Frames beyond that (or over the
# account's rate limit) are dropped and answered, in order, with a rate_limited error frame; a
# client that sends WS_MAX_REFUSALS refused frames in a row is disconnected (1008).
WS_QUEUE_LIMIT = 2
WS_MAX_REFUSALS = 8
WS_RETRY_AFTER = 5  # seconds, when an account has all its sockets open
_CLOSING = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
# The chat sockets open in this process, to close when the server stops. How many one account
# holds (Settings.chat_max_sockets caps them) is counted for the whole cluster: app[SHARED].sockets.
WS_SOCKETS = web.AppKey("chat_ws_sockets", weakref.WeakSet)


@api.cleanup_ctx
async def _chat_sockets(app: web.Application) -> AsyncIterator[None]:
    # httpx (under the ollama and litellm clients) logs every request URL at INFO; OLLAMA_HOST
    # and LLM_API_BASE may carry credentials, so only its warnings reach our log.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    app[WS_SOCKETS] = weakref.WeakSet()
    yield


@api.post("/chat", summary="Send a message to the assistant (plan mode: get the plan instead)", body=ChatRequest,
          response=ChatReply, errors=(401, 403, 413, 422, 429, 503))
async def chat(request: web.Request, body: ChatRequest) -> ChatResponse | ExecutionPlan:
    # A desktop app closed mid-answer must not leave the model generating for nobody.
    return await cancel_on_disconnect(request, request.app[CHAT].orchestrate(principal(request), body))


@api.get("/chat/models", summary="The models and agents this account may use", response=ChatModels, errors=(401,))
async def chat_models(request: web.Request) -> ChatModels:
    who, chat = principal(request), request.app[CHAT]
    available = await chat.availability(who.tier)
    return ChatModels(default=chat.settings.llm_model, models=list(available), agents=[a.name for a in chat.agents_for(who.tier)],
                      availability={m: ModelAvailability(**vars(a)) for m, a in available.items()})


@api.get("/chat/stream", summary="Streaming chat over a WebSocket (token as ?token= or Authorization)",
         auth=False, status=101, errors=(401, 429), query=StreamQuery)
async def chat_stream(request: web.Request, query: StreamQuery) -> web.WebSocketResponse:
    token = _ws_token(request, query.token)
    # Before the upgrade, so these get a plain problem answer: a bad token 401, an account over
    # its request limit or with all its sockets open 429. Opening counts as a request (the rate
    # limit middleware does not see this route: its token may come in the query).
    who = await request.app[AUTH].authenticate_token(token)
    await _count(request, who)
    limit, sockets, key = request.app[SETTINGS].chat_max_sockets, request.app[SHARED].sockets, f"chat:{who.id}"
    slot = await sockets.acquire(key, limit)
    if slot is None:
        raise errors.TooManyConnections(WS_RETRY_AFTER, f"at most {limit} chat streams may be open per account; close one first")
    try:
        ws = web.WebSocketResponse(heartbeat=request.app[SETTINGS].chat_heartbeat_seconds, max_msg_size=WS_MESSAGE_LIMIT)
        await ws.prepare(request)
        request.app[WS_SOCKETS].add(ws)
        await _converse(request, ws, token)
    finally:
        await sockets.release(key, slot)
    return ws


@api.on_shutdown
async def _close_sockets(app: web.Application) -> None:
    """A stopping server says so (1001 going away) instead of making the stop wait for sockets
    that never end on their own; the app reconnects to the next server."""
    await asyncio.gather(*[ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                           for ws in list(app[WS_SOCKETS])], return_exceptions=True)


class _Inbox:
    """Frames waiting to be answered, in arrival order. Each frame is counted against the
    account's rate limit when it arrives; at most WS_QUEUE_LIMIT requests wait, and a refused
    frame is dropped at once: only the small error it will be answered with waits in its place."""

    def __init__(self, request: web.Request, token: str) -> None:
        self.request = request
        self.token = token
        self.items: collections.deque[aiohttp.WSMessage | errors.AdiuvaError] = collections.deque()
        self.refusals = 0  # refused frames in a row

    def __bool__(self) -> bool:
        return bool(self.items)

    def popleft(self) -> aiohttp.WSMessage | errors.AdiuvaError:
        return self.items.popleft()

    async def add(self, msg: aiohttp.WSMessage) -> bool:
        """Queue the frame or its refusal; False when the client keeps flooding."""
        refusal: errors.AdiuvaError | None = None
        if sum(not isinstance(i, errors.AdiuvaError) for i in self.items) >= WS_QUEUE_LIMIT:
            refusal = errors.RateLimited(1, f"at most {WS_QUEUE_LIMIT} messages may wait while an answer streams; "
                                            "this one was dropped")
        else:
            try:
                await _count(self.request, await self.request.app[AUTH].authenticate_token(self.token))
            except (errors.RateLimited, errors.ServiceUnavailable) as exc:  # over the limit, or it cannot be checked
                refusal = exc
            except errors.AdiuvaError:
                pass  # a bad token is answered when the frame's turn comes, as before
        if refusal is None:
            self.refusals = 0
            self.items.append(msg)
            return True
        self.refusals += 1
        self.items.append(refusal)
        return self.refusals < WS_MAX_REFUSALS


async def _converse(request: web.Request, ws: web.WebSocketResponse, token: str) -> None:
    auth, chat = request.app[AUTH], request.app[CHAT]
    inbox = _Inbox(request, token)
    receive: asyncio.Task | None = None
    answer: asyncio.Task | None = None
    try:
        while True:
            if not inbox:
                receive = receive or asyncio.create_task(ws.receive())
                msg = await receive
                receive = None
                if msg.type in _CLOSING:
                    break
                if not await inbox.add(msg):
                    await _close_flooded(ws)
                    return
            item = inbox.popleft()
            if isinstance(item, errors.AdiuvaError):
                await _send_error(ws, item)
                continue
            try:
                # Tier and account state are read again for every message, as for every request.
                who = await auth.authenticate_token(token)
                chat_request = _parse(item)
            except errors.AdiuvaError as exc:
                await _send_error(ws, exc)
                continue
            answer = asyncio.create_task(chat.orchestrate(who, chat_request, emit=ws.send_str))
            while not answer.done():
                receive = receive or asyncio.create_task(ws.receive())
                await asyncio.wait({answer, receive}, return_when=asyncio.FIRST_COMPLETED)
                if receive.done():
                    incoming, receive = receive.result(), None
                    flooded = incoming.type not in _CLOSING and not await inbox.add(incoming)  # answered after the current one
                    if incoming.type in _CLOSING or flooded:
                        # The client left (or is cut off): cancelling the answer closes the
                        # upstream response, which stops the provider's generation.
                        answer.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await answer
                        if flooded:
                            await _close_flooded(ws)
                        return
            try:
                result = answer.result()
            except errors.LLMUnavailable as exc:
                # The model will not answer the next message either: say why, then close with
                # 1013 (try again later) so the app shows the cause and reconnects later.
                await _send_error(ws, exc)
                await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=f"llm_unavailable: {exc.cause}".encode())
                return
            except errors.AdiuvaError as exc:
                await _send_error(ws, exc)
                continue
            except (ConnectionResetError, RuntimeError) as exc:  # the socket went away mid-send
                log.info("chat stream closed while sending: %s", type(exc).__name__)
                break
            except Exception:  # a bug: the socket is already upgraded, so answer with a frame
                log.exception("chat stream: unexpected error")
                await _send_error(ws, errors.AdiuvaError("an unexpected error occurred; see the server log"))
                continue
            await ws.send_str(_final(result))
    except (ConnectionResetError, RuntimeError) as exc:  # the socket went away mid-send
        log.info("chat stream closed while sending: %s", type(exc).__name__)
    except Exception:  # after the upgrade no HTTP answer is possible (it would reach the access log): a close code
        log.exception("chat stream: unexpected error")
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"unexpected server error; see the server log")
    finally:
        for task in (receive, answer):
            if task is not None and not task.done():
                task.cancel()  # an answer cancelled closes its upstream response
        await ws.close()


async def _close_flooded(ws: web.WebSocketResponse) -> None:
    log.info("chat stream closed: the client kept sending refused messages")
    await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"too many messages; wait for each answer")


def _ws_token(request: web.Request, token: str | None) -> str:
    token = (token or "").strip()
    if token:
        return token
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    raise errors.Unauthorized("pass the access token as ?token=<jwt> or an Authorization: Bearer header")


async def _count(request: web.Request, who) -> None:
    """Opening the socket and each message on it count against the per-minute limit like a
    request (a message when it arrives, not when its turn comes). The one call into the store."""
    settings, store = request.app[SETTINGS], request.app[RATE_LIMITS]
    decision = await store.hit(f"user:{who.id}", settings.rate_limits[who.tier], settings.rate_window_seconds)
    if not decision.allowed:
        raise errors.RateLimited(decision.retry_after, f"limit of {decision.limit} requests per minute reached",
                                 headers=decision.headers())


def _parse(msg) -> ChatRequest:
    if msg.type != WSMsgType.TEXT:
        raise errors.MalformedRequest("send the ChatRequest as a JSON text frame")
    try:
        return ChatRequest.model_validate_json(msg.data)
    except pydantic.ValidationError as exc:
        raise validation_problem(exc, "body") from None


def _final(result: ChatResponse | ExecutionPlan) -> str:
    if isinstance(result, ExecutionPlan):
        return json.dumps({"done": True, "response": "", "actions": [], "plan": result.model_dump(mode="json")})
    return json.dumps({"done": True, "response": result.response, "actions": result.actions, "agent": result.agent})


async def _send_error(ws: web.WebSocketResponse, exc: errors.AdiuvaError) -> None:
    if exc.status >= 500:
        log.warning("chat stream: %s", exc.detail)
    error = {"status": exc.status, "code": exc.code, "title": exc.title, "detail": exc.detail, **exc.extra}
    if "Retry-After" in exc.headers:
        error["retry_after"] = exc.headers["Retry-After"]
    with contextlib.suppress(ConnectionResetError, RuntimeError):
        await ws.send_str(json.dumps({"done": True, "response": "", "actions": [], "error": error}))


# -- plans --------------------------------------------------------------------------------------


@plans_api.get("/plans/playbook", summary="Built-in playbooks and your own plans", response=PlaybookList, errors=(401,))
async def list_playbooks(request: web.Request) -> PlaybookList:
    return PlaybookList(items=[PlaybookSummary.of(p) for p in await request.app[CHAT].plans.list(principal(request).id)])


@plans_api.get("/plans/playbook/{plan_id}", summary="One playbook or plan, with its steps' vars", response=ExecutionPlan, errors=(401, 404))
async def get_playbook(request: web.Request) -> ExecutionPlan:
    return await request.app[CHAT].plans.get(principal(request).id, request.match_info["plan_id"])


@plans_api.post("/plans", summary="Build a plan from template steps (batch builder: power and team)", body=PlanSpec,
                response=ExecutionPlan, status=201, errors=(401, 403, 413, 422))
async def build_plan(request: web.Request, body: PlanSpec) -> ExecutionPlan:
    return await request.app[CHAT].build_plan(principal(request), body)


@plans_api.post("/plans/{plan_id}/run", summary="Run a playbook or plan as a batch (capped per tier)",
                body=PlanRunRequest, response=BatchResult, errors=(401, 402, 403, 404, 422, 429, 503))
async def run_plan(request: web.Request, body: PlanRunRequest) -> BatchResult:
    return await request.app[CHAT].run_plan(principal(request), request.match_info["plan_id"], body)


@plans_api.get("/plans/batches", summary="Your recent batches", response=BatchList, errors=(401,))
async def list_batches(request: web.Request) -> BatchList:
    batches = await request.app[CHAT].batches.recent(principal(request).id)
    return BatchList(items=[BatchInfo(batch_id=b.id, plan_id=b.plan_id, status=b.status, started_at=b.started_at,
                                      finished_at=b.finished_at) for b in batches])
