"""Latency the server adds to chat, against calling the provider directly in the same run.

A local Ollama-protocol provider answers instantly (tests/fake_llm.py). Measured, sequentially:
- baseline: the `ollama` client calling the provider directly (stream, read to the end), and the
  time to its first chunk;
- POST /api/v1/chat: one router call + one agent call, so its baseline is two direct calls;
- WS /api/v1/chat/stream: time from sending the ChatRequest to the first text chunk; its
  baseline is one direct call (router) plus the first chunk of a second.
Added = server p50/p99 minus baseline p50/p99. Not a test.

    python bench/bench_chat.py [--n 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import aiohttp  # noqa: E402
import ollama  # noqa: E402
from aiohttp import web  # noqa: E402
from fake_llm import FakeLLM  # noqa: E402

from adiuva_server.app import create_app  # noqa: E402
from adiuva_server.config import Settings  # noqa: E402

MESSAGE = {"message": "what is due today?", "context": {"tasks": [{"id": "t1", "title": "Write report"}]}}


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000


async def timed(n: int, fn) -> list[float]:
    for _ in range(min(50, n // 5)):  # warm-up
        await fn()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - started)
    return out


async def main(n: int) -> None:
    fake = FakeLLM()
    fake.router = "task_agent"
    url = await fake.start()
    data_dir = Path(tempfile.mkdtemp(prefix="adiuva-bench-"))
    settings = Settings.from_env({}, data_dir=data_dir, env="test", llm_model="ollama/fake", llm_router_model="ollama/fake",
                                 ollama_host=url, rate_limits={t: 10**9 for t in ("free", "pro", "power", "team")})
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/api/v1"

    direct = ollama.AsyncClient(host=url)
    messages = [{"role": "user", "content": "what is due today?"}]

    async def provider_call() -> None:
        async for _ in await direct.chat(model="fake", messages=messages, stream=True):
            pass

    async def provider_first_chunks() -> list[float]:
        # Read each answer to the end (so the connection is reused, as the server's is) but
        # stop the clock at the first chunk.
        out = []
        for i in range(n + min(50, n // 5)):
            started = time.perf_counter()
            parts = await direct.chat(model="fake", messages=messages, stream=True)
            await anext(parts)
            elapsed = time.perf_counter() - started
            async for _ in parts:
                pass
            if i >= min(50, n // 5):
                out.append(elapsed)
        return out

    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{base}/auth/register", json={"email": "bench@example.org", "password": "correct horse battery"})
        token = (await resp.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        payload = json.dumps(MESSAGE)

        async def rest_chat() -> None:
            async with http.post(f"{base}/chat", data=payload, headers={**headers, "Content-Type": "application/json"}) as r:
                assert r.status == 200, await r.text()
                await r.read()

        async with http.ws_connect(f"{base}/chat/stream?token={token}") as ws:
            # The WS timing must stop at the first chunk, not at the final frame.
            async def ws_time() -> list[float]:
                out = []
                for i in range(n + min(50, n // 5)):
                    started = time.perf_counter()
                    await ws.send_str(payload)
                    first = await ws.receive()
                    elapsed = time.perf_counter() - started
                    while not (await ws.receive()).data.startswith('{"done"'):
                        pass
                    if i >= min(50, n // 5):
                        out.append(elapsed)
                return out

            one = await timed(n, provider_call)
            first = await provider_first_chunks()
            rest = await timed(n, rest_chat)
            wsf = await ws_time()
        await direct.close()

    two = [a + b for a, b in zip(one, one[1:] + one[:1])]  # router + agent, both direct
    one_plus_first = [a + b for a, b in zip(one, first)]
    print(f"adiuva chat bench: {n} sequential requests each, provider answers instantly (local Ollama-protocol stand-in)")
    print(f"{'':34}{'p50 ms':>9}{'p99 ms':>9}")
    for label, values in (("provider direct, 1 call", one), ("provider direct, first chunk", first),
                          ("POST /chat (router + agent)", rest), ("WS first chunk (router + agent)", wsf)):
        print(f"{label:34}{pct(values, 50):9.2f}{pct(values, 99):9.2f}")
    added_rest = (pct(rest, 50) - pct(two, 50), pct(rest, 99) - pct(two, 99))
    added_ws = (pct(wsf, 50) - pct(one_plus_first, 50), pct(wsf, 99) - pct(one_plus_first, 99))
    print(f"added by the server, POST /chat   : p50 {added_rest[0]:.2f} ms, p99 {added_rest[1]:.2f} ms "
          f"(vs 2 direct calls: {pct(two, 50):.2f} / {pct(two, 99):.2f} ms)")
    print(f"added by the server, WS 1st chunk : p50 {added_ws[0]:.2f} ms, p99 {added_ws[1]:.2f} ms "
          f"(vs 1 direct call + 1 first chunk: {pct(one_plus_first, 50):.2f} / {pct(one_plus_first, 99):.2f} ms)")
    print(f"ratio POST /chat p50 / 2 direct calls p50: {pct(rest, 50) / pct(two, 50):.2f}x")
    await runner.cleanup()
    await fake.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    asyncio.run(main(parser.parse_args().n))
