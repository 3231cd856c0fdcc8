"""A local stand-in for LLM providers, scripted per test: one aiohttp server on 127.0.0.1 that
speaks Ollama's /api/chat (NDJSON streaming, tools) and /api/tags (the pulled models), and
OpenAI's /v1/chat/completions (SSE streaming, tools), so the real `ollama` and `litellm` clients
talk to it over a real socket. Like Ollama, it answers 404 for a model it has not pulled."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

ROUTER_OPENER = "Classify which assistant"
PULLED = ("fake", "fake-router", "big", "small")  # the Ollama models the tests use


@dataclass
class Reply:
    text: str = ""
    tool_calls: list[tuple[str, Any]] = field(default_factory=list)  # (name, dict args or raw string)
    chunks: list[str] | None = None  # how to split `text` (default: one chunk per word)
    delay: float = 0.0  # before the response starts
    chunk_delay: float = 0.0
    gate: asyncio.Event | None = None  # held before the last chunk until set
    status: int = 200
    garbage: bool = False

    def pieces(self) -> list[str]:
        if self.chunks is not None:
            return self.chunks
        words = self.text.split(" ")
        return [w + (" " if i < len(words) - 1 else "") for i, w in enumerate(words)] if self.text else []


class FakeLLM:
    def __init__(self) -> None:
        self.replies: collections.deque[Reply] = collections.deque()
        self.router: Reply | str = "task_agent"
        self.requests: list[dict] = []  # agent calls (router calls are in router_requests)
        self.router_requests: list[dict] = []
        self.disconnected = asyncio.Event()
        self.chunks_sent = 0
        self.pulled: set[str] = set(PULLED)  # Ollama model names, without ":latest"
        self.tags_requests = 0
        self.tags_gate: asyncio.Event | None = None  # /api/tags waits for it when set
        self._runner: web.AppRunner | None = None
        self.url = ""

    def script(self, *replies: Reply | str) -> None:
        self.replies.extend(Reply(text=r) if isinstance(r, str) else r for r in replies)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/api/chat", self._ollama)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_post("/v1/chat/completions", self._openai)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _next(self, body: dict) -> Reply:
        messages = body.get("messages") or []
        if messages and messages[0].get("role") == "system" and messages[0]["content"].startswith(ROUTER_OPENER):
            self.router_requests.append(body)
            return Reply(text=self.router) if isinstance(self.router, str) else self.router
        self.requests.append(body)
        return self.replies.popleft() if self.replies else Reply(text="Done.")

    async def _stream(self, request: web.Request, reply: Reply, content_type: str, frames: list[bytes], last: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        try:
            await resp.prepare(request)
            for i, frame in enumerate(frames):
                if reply.gate is not None and i == len(frames) - 1:
                    await reply.gate.wait()
                await resp.write(frame)
                self.chunks_sent += 1
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            for frame in last:
                await resp.write(frame)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnected.set()
            raise
        return resp

    async def _prelude(self, request: web.Request, body: dict | None = None) -> tuple[dict, Reply, web.Response | None]:
        body = await request.json() if body is None else body
        reply = self._next(body)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            return body, reply, web.json_response({"error": "scripted failure"}, status=reply.status)
        if reply.garbage:
            return body, reply, web.Response(text="<html>502 bad gateway, not JSON</html>\n", content_type="application/x-ndjson")
        return body, reply, None

    async def _tags(self, request: web.Request) -> web.Response:
        self.tags_requests += 1
        if self.tags_gate is not None:
            await self.tags_gate.wait()
        stamp = "2024-01-01T00:00:00Z"
        return web.json_response({"models": [
            {"name": f"{n}:latest", "model": f"{n}:latest", "modified_at": stamp, "size": 1, "digest": "0" * 64,
             "details": {"format": "gguf", "family": "fake", "parameter_size": "1B", "quantization_level": "Q4_0"}}
            for n in sorted(self.pulled)]})

    async def _ollama(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["model"].removesuffix(":latest") not in self.pulled:  # Ollama's answer, word for word
            return web.json_response({"error": f"model '{body['model']}' not found"}, status=404)
        body, reply, early = await self._prelude(request, body)
        if early is not None:
            return early
        model = body["model"]
        calls = [{"function": {"name": n, "arguments": a if isinstance(a, dict) else {}}} for n, a in reply.tool_calls]
        stamp = "2024-01-01T00:00:00Z"
        if not body.get("stream", True):
            message = {"role": "assistant", "content": reply.text, **({"tool_calls": calls} if calls else {})}
            return web.json_response({"model": model, "created_at": stamp, "message": message, "done": True, "done_reason": "stop"})
        frames = [json.dumps({"model": model, "created_at": stamp, "message": {"role": "assistant", "content": p}, "done": False}).encode() + b"\n"
                  for p in reply.pieces()]
        if calls:
            frames.append(json.dumps({"model": model, "created_at": stamp, "message": {"role": "assistant", "content": "", "tool_calls": calls}, "done": False}).encode() + b"\n")
        last = [json.dumps({"model": model, "created_at": stamp, "message": {"role": "assistant", "content": ""}, "done": True,
                            "done_reason": "stop", "total_duration": 1, "eval_count": 1}).encode() + b"\n"]
        return await self._stream(request, reply, "application/x-ndjson", frames, last)

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body, reply, early = await self._prelude(request)
        if early is not None:
            return early
        model = body["model"]
        calls = [{"id": f"call_{i}", "type": "function",
                  "function": {"name": n, "arguments": a if isinstance(a, str) else json.dumps(a)}}
                 for i, (n, a) in enumerate(reply.tool_calls)]
        finish = "tool_calls" if calls else "stop"
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": model}
        if not body.get("stream"):
            message = {"role": "assistant", "content": reply.text or None, **({"tool_calls": calls} if calls else {})}
            return web.json_response({**base, "object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def sse(delta: dict, finish_reason: str | None = None) -> bytes:
            chunk = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"

        frames = [sse({"role": "assistant", "content": p}) for p in reply.pieces()]
        for i, call in enumerate(calls):
            frames.append(sse({"tool_calls": [{"index": i, **call}]}))
        last = [sse({}, finish), b"data: [DONE]\n\n"]
        return await self._stream(request, reply, "text/event-stream", frames, last)


def tool_names(body: dict) -> list[str]:
    return [t["function"]["name"] for t in body.get("tools") or []]


def tool_messages(body: dict) -> list[dict]:
    return [m for m in body["messages"] if m["role"] == "tool"]
