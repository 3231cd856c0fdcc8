"""Language-model providers behind one small interface.

`ollama/<name>` goes to Ollama through the `ollama` AsyncClient; any other model name goes
through LiteLLM, imported on first use only (its import costs ~3.5 s and, without
LITELLM_LOCAL_MODEL_COST_MAP=True set first, fetches a price map from the internet).

Messages are plain dicts in OpenAI's shape ({"role", "content", "tool_calls", "tool_call_id"});
each provider converts. Whatever goes wrong inside a provider call (refused connection,
timeout, an HTTP error, a body that is not the protocol) becomes `LLMUnavailable`, with a
`cause` (one of CAUSES) and a detail that says what to do about it. A detail never carries an
exception's text (it could hold a key or a prompt), nor the credentials of a provider URL.

`availability()` answers, for every configured model, whether it can be used now: checked
against the provider (Ollama's list of pulled models; for LiteLLM, installed and its key in
the environment) with a short timeout, cached a few seconds, one check at a time.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from adiuva_server import errors
from adiuva_server.config import Settings

log = logging.getLogger(__name__)

OLLAMA_PREFIX = "ollama/"
# Why a model is unavailable: the `cause` of an llm_unavailable problem and of /chat/models.
UNREACHABLE, MODEL_MISSING, LITELLM_MISSING, NO_API_KEY, TIMEOUT, UPSTREAM_ERROR = CAUSES = (
    "unreachable", "model_missing", "litellm_missing", "no_api_key", "timeout", "upstream_error")
LITELLM_INSTALL = "pip install 'adiuva-server[llm]'"
PROBE_TIMEOUT = 2.0  # seconds an availability check may wait for the provider


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


@dataclass(frozen=True)
class Availability:
    available: bool
    cause: str | None = None  # one of CAUSES when not available
    reason: str | None = None  # what is wrong and what to do, for people

    @classmethod
    def of(cls, exc: errors.LLMUnavailable) -> Availability:
        return cls(False, exc.cause, exc.detail)


class Provider(Protocol):
    def stream(self, model: str, messages: Sequence[dict], tools: Sequence[dict]) -> AsyncIterator[Delta]: ...

    def unavailable(self, model: str, exc: Exception) -> errors.LLMUnavailable:
        """What a failure of `stream` means, as a cause and a detail that are safe to show."""

    async def availability(self, models: Sequence[str]) -> dict[str, Availability]:
        """Whether each model can be used now, asking the provider with PROBE_TIMEOUT."""

    async def close(self) -> None: ...


class LLM:
    """Dispatches a model name to its provider. `complete` and `stream` never raise anything but
    `LLMUnavailable` (and cancellation)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.timeout = settings.llm_timeout
        self._ollama: OllamaProvider | None = None
        self._litellm: LiteLLMProvider | None = None
        self._status: tuple[float, dict[str, Availability]] | None = None  # (checked at, result)
        self._checking: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # e.g. the serve banner's check

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
        except errors.LLMUnavailable as exc:
            exc.extra.setdefault("model", model)
            raise
        except asyncio.TimeoutError:
            log.warning("LLM %s: no answer within %.1f s", model, self.timeout)
            raise errors.LLMUnavailable(f"{model} did not answer within {self.timeout:g} s (LLM_TIMEOUT)",
                                        cause=TIMEOUT, model=model) from None
        except Exception as exc:  # the provider boundary: every failure is "unavailable"
            log.warning("LLM %s failed: %s: %s", model, type(exc).__name__, _short(exc))
            problem = provider.unavailable(name, exc)
            problem.extra.setdefault("model", model)
            raise problem from None
        finally:
            await stream.aclose()  # closes the upstream HTTP response: cancels the provider's work

    async def availability(self) -> dict[str, Availability]:
        """Every configured model (the agents', the router's, LLM_MODELS) and whether it can be
        used now. Cached for `llm_status_ttl` seconds; concurrent callers share one check, and a
        caller that goes away does not cancel it for the others."""
        ttl = self.settings.llm_status_ttl
        if self._status is not None and time.monotonic() - self._status[0] < ttl:
            return self._status[1]
        if self._checking is None:
            self._checking = asyncio.create_task(self._check())
            self._checking.add_done_callback(self._checked)
        return await asyncio.shield(self._checking)

    def _checked(self, task: asyncio.Task) -> None:
        self._checking = None
        if not task.cancelled() and task.exception() is None:
            self._status = (time.monotonic(), task.result())

    async def _check(self) -> dict[str, Availability]:
        models = list(dict.fromkeys((*self.settings.chat_models, self.settings.llm_router_model)))
        if self._ollama is None and any(m.startswith(OLLAMA_PREFIX) for m in models):
            # The serve banner's check comes right after the start: ollama's ~0.5 s of imports
            # happen in a thread, not on the event loop that already serves requests.
            await asyncio.to_thread(importlib.import_module, "ollama")
        by_provider: dict[Provider, list[str]] = {}
        for model in models:
            provider, name = self.provider(model)
            by_provider.setdefault(provider, []).append(name)
        found: dict[str, Availability] = {}
        for provider, names in by_provider.items():
            prefix = OLLAMA_PREFIX if provider is self._ollama else ""
            found.update({prefix + n: a for n, a in (await provider.availability(names)).items()})
        return {m: found[m] for m in models}

    def in_background(self, coro) -> asyncio.Task:
        """Run `coro` as a task that `close` cancels if it is still running."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def close(self) -> None:
        for task in (*self._background, *([self._checking] if self._checking else [])):
            task.cancel()
        for provider in (self._ollama, self._litellm):
            if provider is not None:
                await provider.close()


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def public_url(url: str) -> str:
    """A provider URL as it may be shown: without credentials, query or fragment."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _in_chain(exc: BaseException | None, types: tuple[type[BaseException], ...]) -> bool:
    """Whether `exc` or an exception it was raised from is one of `types` (the client libraries
    wrap the transport's errors, LiteLLM twice)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, types):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _connect_failed(exc: BaseException) -> bool:
    """A failure to open a connection at all (refused, no route, no such host). A connection
    that breaks later is an upstream error."""
    import httpx  # both clients are built on it; imported here so a start does not pay for it

    return _in_chain(exc, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionRefusedError, aiohttp.ClientConnectorError))


def _timed_out(exc: BaseException) -> bool:
    import httpx

    return _in_chain(exc, (asyncio.TimeoutError, httpx.TimeoutException))


# -- Ollama -------------------------------------------------------------------------------------


class OllamaProvider:
    def __init__(self, host: str, timeout: float) -> None:
        import ollama  # cheap; the homelab default

        self.client = ollama.AsyncClient(host=host, timeout=timeout)
        self.where = public_url(host)
        self._response_error = ollama.ResponseError

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

    def _unreachable(self, exc: Exception) -> errors.LLMUnavailable | None:
        # ollama turns a refused connection into a bare ConnectionError (not when streaming).
        if _connect_failed(exc) or type(exc) is ConnectionError:
            return errors.LLMUnavailable(f"Ollama is not reachable at {self.where} (OLLAMA_HOST); is it running?",
                                         cause=UNREACHABLE)
        return None

    def unavailable(self, model: str, exc: Exception) -> errors.LLMUnavailable:
        if unreachable := self._unreachable(exc):
            return unreachable
        if isinstance(exc, self._response_error) and exc.status_code == 404:  # Ollama: model not found
            return self._missing(model)
        if _timed_out(exc):
            return errors.LLMUnavailable(f"Ollama at {self.where} did not answer in time", cause=TIMEOUT)
        status = getattr(exc, "status_code", -1)
        what = f"answered HTTP {status}" if isinstance(exc, self._response_error) and status > 0 else "answered something unreadable"
        return errors.LLMUnavailable(f"Ollama at {self.where} {what} for {model}; see its log", cause=UPSTREAM_ERROR)

    def _missing(self, model: str) -> errors.LLMUnavailable:
        return errors.LLMUnavailable(f"Ollama at {self.where} has not pulled {model}; run `ollama pull {model}` there",
                                     cause=MODEL_MISSING)

    async def availability(self, models: Sequence[str]) -> dict[str, Availability]:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                listed = await self.client.list()
        except Exception as exc:  # noqa: BLE001 - every failure is the answer for all of them
            log.info("Ollama availability check failed: %s", type(exc).__name__)
            if isinstance(exc, TimeoutError):
                problem = errors.LLMUnavailable(f"Ollama at {self.where} did not answer within {PROBE_TIMEOUT:g} s",
                                                cause=TIMEOUT)
            else:
                problem = self._unreachable(exc) or errors.LLMUnavailable(
                    f"Ollama at {self.where} did not list its models ({type(exc).__name__}); see its log", cause=UPSTREAM_ERROR)
            return dict.fromkeys(models, Availability.of(problem))
        pulled = {m.model for m in listed.models if m.model}
        return {m: Availability(True) if m in pulled or f"{m}:latest" in pulled else Availability.of(self._missing(m))
                for m in models}

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

    async def _load(self) -> Any:
        """litellm, imported on first use; LLMUnavailable (litellm_missing) when it is not installed."""
        if self._litellm is None:
            try:
                # The import is heavy CPU-bound work: keep it off the event loop.
                self._litellm = await asyncio.get_running_loop().run_in_executor(None, import_litellm)
            except ImportError:
                raise errors.LLMUnavailable(f"LiteLLM is not installed; it serves every model not named ollama/...: "
                                            f"{LITELLM_INSTALL}", cause=LITELLM_MISSING) from None
        return self._litellm

    def _check_keys(self, litellm: Any, model: str) -> None:
        # LiteLLM knows which variables each provider needs; without them the call fails anyway.
        missing = litellm.validate_environment(model, api_base=self.api_base).get("missing_keys") or []
        if missing:
            raise errors.LLMUnavailable(f"{model} needs {' and '.join(missing)} in the server's environment "
                                        "(LiteLLM reads the provider's key from there)", cause=NO_API_KEY)

    def _where(self, model: str) -> str:
        return public_url(self.api_base) if self.api_base else f"{model.split('/', 1)[0]}'s API"

    async def stream(self, model: str, messages: Sequence[dict], tools: Sequence[dict]) -> AsyncIterator[Delta]:
        litellm = await self._load()
        self._check_keys(litellm, model)
        kwargs: dict[str, Any] = {"tools": list(tools)} if tools else {}
        chunks = await litellm.acompletion(
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

    def unavailable(self, model: str, exc: Exception) -> errors.LLMUnavailable:
        where = self._where(model)
        if _connect_failed(exc):
            return errors.LLMUnavailable(f"{where} is not reachable for {model}", cause=UNREACHABLE)
        if _timed_out(exc):
            return errors.LLMUnavailable(f"{where} did not answer {model} in time", cause=TIMEOUT)
        status = getattr(exc, "status_code", None)
        if status == 404:
            return errors.LLMUnavailable(f"{where} has no model {model}", cause=MODEL_MISSING)
        hint = " (check the provider's API key)" if status in (401, 403) else ""
        what = f"answered HTTP {status}" if isinstance(status, int) else "answered something unreadable"
        return errors.LLMUnavailable(f"{where} {what} for {model}{hint}", cause=UPSTREAM_ERROR)

    async def availability(self, models: Sequence[str]) -> dict[str, Availability]:
        """Installed and its keys present: no request is made (a probe would cost one)."""
        try:
            litellm = await self._load()
        except errors.LLMUnavailable as exc:
            return dict.fromkeys(models, Availability.of(exc))
        out = {}
        for model in models:
            try:
                self._check_keys(litellm, model)
                out[model] = Availability(True)
            except errors.LLMUnavailable as exc:
                out[model] = Availability.of(exc)
        return out

    async def close(self) -> None:
        pass
