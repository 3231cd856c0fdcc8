"""Request bodies a hostile client cannot turn into a stall.

- Content-Encoding: `gzip` and `deflate` only (`identity` or none: plain); anything else is a
  415 `unsupported_content_encoding` before a byte of the body is read. aiohttp inflates as the
  handler reads, at most 64 KiB at a time on the event loop (the JSON reader below never raises
  that step), and every route's size limit counts inflated bytes, so a body that inflates to
  10 GB costs its route's limit (1 MiB for JSON) and a 413.
- An answer sent while the body is still unread (413, 415, 401 on an upload) closes the
  connection: the rest of the body is never read, nor inflated (no lingering; http.protocol).
- A body that goes `ADIUVA_BODY_TIMEOUT` seconds without a byte while the server waits for it
  is a 408 `request_timeout`, and its connection is closed.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from adiuva_server import errors
from adiuva_server.http.problem import from_error
from adiuva_server.keys import SETTINGS

ACCEPTED_ENCODINGS = ("gzip", "deflate", "identity")


def check_content_encoding(request: web.Request) -> None:
    # Exactly what aiohttp's parser inflates (one header, one coding); it would hand any other
    # value ("gzip, br", "compress") to the handler as if it were the plain body.
    values = request.headers.getall("Content-Encoding", ())
    if not values or (len(values) == 1 and values[0].strip().lower() in ACCEPTED_ENCODINGS):
        return
    shown = ", ".join(values)[:100]
    raise errors.UnsupportedContentEncoding(
        f"Content-Encoding {shown!r} is not supported; send gzip, deflate or an unencoded body")


class BodyWatchdog:
    """Fails the body's reads with 408 once no byte has arrived for `timeout` seconds."""

    def __init__(self, request: web.Request, timeout: float) -> None:
        self.content = request.content
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.seen = self.content.total_bytes
        self.last = self.loop.time()
        self.handle = self.loop.call_later(min(timeout, 1.0), self._check)

    def _check(self) -> None:
        if self.content.is_eof() or self.content.exception() is not None:
            return
        now = self.loop.time()
        if self.content.total_bytes != self.seen:
            self.seen, self.last = self.content.total_bytes, now
        elif now - self.last >= self.timeout:
            self.content.set_exception(errors.RequestTimeout(
                f"no byte of the request body arrived for {self.timeout:g} s"))
            return
        self.handle = self.loop.call_later(min(self.timeout / 4, 1.0), self._check)

    def cancel(self) -> None:
        self.handle.cancel()


def setup_bodies(app: web.Application) -> None:
    timeout = app[SETTINGS].body_timeout

    @web.middleware
    async def bodies_middleware(request: web.Request, handler) -> web.StreamResponse:
        try:
            check_content_encoding(request)
        except errors.AdiuvaError as exc:
            response = from_error(exc)
            response.force_close()
            return response
        content = request.content
        watchdog = BodyWatchdog(request, timeout) if not content.is_eof() else None
        try:
            response = await handler(request)
        finally:
            if watchdog is not None:
                watchdog.cancel()
        if not content.is_eof() or response.status == 413:
            # The rest of the body will not be read: say so, and have the connection drop what
            # still arrives without parsing or inflating it, then close (http.protocol).
            response.force_close()
            request.protocol.close()
            if content.exception() is not None:
                # A body that timed out or broke: no rest to wait for, close after the answer
                # (aiohttp's wait for the rest would raise the body's error again).
                content.feed_eof()
        return response

    app.middlewares.append(bodies_middleware)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole (inflated) body, at most `limit` bytes, else 413 before or as soon as it is
    exceeded. Reads as it arrives, yielding to the loop between pieces: a compressed body is
    inflated a piece at a time, never all at once."""
    length = request.content_length
    if length is not None and length > limit:
        raise errors.PayloadTooLarge(f"the request body is {length} bytes; the limit is {limit}")
    content = request.content
    body = bytearray()
    while chunk := await content.readany():
        body += chunk
        compressed = content.total_compressed_bytes or 0
        if len(body) > limit or compressed > limit:
            raise errors.PayloadTooLarge(f"the request body is larger than {limit} bytes"
                                         + (" once inflated" if compressed else ""))
        await asyncio.sleep(0)
    return bytes(body)
