"""The shared set on Redis or Valkey (REDIS_URL), through redis-py's asyncio client.

Every operation that must be atomic across processes is one Lua script (Redis runs a script
alone, start to end), and every script reads the clock of the Redis server (`TIME`), so the
processes never compare their own clocks. Keys start with `adiuva:` and carry a TTL: nothing
stays after its window or lease. Keys that one script touches together share a hash tag
(`{...}`), as a Redis Cluster would need; `connect` makes a client for one Redis (a primary,
or whatever address a proxy or Sentinel setup gives it).

Redis lost at run time: calls raise `errors.SharedStateUnavailable` (503 with Retry-After),
never a 500; limits are refused, not skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from adiuva_server import errors
from adiuva_server.cluster import Shared, Subscription, deliver, lease_token
from adiuva_server.config import Settings
from adiuva_server.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "adiuva:"
# A dead Redis must turn into a quick 503, not a request that hangs: short timeouts, and one
# immediate retry on a dropped connection (Redis restarted, an idle connection closed).
SOCKET_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
# The Redis clock in microseconds: exact in a double (< 2^53) and in scores.
NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"


def connect(url: str) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT, retry=Retry(NoBackoff(), 1), health_check_interval=30,
    )
    return aioredis.Redis.from_pool(pool)  # closes its pool when it is closed


def where(url: str) -> str:
    """The URL without its credentials, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Redis errors become a 503 (with Retry-After) for the client."""
    try:
        yield
    except RedisError as exc:
        log.warning("Redis unavailable: %s", exc)
        raise errors.SharedStateUnavailable("the shared state store (Redis) is not answering; try again shortly") from exc


def us(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1_000_000))


class Coalesced:
    """One script, called by many requests at once: the calls issued in one turn of the event
    loop go to Redis as one pipeline (one write, one read) instead of a round trip each. Under
    load that is most of the cost of a call (syscalls are expensive); alone, a call waits for
    nothing but the next turn of the loop. Each call stays one atomic script on Redis."""

    def __init__(self, client: aioredis.Redis, source: str) -> None:
        self._client = client
        self._script = client.register_script(source)
        self._pending: list[tuple[list, list, asyncio.Future]] = []
        self._sending: set[asyncio.Task] = set()  # a task must stay referenced until it is done

    async def __call__(self, keys: list, args: list):
        future = asyncio.get_running_loop().create_future()
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((keys, args, future))
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[list, list, asyncio.Future]]) -> None:
        try:
            results = await self._execute(batch)
        except asyncio.CancelledError:  # the loop is closing
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            results = [exc] * len(batch)
        for (*_, future), result in zip(batch, results):
            if future.done():  # its caller gave up (cancelled)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[tuple[list, list, asyncio.Future]]) -> list:
        results = await self._pipeline(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # Redis restarted (or SCRIPT FLUSH): load it, run only the calls that did not run
            await self._client.script_load(self._script.script)
            again = await self._pipeline([batch[i] for i in missing])
            for i, r in zip(missing, again):
                results[i] = r
        return results

    async def _pipeline(self, batch: list[tuple[list, list, asyncio.Future]]) -> list:
        if len(batch) == 1:  # alone: a plain call costs less than a pipeline of one
            keys, args, _ = batch[0]
            try:
                return [await self._client.evalsha(self._script.sha, len(keys), *keys, *args)]
            except NoScriptError as exc:
                return [exc]
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(self._script.sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)




# -- leases ---------------------------------------------------------------------------------------------

_RENEW_LEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
# The end of a run: only the holder (its token) may end the lease. What is left of the job's
# interval stays on the key, so no node runs the job again before the interval is over: once
# per interval for the cluster, not once per node.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('DEL', KEYS[1])
"""


@dataclasses.dataclass(eq=False)
class HeldLease:
    name: str
    token: str
    interval: float
    started: float  # loop time
    lost: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # jobs.py stops the run
    renewer: asyncio.Task | None = None
    ended: bool = False


class RedisLease:
    """jobs.Lease on Redis: `SET key token NX PX ttl` takes it; while the run goes on, a task
    renews it every ttl/3 (compare-and-PEXPIRE), so a holder killed mid-run frees it within
    `ttl`; the end of the run (compare-and-PEXPIRE or DEL) keeps the key for what is left of
    the interval. A holder that cannot renew sets `lost` before its lease could run out."""

    def __init__(self, client: aioredis.Redis, ttl: float = 30.0) -> None:
        self._client = client
        self.ttl = ttl
        self._renew = client.register_script(_RENEW_LEASE)
        self._release = client.register_script(_RELEASE_LEASE)

    @staticmethod
    def key(name: str) -> str:
        return f"{PREFIX}lease:{name}"

    async def acquire(self, name: str, seconds: float) -> HeldLease | None:
        token = lease_token()
        with translated():
            if not await self._client.set(self.key(name), token, nx=True, px=max(1, math.ceil(self.ttl * 1000))):
                return None
        loop = asyncio.get_running_loop()
        held = HeldLease(name, token, seconds, loop.time())
        held.renewer = asyncio.create_task(self._keep(held), name=f"adiuva-lease-{name}")
        return held

    async def _keep(self, held: HeldLease) -> None:
        loop = asyncio.get_running_loop()
        valid_until = loop.time() + self.ttl
        while not held.ended:
            await asyncio.sleep(self.ttl / 3)
            asked = loop.time()
            try:
                if not await self._renew(keys=[self.key(held.name)], args=[held.token, math.ceil(self.ttl * 1000)]):
                    log.warning("job %s: its lease was lost; stopping the run", held.name)
                    held.lost.set()
                    return
                valid_until = asked + self.ttl
            except RedisError as exc:
                # Unknown whether it was renewed: stop while it surely still holds (the next
                # attempt would come too close to its end).
                if valid_until - loop.time() < self.ttl / 2:
                    log.warning("job %s: cannot renew its lease (%s); stopping the run", held.name, exc)
                    held.lost.set()
                    return

    async def release(self, held: object) -> None:
        assert isinstance(held, HeldLease)
        held.ended = True
        if held.renewer is not None:
            held.renewer.cancel()
        left = held.interval - (asyncio.get_running_loop().time() - held.started)
        # In a task of its own: a release runs when the server stops too, and a cancellation
        # that lands as redis-py's send completes is swallowed by Python 3.11's asyncio.wait_for
        # (gh-86296; Jobs.stop then hung). Here it reaches this frame, and the release finishes.
        ending = asyncio.ensure_future(self._release(keys=[self.key(held.name)], args=[held.token, max(0, math.floor(left * 1000))]))
        await asyncio.wait({ending}, timeout=SOCKET_TIMEOUT * 2)
        if not ending.done() or ending.exception() is not None:  # it expires on its own
            log.warning("job %s: could not end its lease (it expires within %.0f s)", held.name, self.ttl)


# -- socket slots -------------------------------------------------------------------------------------

# A sorted set per key: member = slot, score = when its lease runs out (Redis clock, us).
_ACQUIRE_SLOT = NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) / 1000))
return 1
"""
# Renewing re-adds a slot that expired meanwhile (Redis was away): its socket is still open.
_RENEW_SLOT = NOW + """
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[1])), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000))
return 1
"""


class RedisSocketSlots:
    """Slots as leases: each expires `ttl` seconds after its last renewal, and one task renews
    all of this process's slots every ttl/3 (one pipelined round trip). A process killed with
    its sockets open frees their slots within `ttl`."""

    def __init__(self, client: aioredis.Redis, ttl: float = 30.0) -> None:
        self._client = client
        self.ttl = ttl
        self._acquire = client.register_script(_ACQUIRE_SLOT)
        self._renew = client.register_script(_RENEW_SLOT)
        self._held: dict[str, str] = {}  # slot -> key
        node = lease_token()
        self._ids = (f"{node}:{n}" for n in itertools.count(1))
        self._renewer: asyncio.Task | None = None

    @staticmethod
    def _key(key: str) -> str:
        return f"{PREFIX}slots:{{{key}}}"

    async def acquire(self, key: str, limit: int) -> object | None:
        slot = next(self._ids)
        with translated():
            if not await self._acquire(keys=[self._key(key)], args=[limit, us(self.ttl), slot]):
                return None
        self._held[slot] = key
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever(), name="adiuva-socket-slots")
        return slot

    async def release(self, key: str, slot: object) -> None:
        self._held.pop(slot, None)  # type: ignore[call-overload]
        try:
            await self._client.zrem(self._key(key), slot)  # type: ignore[arg-type]
        except RedisError as exc:
            log.warning("could not release a socket slot (it expires within %.0f s): %s", self.ttl, exc)

    async def renew_all(self) -> None:
        if not self._held:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for slot, key in list(self._held.items()):
                await self._renew(keys=[self._key(key)], args=[us(self.ttl), slot], client=pipe)
            await pipe.execute()

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew_all()
            except RedisError as exc:
                log.warning("could not renew socket slots: %s", exc)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer


# -- change notices -----------------------------------------------------------------------------------


class _RedisSubscription:
    def __init__(self, notifier: RedisNotifier, channel: str, callback: Callable[[str], None]) -> None:
        self._notifier, self._channel, self._callback = notifier, channel, callback

    async def close(self) -> None:
        await self._notifier._unsubscribe(self._channel, self._callback)


class RedisNotifier:
    """PUBLISH on `adiuva:notify:<topic>`; one pub/sub connection per process, read by one task
    that calls the subscribers. redis-py subscribes again by itself after a reconnect."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pubsub = client.pubsub()
        self._callbacks: dict[str, list[Callable[[str], None]]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task | None = None

    @staticmethod
    def channel(topic: str) -> str:
        return f"{PREFIX}notify:{topic}"

    async def publish(self, topic: str, payload: str) -> None:
        with translated():
            await self._client.publish(self.channel(topic), payload.encode())

    async def subscribe(self, topic: str, callback: Callable[[str], None]) -> Subscription:
        channel = self.channel(topic)
        callbacks = self._callbacks.setdefault(channel, [])
        callbacks.append(callback)
        subscription = _RedisSubscription(self, channel, callback)
        if len(callbacks) > 1:
            return subscription
        confirmed = self._confirmed[channel] = asyncio.Event()
        try:
            with translated():
                await self._pubsub.subscribe(channel)
            if self._reader is None:
                self._reader = asyncio.create_task(self._read(), name="adiuva-notifier")
            # Once Redis confirms, every later PUBLISH reaches us.
            await asyncio.wait_for(confirmed.wait(), SOCKET_TIMEOUT * 2)
        except BaseException as exc:
            await subscription.close()
            if isinstance(exc, TimeoutError):
                raise errors.SharedStateUnavailable("Redis did not confirm the subscription") from None
            raise
        return subscription

    async def _unsubscribe(self, channel: str, callback: Callable[[str], None]) -> None:
        callbacks = self._callbacks.get(channel, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if not callbacks and channel in self._callbacks:
            del self._callbacks[channel]
            self._confirmed.pop(channel, None)
            with contextlib.suppress(RedisError):
                await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except RedisError as exc:
                log.warning("change notices: lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(1.0)
                continue
            if message is None:
                continue
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            if message["type"] == "subscribe" and channel in self._confirmed:
                self._confirmed[channel].set()
            elif message["type"] == "message":
                payload = message["data"].decode("utf-8", "replace")
                for callback in list(self._callbacks.get(channel, ())):
                    deliver(channel, callback, payload)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        with contextlib.suppress(RedisError):
            await self._pubsub.aclose()


# -- the set ------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def open_shared(settings: Settings) -> AsyncIterator[Shared]:
    from adiuva_server.chat.redis_plans import RedisPlanStore
    from adiuva_server.ratelimit.redis import RedisRateLimitStore

    client = connect(settings.redis_url)
    try:
        try:
            await client.ping()
        except RedisError as exc:
            raise ConfigError(f"REDIS_URL: cannot use Redis at {where(settings.redis_url)}: {exc}") from None
        sockets, notifier = RedisSocketSlots(client), RedisNotifier(client)
        assert settings.jwt_secret, "resolve the JWT secret first: it keys the plans kept in Redis"
        plans = functools.partial(RedisPlanStore, client, settings.jwt_secret)
        try:
            yield Shared("redis", RedisRateLimitStore(client), RedisLease(client), sockets, notifier, plans)
        finally:
            await sockets.close()
            await notifier.close()
    finally:
        await client.aclose()
