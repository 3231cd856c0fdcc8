"""The LLM's state in the `adiuva serve` banner: which provider and model, said at once; whether
it is reachable and pulled (or installed with its key), said when the check has finished, so a
slow or absent provider never delays the start."""

from __future__ import annotations

from aiohttp import web

from adiuva_server.chat.llm import OLLAMA_PREFIX, Availability, public_url
from adiuva_server.config import Settings
from adiuva_server.keys import CHAT, SETTINGS


def announce_llm(app: web.Application) -> None:
    """Print the configured models now and their availability once checked (in the background;
    the server's stop cancels a check still running)."""
    settings, llm = app[SETTINGS], app[CHAT].llm
    models = list(dict.fromkeys((settings.llm_model, settings.llm_router_model, *settings.llm_models)))
    print("\n".join(f"  LLM {m}: {where(settings, m)}; checking it..." for m in models), flush=True)

    async def report() -> None:
        status = await llm.availability()
        print("\n".join(f"  LLM {m}: {state(m, status[m])}" for m in models), flush=True)

    llm.in_background(report())


def where(settings: Settings, model: str) -> str:
    if model.startswith(OLLAMA_PREFIX):
        return f"Ollama at {public_url(settings.ollama_host)}"
    return "LiteLLM" + (f" at {public_url(settings.llm_api_base)}" if settings.llm_api_base else "")


def state(model: str, availability: Availability) -> str:
    if not availability.available:
        return f"NOT AVAILABLE ({availability.cause}): {availability.reason}; chat answers 503 llm_unavailable until fixed"
    if model.startswith(OLLAMA_PREFIX):
        return "ready (Ollama is reachable and has pulled it)"
    return "ready as far as can be told without a request (LiteLLM installed, the provider's key set)"
