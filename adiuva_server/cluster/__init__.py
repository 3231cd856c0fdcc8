"""What several `adiuva serve` processes must share, behind small interfaces, with the in-process
implementations a one-box server uses. `open_shared(settings)` builds one or the other set:
in-process by default, Redis (or Valkey) when REDIS_URL is set (cluster/redis.py).

- rate limits and login throttles: `RateLimitStore` (adiuva_server/ratelimit);
- socket caps promised per account (chat streams): `SocketSlots`, slots held as leases that
  expire when their process dies. Caps that protect one process's own file descriptors
  (connections in all, per client address) stay in that process: http/protocol.py;
- plans: `PlanStore` (chat/plans.py);
- cluster jobs: a `jobs.Lease`, one holder per job at a time (adiuva_server/jobs.py runs them);
- change notices: `Notifier`, publish a payload on a topic, every subscribed process hears it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

from adiuva_server.jobs import Lease, LocalLease

if TYPE_CHECKING:
    from adiuva_server.chat.plans import PlanStore
    from adiuva_server.config import Settings
    from adiuva_server.ratelimit import RateLimitStore

log = logging.getLogger(__name__)


def lease_token() -> str:
    """Names its holder, for an operator reading a lease or slot: host, process, randomness."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"


# -- socket slots (a cap on open sockets per account, for the whole cluster) ----------------------


class SocketSlots(Protocol):
    async def acquire(self, key: str, limit: int) -> object | None:
        """A slot when fewer than `limit` are held under `key`, else None. Hold it while the
        socket is open; a process that dies loses its slots within the lease time."""

    async def release(self, key: str, slot: object) -> None:
        """Never raises: a slot that cannot be given back expires on its own."""


class LocalSocketSlots:
    def __init__(self) -> None:
        self._open: Counter[str] = Counter()

    async def acquire(self, key: str, limit: int) -> object | None:
        if self._open[key] >= limit:
            return None
        self._open[key] += 1
        return key

    async def release(self, key: str, slot: object) -> None:
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]


# -- change notices -------------------------------------------------------------------------------


class Subscription(Protocol):
    async def close(self) -> None: ...


class Notifier(Protocol):
    """Fire-and-forget notices between processes (and within one). Delivery is at most once: a
    process that was cut off from Redis misses what was published meanwhile, so a subscriber
    that caches must also expire what it caches."""

    async def publish(self, topic: str, payload: str) -> None: ...

    async def subscribe(self, topic: str, callback: Callable[[str], None]) -> Subscription:
        """Call `callback(payload)` for every notice on `topic` published after this returns.
        Callbacks run on the event loop: keep them short (drop a cache entry, set an event)."""


class _LocalSubscription:
    def __init__(self, notifier: LocalNotifier, topic: str, callback: Callable[[str], None]) -> None:
        self._notifier, self._topic, self._callback = notifier, topic, callback

    async def close(self) -> None:
        callbacks = self._notifier._callbacks.get(self._topic, [])
        if self._callback in callbacks:
            callbacks.remove(self._callback)


class LocalNotifier:
    def __init__(self) -> None:
        self._callbacks: dict[str, list[Callable[[str], None]]] = {}

    async def publish(self, topic: str, payload: str) -> None:
        for callback in list(self._callbacks.get(topic, ())):
            deliver(topic, callback, payload)

    async def subscribe(self, topic: str, callback: Callable[[str], None]) -> Subscription:
        self._callbacks.setdefault(topic, []).append(callback)
        return _LocalSubscription(self, topic, callback)


def deliver(topic: str, callback: Callable[[str], None], payload: str) -> None:
    try:
        callback(payload)
    except Exception:  # one subscriber's bug must not stop the others hearing it
        log.exception("a subscriber of %r failed", topic)


# -- the set of them ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shared:
    backend: str  # "memory" or "redis", for the admin status
    rate_limits: RateLimitStore
    lease: Lease  # for the cluster jobs
    sockets: SocketSlots
    notifier: Notifier
    # Builds the plan store: PlanCache's signature (builtins, per_user=...).
    plan_store: Callable[..., PlanStore]


@contextlib.asynccontextmanager
async def open_shared(settings: Settings) -> AsyncIterator[Shared]:
    """The in-process set, or the Redis one when REDIS_URL is set. An unreachable Redis at start
    raises ConfigError naming REDIS_URL (the server stops with exit 2)."""
    if not settings.redis_url:
        from adiuva_server.chat.plans import PlanCache
        from adiuva_server.ratelimit import MemoryRateLimitStore

        yield Shared("memory", MemoryRateLimitStore(), LocalLease(), LocalSocketSlots(), LocalNotifier(), PlanCache)
        return
    from adiuva_server.cluster import redis as shared_redis  # imported only when used (~0.15 s)

    async with shared_redis.open_shared(settings) as shared:
        yield shared
