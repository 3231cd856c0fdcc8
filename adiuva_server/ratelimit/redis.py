"""The sliding-window store on Redis, shared by every server process (REDIS_URL).

The same exact log as the in-memory store: a sorted set per key (score: the event's time on the
Redis clock in microseconds, member: its ticket), trimmed, counted and added to in one script,
so concurrent requests on any number of processes cannot get past a limit. Reservations also
sit in a second set (`...:held`) until settled, so a denial can say whether any are in flight;
a refund removes the ticket from both. Both sets expire with their window: `sweep` has nothing
to do.
"""

from __future__ import annotations

import itertools

import redis.asyncio as aioredis

from adiuva_server.cluster import lease_token
from adiuva_server.cluster.redis import NOW, PREFIX, Coalesced, translated, us
from adiuva_server.ratelimit import Decision

# ARGV: limit, window (us), mode ("hit", "check" or "reserve"), ticket.
# Returns {allowed, remaining, retry_after (us), reset_after (us), pending}.
_WINDOW = NOW + """
local limit, window, mode = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local cutoff = string.format('%.0f', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
local n = redis.call('ZCARD', KEYS[1])
local pending = 0
if mode == 'reserve' then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  pending = redis.call('ZCARD', KEYS[2])
end
if mode ~= 'check' and n < limit then
  local ttl = math.ceil(window / 1000)
  redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ttl)
  if mode == 'reserve' then
    redis.call('ZADD', KEYS[2], string.format('%.0f', now), ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ttl)
    pending = pending + 1
  end
  return {1, limit - n - 1, 0, window, pending}
end
local retry, reset = 0, 0
if n >= limit then
  -- one more fits once the (n - limit + 1)-th oldest event leaves the window
  retry = tonumber(redis.call('ZRANGE', KEYS[1], n - limit, n - limit, 'WITHSCORES')[2]) + window - now
end
if n > 0 then
  reset = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]) + window - now
end
return {n < limit and 1 or 0, math.max(0, limit - n), math.max(0, retry), math.max(0, reset), pending}
"""
_SETTLE = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 and ARGV[2] == '0' then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""


class RedisRateLimitStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._window = Coalesced(client, _WINDOW)  # once per request: batched under load
        self._settle = client.register_script(_SETTLE)
        node = lease_token()
        self._tickets = (f"{node}:{n}" for n in itertools.count(1))

    @staticmethod
    def _keys(key: str) -> list[str]:
        base = f"{PREFIX}rl:{{{key}}}"  # one hash tag: both sets on one slot of a Redis Cluster
        return [base, base + ":held"]

    async def _call(self, key: str, limit: int, window: float, mode: str) -> Decision:
        ticket = next(self._tickets)
        with translated():
            allowed, remaining, retry, reset, pending = await self._window(
                keys=self._keys(key), args=[limit, us(window), mode, ticket])
        return Decision(bool(allowed), limit, remaining, retry / 1e6, reset / 1e6, pending,
                        ticket if allowed and mode == "reserve" else None)

    async def hit(self, key: str, limit: int, window: float) -> Decision:
        return await self._call(key, limit, window, "hit")

    async def check(self, key: str, limit: int, window: float) -> Decision:
        return await self._call(key, limit, window, "check")

    async def reserve(self, key: str, limit: int, window: float) -> Decision:
        return await self._call(key, limit, window, "reserve")

    async def settle(self, key: str, ticket: object, *, keep: bool) -> None:
        with translated():
            await self._settle(keys=self._keys(key), args=[str(ticket), "1" if keep else "0"])

    async def reset(self, key: str) -> None:
        with translated():
            await self._client.delete(*self._keys(key))

    async def sweep(self) -> int:
        return 0  # every key expires with its window
