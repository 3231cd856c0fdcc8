"""Language-model providers behind one small interface.

`ollama/<name>` goes to Ollama through the `ollama` AsyncClient; any other model name goes
through LiteLLM, imported on first use only (its import costs ~3.5 s and, without
LITELLM_LOCAL_MODEL_COST_MAP=True set first, fetches a price map from the internet).

Messages are plain dicts in OpenAI's shape ({"role", "content", "tool_calls", "tool_call_id"});
each provider converts. Whatever goes wrong inside a provider call (refused connection,
timeout, an HTTP error, a body that is not the protocol) becomes `LLMUnavailable`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from adiuva_server import errors
from adiuva_server.config import Settings

log = logging.getLogger(__name__)

OLLAMA_PREFIX = "ollama/"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any] | None  # None: the model sent something that is not a JSON object
    raw_arguments: str = ""


@dataclass
class Completion:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(frozen=True)
class Delta:
    """One streamed piece: text as the model produces it, or (last) the whole completion."""

    text: str = ""
    completion: Completion | None = None


class Provider(Protocol):
    def stream(self, model: str, messages: Sequence[dict], tools: Sequence[dict]) -> AsyncIterator[Delta]: ...

    async def close(self) -> None: ...


class LLM:
    """Dispatches a model name to its provider. `complete` and `stream` never raise anything but
    `LLMUnavailable` (and cancellation)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeout = settings.llm_timeout
        self._ollama: OllamaProvider | None = None
        self._litellm: LiteLLMProvider | None = None

    def provider(self, model: str) -> tuple[Provider, str]:
        if model.startswith(OLLAMA_PREFIX):
            if self._ollama is None:
                self._ollama = OllamaProvider(self.settings.ollama_host, self.timeout)
            return self._ollama, model[len(OLLAMA_PREFIX):]
        if self._litellm is None:
            self._litellm = LiteLLMProvider(self.settings.llm_api_base, self.timeout)
        return self._litellm, model

    async def complete(self, model: str, messages: Sequence[dict], tools: Sequence[dict] = ()) -> Completion:
        async for delta in self.stream(model, messages, tools):
            if delta.completion is not None:
                return delta.completion
        raise errors.LLMUnavailable(f"{model} ended its answer without finishing it")

    async def stream(self, model: str, messages: Sequence[dict], tools: Sequence[dict] = ()) -> AsyncIterator[Delta]:
        provider, name = self.provider(model)
        stream = provider.stream(name, messages, tools)
        try:
            while True:
                try:
                    # The timeout bounds the wait for each next piece, so a long answer that keeps
                    # coming is fine and a provider that stalls is not.
                    async with asyncio.timeout(self.timeout):
                        delta = await anext(stream)
                except StopAsyncIteration:
                    return
                yield delta
                if delta.completion is not None:
                    return
        except errors.LLMUnavailable:
            raise
        except asyncio.TimeoutError:
            log.warning("LLM %s: no answer within %.1f s", model, self.timeout)
            raise errors.LLMUnavailable(f"{model} did not answer within {self.timeout:g} s") from None
        except Exception as exc:  # the provider boundary: every failure is "unavailable"
            log.warning("LLM %s failed: %s: %s", model, type(exc).__name__, _short(exc))
            raise errors.LLMUnavailable(f"{model} is unavailable or answered something unreadable") from None
        finally:
            await stream.aclose()  # closes the upstream HTTP response: cancels the provider's work

    async def close(self) -> None:
        for provider in (self._ollama, self._litellm):
            if provider is not None:
                await provider.close()


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


# -- Ollama -------------------------------------------------------------------------------------


class OllamaProvider:
    def __init__(self, host: str, timeout: float) -> None:
        import ollama  # cheap; the homelab default

        self.client = ollama.AsyncClient(host=host, timeout=timeout)

    async def stream(self, model: str, messages: Sequence[dict], tools: Sequence[dict]) -> AsyncIterator[Delta]:
        parts = await self.client.chat(
            model=model, messages=_to_ollama(messages), tools=list(tools) or None, stream=True,
            options={"temperature": 0},
        )
        text: list[str] = []
        calls: list[ToolCall] = []
        async for part in parts:
            message = part.message
            if message.content:
                text.append(message.content)
                yield Delta(text=message.content)
            for call in message.tool_calls or ():
                args = call.function.arguments
                calls.append(ToolCall(f"call_{len(calls)}", call.function.name,
                                      dict(args) if isinstance(args, dict) else None, json.dumps(args, default=str)))
            if part.done:
                yield Delta(completion=Completion("".join(text), calls))
                return
        raise ValueError("the stream ended before done")

    async def close(self) -> None:
        await self.client.close()


def _to_ollama(messages: Sequence[dict]) -> list[dict]:
    out = []
    names = {}
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                names[c["id"]] = c["function"]["name"]
                try:
                    args = json.loads(c["function"]["arguments"] or "{}")
                except json.JSONDecodeError:
                    args = {}
                calls.append({"function": {"name": c["function"]["name"], "arguments": args if isinstance(args, dict) else {}}})
            out.append({"role": "assistant", "content": m.get("content") or "", "tool_calls": calls})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": m["content"], "tool_name": names.get(m.get("tool_call_id"), "")})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    return out


# -- LiteLLM (every other provider) ------------------------------------------------------------


def import_litellm() -> Any:
    # Never phone home for the price map; keep litellm's own chatter and telemetry off.
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    started = time.perf_counter()
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    log.info("imported litellm in %.1f s", time.perf_counter() - started)
    return litellm


class LiteLLMProvider:
    def __init__(self, api_base: str, timeout: float) -> None:
        self.api_base = api_base or None
        self.timeout = timeout
        self._litellm: Any = None

    async def stream(self, model: str, messages: Sequence[dict], tools: Sequence[dict]) -> AsyncIterator[Delta]:
        if self._litellm is None:
            # The import is heavy CPU-bound work: keep it off the event loop.
            self._litellm = await asyncio.get_running_loop().run_in_executor(None, import_litellm)
        kwargs: dict[str, Any] = {"tools": list(tools)} if tools else {}
        chunks = await self._litellm.acompletion(
            model=model, messages=list(messages), stream=True, temperature=0, api_base=self.api_base,
            timeout=self.timeout, max_retries=0, num_retries=0, **kwargs,
        )
        text: list[str] = []
        partial: dict[int, dict[str, str]] = {}
        answered = False
        async for chunk in chunks:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            answered = answered or bool(delta.content or getattr(delta, "tool_calls", None))
            if delta.content:
                text.append(delta.content)
                yield Delta(text=delta.content)
            for call in getattr(delta, "tool_calls", None) or ():
                slot = partial.setdefault(call.index or 0, {"id": "", "name": "", "arguments": ""})
                slot["id"] = call.id or slot["id"]
                if call.function is not None:
                    slot["name"] = call.function.name or slot["name"]
                    slot["arguments"] += call.function.arguments or ""
        if not answered:
            # LiteLLM skips whatever is not an SSE event and still makes up a final chunk, so a
            # body of garbage looks like an empty answer: treat an empty answer as a failure.
            raise ValueError("the provider's stream held no text and no tool calls")
        calls = []
        for index in sorted(partial):
            slot = partial[index]
            try:
                args = json.loads(slot["arguments"] or "{}")
            except json.JSONDecodeError:
                args = None
            calls.append(ToolCall(slot["id"] or f"call_{index}", slot["name"],
                                  args if isinstance(args, dict) else None, slot["arguments"]))
        yield Delta(completion=Completion("".join(text), calls))

    async def close(self) -> None:
        pass
