"""Redacts what must not leave the server in a chat answer: fragments of our system prompts,
reasoning and chat-template markers, tool schemas and routing metadata.

All patterns are literal strings (matched case-insensitively), so the streaming variant can
hold back exactly the tail that could still become a match and nothing more: chunks go out as
they arrive unless they end in the first characters of a pattern.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

REDACTED = "[REDACTED]"

MARKERS = (
    "<thinking>", "</thinking>", "<think>", "</think>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>",
    "<|im_start|>", "<|im_end|>", "<|system|>", "<|assistant|>", "<|user|>", "### System:", "### Instruction:",
)
TOOL_SCHEMA = ('"type": "function"', '"type":"function"', '"parameters": {', '"parameters":{', '"tool_calls"', '"tool_call_id"')


class Sanitizer:
    def __init__(self, fingerprints: Iterable[str], routing_terms: Iterable[str]) -> None:
        self.patterns = sorted({p for p in (*MARKERS, *TOOL_SCHEMA, *fingerprints, *routing_terms) if p}, key=len, reverse=True)
        self._regex = re.compile("|".join(re.escape(p) for p in self.patterns), re.IGNORECASE)
        self._prefixes = {p.casefold()[:n] for p in self.patterns for n in range(1, len(p))}
        self._longest = max(len(p) for p in self.patterns)

    def text(self, value: str) -> str:
        cleaned, count = self._regex.subn(REDACTED, value)
        if count:
            log.warning("sanitizer redacted %d fragment(s) from a chat response", count)
        return cleaned

    def json(self, value: Any) -> Any:
        """Every string inside a JSON-shaped value (keys stay)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.json(v) for v in value]
        if isinstance(value, dict):
            return {k: self.json(v) for k, v in value.items()}
        return value

    def stream(self) -> StreamSanitizer:
        return StreamSanitizer(self)

    def held_tail(self, text: str) -> int:
        """How many trailing characters of `text` could be the start of a pattern."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            if text[-n:].casefold() in self._prefixes:
                return n
        return 0


class StreamSanitizer:
    """Feed chunks in order; get back what is safe to send now. `flush()` at the end."""

    def __init__(self, sanitizer: Sanitizer) -> None:
        self.sanitizer = sanitizer
        self.pending = ""

    def feed(self, chunk: str) -> str:
        text = self.pending + chunk
        # A complete match may end inside the held tail; cut after the last match instead.
        hold = self.sanitizer.held_tail(text)
        cut = len(text) - hold
        for m in self.sanitizer._regex.finditer(text):
            if m.start() < cut < m.end():
                cut = m.end()
        self.pending = text[cut:]
        return self.sanitizer.text(text[:cut]) if cut else ""

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return self.sanitizer.text(text)
