"""Requests in flight, so a shutdown can let them finish.

aiohttp's own graceful shutdown stops reading from every connection as soon as it begins
(an upload in progress then stalls until the shutdown timeout and is cut off). So `adiuva
serve` first stops listening, waits here until in-flight requests are done (bounded), and only
then lets aiohttp close the connections. WebSockets are long-lived by design and not counted.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web

from adiuva_server.keys import INFLIGHT


class InFlight:
    def __init__(self) -> None:
        self.count = 0
        # Set when the server stops: each answer then closes its connection, so keep-alive
        # clients cannot go on starting requests while the server waits for the last ones.
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when nothing is in flight; False if `timeout` passed first."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self.count == 0


def setup_inflight(app: web.Application) -> None:
    app[INFLIGHT] = tracker = InFlight()

    @web.middleware
    async def inflight_middleware(request: web.Request, handler) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await handler(request)
        tracker.enter()
        try:
            response = await handler(request)
            if tracker.draining:
                response.force_close()
            return response
        finally:
            tracker.leave()

    app.middlewares.append(inflight_middleware)
