"""Rate-limit store: sliding-window counters by key.

The interface is async and small so a shared store (Redis, for several server processes) can
replace the in-memory one without touching callers. Every call is one atomic operation on one
key; none is a check followed by a separate count, which concurrent requests would race past.

Throttles that guard an expensive or secret-revealing step (a password check) use `reserve`
before the step and `settle` after it: the attempt holds its place in the window while it runs,
so however many requests race, at most `limit` steps run per window; an attempt that turns out
fine is refunded. A shared store implements the same operations with one script each, e.g. in
Redis a sorted set per key (score: time, member: a ticket), `reserve` = trim + count + add in one
Lua call, a refund = ZREM of the ticket, a kept failure = nothing (held tickets also sit in a
second set so a denial can say whether any are still in flight).
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from typing import NamedTuple, Protocol


class Decision(NamedTuple):  # a tuple: built on every authenticated request
    allowed: bool
    limit: int
    remaining: int
    retry_after: float  # seconds until one more event fits (0 when allowed)
    reset_after: float  # seconds until the window holds no events at all
    # Only from `reserve`: how many of the counted events are reservations still in flight (a
    # denial with pending > 0 may turn into room when they settle), and the ticket that names
    # this reservation for `settle` (None when denied).
    pending: int = 0
    ticket: object = None

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(max(0, int(self.reset_after + 0.999))),
        }


class RateLimitStore(Protocol):
    async def hit(self, key: str, limit: int, window: float) -> Decision:
        """Count one event under `key` if it fits `limit` per sliding `window` seconds."""

    async def check(self, key: str, limit: int, window: float) -> Decision:
        """Whether one more event would fit, without counting it."""

    async def reserve(self, key: str, limit: int, window: float) -> Decision:
        """`hit`, with the event held until `settle`: it counts against the limit meanwhile.
        The answer's `ticket` names the reservation; `pending` counts held ones."""

    async def settle(self, key: str, ticket: object, *, keep: bool) -> None:
        """End a reservation: keep it as an ordinary event (`keep=True`) or refund it."""

    async def reset(self, key: str) -> None: ...

    async def sweep(self) -> int:
        """Forget keys with no events inside their window; returns how many were dropped."""


class MemoryRateLimitStore:
    """Exact sliding-window log: at most `limit` timestamps per key, so memory is bounded by
    the limits; idle keys are dropped by `sweep` (the app calls it every minute). Single event
    loop, no await inside a method: each call is atomic."""

    def __init__(self, clock=time.monotonic) -> None:
        self._events: dict[str, tuple[float, deque[float]]] = {}
        # Reservations in flight: key -> {ticket: the timestamp it added to the key's events}.
        self._held: dict[str, dict[int, float]] = {}
        self._tickets = itertools.count(1)
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

    def _hit(self, key: str, limit: int, window: float, now: float) -> tuple[deque[float], bool]:
        entry = self._events.get(key)
        if entry is None:
            events: deque[float] = deque()
            self._events[key] = (window, events)
        else:
            events = self._window(key, window, now)
        if len(events) >= limit:
            return events, False
        events.append(now)
        return events, True

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        now = self._clock()
        events, counted = self._hit(key, limit, window, now)
        if not counted:
            return self._decision(events, limit, window, now)
        return Decision(True, limit, limit - len(events), 0.0, window)

    async def check(self, key: str, limit: int, window: float) -> Decision:
        now = self._clock()
        return self._decision(self._window(key, window, now), limit, window, now)

    async def reserve(self, key: str, limit: int, window: float) -> Decision:
        now = self._clock()
        events, counted = self._hit(key, limit, window, now)
        held = self._held.get(key)
        if held:
            cutoff = now - window
            for stale in [t for t, at in held.items() if at <= cutoff]:  # its event left the window
                del held[stale]
        if not counted:
            return self._decision(events, limit, window, now)._replace(pending=len(held) if held else 0)
        if held is None:
            held = self._held[key] = {}
        ticket = next(self._tickets)
        held[ticket] = now
        return Decision(True, limit, limit - len(events), 0.0, window, len(held), ticket)

    async def settle(self, key: str, ticket: int, *, keep: bool) -> None:
        held = self._held.get(key)
        at = held.pop(ticket, None) if held is not None else None
        if held is not None and not held:
            del self._held[key]
        if at is None or keep:
            return
        entry = self._events.get(key)
        if entry is not None:
            events = entry[1]
            i = bisect.bisect_left(events, at)
            if i < len(events) and events[i] == at:
                del events[i]

    async def reset(self, key: str) -> None:
        self._events.pop(key, None)
        self._held.pop(key, None)

    async def sweep(self) -> int:
        now = self._clock()
        # A held reservation's event is in the key's log, so an expired log has none in flight.
        stale = [k for k, (w, ev) in self._events.items() if not ev or ev[-1] <= now - w]
        for k in stale:
            del self._events[k]
            self._held.pop(k, None)
        return len(stale)

    def __len__(self) -> int:
        return len(self._events)
