"""Rate-limit store: sliding-window counters by key.

The interface is three calls so a shared store (for several server processes) can replace the
in-memory one without touching callers.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple, Protocol


class Decision(NamedTuple):  # a tuple: built on every authenticated request
    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until one more event fits (0 when allowed)
    reset_after: float  # seconds until the window holds no events at all

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(max(0, int(self.reset_after + 0.999))),
        }


class RateLimitStore(Protocol):
    def hit(self, key: str, limit: int, window: float) -> Decision:
        """Count one event under `key` if it fits `limit` per sliding `window` seconds."""

    def check(self, key: str, limit: int, window: float) -> Decision:
        """Whether one more event would fit, without counting it."""

    def reset(self, key: str) -> None: ...

    def sweep(self) -> int:
        """Forget keys with no events inside their window; returns how many were dropped."""


class MemoryRateLimitStore:
    """Exact sliding-window log: at most `limit` timestamps per key, so memory is bounded by
    the limits; idle keys are dropped by `sweep` (the app calls it every minute)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._events: dict[str, tuple[float, deque[float]]] = {}
        self._clock = clock

    def _window(self, key: str, window: float, now: float) -> deque[float]:
        entry = self._events.get(key)
        if entry is None:
            return deque()
        events = entry[1]
        cutoff = now - window
        while events and events[0] <= cutoff:
            events.popleft()
        return events

    def _decision(self, events: deque[float], limit: int, window: float, now: float) -> Decision:
        n = len(events)
        reset_after = events[-1] + window - now if events else 0.0
        # When full, one more fits once the (n - limit + 1)-th oldest event leaves the window.
        retry_after = events[n - limit] + window - now if n >= limit else 0.0
        return Decision(n < limit, limit, max(0, limit - n), max(0.0, retry_after), max(0.0, reset_after))

    def hit(self, key: str, limit: int, window: float) -> Decision:
        now = self._clock()
        entry = self._events.get(key)
        if entry is None:
            events: deque[float] = deque()
            self._events[key] = (window, events)
        else:
            events = self._window(key, window, now)
        if len(events) >= limit:
            return self._decision(events, limit, window, now)
        events.append(now)
        return Decision(True, limit, limit - len(events), 0.0, window)

    def check(self, key: str, limit: int, window: float) -> Decision:
        now = self._clock()
        return self._decision(self._window(key, window, now), limit, window, now)

    def reset(self, key: str) -> None:
        self._events.pop(key, None)

    def sweep(self) -> int:
        now = self._clock()
        stale = [k for k, (w, ev) in self._events.items() if not ev or ev[-1] <= now - w]
        for k in stale:
            del self._events[k]
        return len(stale)

    def __len__(self) -> int:
        return len(self._events)
