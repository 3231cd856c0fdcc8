"""Cancelling work whose client has gone away.

aiohttp does not cancel a handler when its client disconnects (and must not in general: a write
half-way must not be cut). A long answer that only computes, such as a chat turn that keeps an
LLM generating, opts in: `await cancel_on_disconnect(request, coro)`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from adiuva_server import errors

T = TypeVar("T")
POLL_SECONDS = 0.25


async def cancel_on_disconnect(request: web.Request, work: Awaitable[T]) -> T:
    """The result of `work`; if the client disconnects first, `work` is cancelled and
    ClientClosedRequest raised (its answer reaches nobody; the access log shows 499)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait((task,), timeout=POLL_SECONDS)
            if done:
                return task.result()
            transport = request.transport
            if transport is None or transport.is_closing():
                break
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    raise errors.ClientClosedRequest("the client closed the connection before the answer was ready")
