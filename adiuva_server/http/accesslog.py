"""Logs a hostile client cannot forge: control characters are escaped, in the access log and in
every record (`%0a` in a URL path once wrote a second, made-up log line; `%00` a NUL byte)."""

from __future__ import annotations

import logging
import re

from aiohttp.abc import AbstractAccessLogger

from adiuva_server.keys import PRINCIPAL

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def escape(text: str) -> str:
    """`text` on one line: each control character as a backslash escape (`\\n`, `\\x00`)."""
    return _CONTROL.sub(_escape_one, text)


class EscapingFormatter(logging.Formatter):
    """Escapes control characters in each record's message; a traceback keeps its line breaks,
    but each of its lines is indented, so a line that starts at column 0 is always a record."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + escape(line) for line in text.splitlines())


class AccessLogger(AbstractAccessLogger):
    """One line per request: address, method, path, status, bytes, time and the authenticated
    user's id (`-` for none). Never the query string (`?token=`), a header, or an email."""

    @property
    def enabled(self) -> bool:
        # Read by aiohttp once per connection: below INFO, not even the arguments are built.
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request, response, time) -> None:
        principal = request.get(PRINCIPAL)
        self.logger.info(
            '%s "%s %s" %s %d %.1fms user=%s', request.remote, escape(request.method), escape(request.path),
            response.status, response.body_length, time * 1000, principal.id if principal is not None else "-",
        )
