"""The sliding-window store on a controlled clock (the HTTP behaviour is in test_http.py and
test_auth.py)."""

import asyncio

from adiuva_server.ratelimit import MemoryRateLimitStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_sliding_window_counts_retry_after_and_sweep():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    for i in range(3):
        d = await store.hit("k", 3, 60)
        assert d.allowed and d.remaining == 2 - i
        clock.now += 10  # events at 1000, 1010, 1020
    denied = await store.hit("k", 3, 60)  # at 1030
    assert not denied.allowed and denied.remaining == 0
    assert denied.retry_after == 30  # the event at 1000 leaves the window at 1060
    assert not (await store.check("k", 3, 60)).allowed
    clock.now = 1060.5
    assert (await store.hit("k", 3, 60)).allowed  # one slot freed, and only one
    assert not (await store.hit("k", 3, 60)).allowed
    await store.reset("k")
    assert (await store.check("k", 3, 60)).remaining == 3
    await store.hit("a", 5, 60)
    clock.now += 61
    assert await store.sweep() == 1 and len(store) == 0


async def test_reservations_hold_places_until_settled():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    first = await store.reserve("k", 2, 60)
    clock.now += 1
    second = await store.reserve("k", 2, 60)
    assert first.allowed and second.allowed and first.ticket != second.ticket
    assert second.pending == 2
    # Full while both are in flight, and the denial says a settle may free a place.
    denied = await store.reserve("k", 2, 60)
    assert not denied.allowed and denied.pending == 2 and denied.ticket is None
    assert not (await store.hit("k", 2, 60)).allowed  # plain hits see the held places too
    await store.settle("k", first.ticket, keep=False)  # refunded: as if it never happened
    third = await store.reserve("k", 2, 60)
    assert third.allowed
    await store.settle("k", second.ticket, keep=True)
    await store.settle("k", third.ticket, keep=True)
    # Both kept: plain failures now, nothing in flight, so a denial is final.
    denied = await store.reserve("k", 2, 60)
    assert not denied.allowed and denied.pending == 0
    # The kept event of `second` (made at 1001) is the first to leave the window.
    assert denied.retry_after == 60 - (clock.now - 1001)
    await store.settle("k", 12345, keep=False)  # an unknown ticket changes nothing
    assert not (await store.check("k", 2, 60)).allowed
    clock.now += 61
    assert (await store.reserve("k", 2, 60)).allowed


async def test_reserve_is_atomic_under_concurrency():
    store = MemoryRateLimitStore()

    async def attempt() -> bool:
        d = await store.reserve("k", 10, 60)
        await asyncio.sleep(0)  # the guarded step
        if d.allowed:
            await store.settle("k", d.ticket, keep=True)
        return d.allowed

    results = await asyncio.gather(*[attempt() for _ in range(300)])
    assert sum(results) == 10


async def test_a_reservation_left_unsettled_expires_with_its_window():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    held = await store.reserve("k", 1, 60)
    assert not (await store.reserve("k", 1, 60)).allowed
    clock.now += 61
    again = await store.reserve("k", 1, 60)
    assert again.allowed and again.pending == 1  # the stale one no longer counts
    await store.settle("k", held.ticket, keep=False)  # late: must not refund the new one
    assert not (await store.check("k", 1, 60)).allowed
    clock.now += 61
    assert await store.sweep() == 1 and len(store) == 0


# -- the contract, on every store (real time, short windows) -----------------------------------------

import pytest  # noqa: E402

from adiuva_server.ratelimit import RateLimitStore  # noqa: E402

WINDOW = 1.0


@pytest.fixture(params=["memory", "redis"])
async def store(request):
    """Each RateLimitStore implementation; with Redis, a second client as a second process."""
    if request.param == "memory":
        yield MemoryRateLimitStore()
        return
    from adiuva_server.cluster.redis import connect
    from adiuva_server.ratelimit.redis import RedisRateLimitStore

    client = connect(request.getfixturevalue("redis_url"))
    yield RedisRateLimitStore(client)
    await client.aclose()


async def other_process(store: RateLimitStore, redis_url: str | None):
    """A store that shares state with `store` as another server process would."""
    if isinstance(store, MemoryRateLimitStore):
        return store, None
    from adiuva_server.cluster.redis import connect
    from adiuva_server.ratelimit.redis import RedisRateLimitStore

    client = connect(redis_url)
    return RedisRateLimitStore(client), client


async def test_contract_sliding_window(store):
    for i in range(3):
        d = await store.hit("k", 3, WINDOW)
        assert d.allowed and d.remaining == 2 - i and d.retry_after == 0
    await asyncio.sleep(0.3)
    denied = await store.hit("k", 3, WINDOW)
    assert not denied.allowed and denied.remaining == 0 and denied.limit == 3
    # The oldest event leaves the window ~0.7 s from now; the last one ~0.7 s too.
    assert 0.4 < denied.retry_after <= 0.71 and 0.4 < denied.reset_after <= 0.71
    checked = await store.check("k", 3, WINDOW)
    assert not checked.allowed and checked.remaining == 0  # check counted nothing: still full
    assert (await store.check("other", 3, WINDOW)).remaining == 3
    await asyncio.sleep(denied.retry_after + 0.05)
    assert (await store.hit("k", 3, WINDOW)).allowed
    await store.reset("k")
    assert (await store.check("k", 3, WINDOW)).remaining == 3


async def test_contract_reservations(store):
    first = await store.reserve("k", 2, 60)
    second = await store.reserve("k", 2, 60)
    assert first.allowed and second.allowed and first.ticket != second.ticket
    assert first.pending == 1 and second.pending == 2
    denied = await store.reserve("k", 2, 60)
    assert not denied.allowed and denied.pending == 2 and denied.ticket is None
    assert not (await store.hit("k", 2, 60)).allowed  # plain hits see held places
    await store.settle("k", first.ticket, keep=False)  # refunded
    third = await store.reserve("k", 2, 60)
    assert third.allowed
    await store.settle("k", second.ticket, keep=True)
    await store.settle("k", third.ticket, keep=True)
    denied = await store.reserve("k", 2, 60)
    assert not denied.allowed and denied.pending == 0  # nothing in flight: a final denial
    assert 59 < denied.retry_after <= 60
    await store.settle("k", "no-such-ticket" if not isinstance(store, MemoryRateLimitStore) else 10**9, keep=False)
    assert not (await store.check("k", 2, 60)).allowed


async def test_contract_unsettled_reservation_expires_with_its_window(store):
    held = await store.reserve("k", 1, WINDOW)
    assert not (await store.reserve("k", 1, WINDOW)).allowed
    await asyncio.sleep(WINDOW + 0.05)
    again = await store.reserve("k", 1, WINDOW)
    assert again.allowed and again.pending == 1
    await store.settle("k", held.ticket, keep=False)  # late: must not refund the new one
    assert not (await store.check("k", 1, WINDOW)).allowed


async def test_contract_reserve_is_atomic_across_processes(store, request):
    """300 concurrent guarded steps on two processes sharing the store: exactly `limit` run."""
    url = request.getfixturevalue("redis_url") if not isinstance(store, MemoryRateLimitStore) else None
    second, client = await other_process(store, url)
    ran = 0

    async def attempt(s: RateLimitStore) -> None:
        nonlocal ran
        d = await s.reserve("k", 10, 60)
        if d.allowed:
            ran += 1
            await asyncio.sleep(0.01)  # the guarded step
            await s.settle("k", d.ticket, keep=True)

    try:
        await asyncio.gather(*[attempt(store if i % 2 else second) for i in range(300)])
    finally:
        if client is not None:
            await client.aclose()
    assert ran == 10
    assert (await store.check("k", 10, 60)).remaining == 0


async def test_redis_keys_expire_with_their_window(redis_url):
    from adiuva_server.cluster.redis import connect
    from adiuva_server.ratelimit.redis import RedisRateLimitStore

    client = connect(redis_url)
    try:
        store = RedisRateLimitStore(client)
        await store.hit("user:a", 5, 60)
        d = await store.reserve("login:addr:1.2.3.4", 5, 0.5)
        keys = sorted(k.decode() for k in await client.keys("*"))
        assert keys == ["adiuva:rl:{login:addr:1.2.3.4}", "adiuva:rl:{login:addr:1.2.3.4}:held", "adiuva:rl:{user:a}"]
        assert 59_000 < await client.pttl("adiuva:rl:{user:a}") <= 60_000
        assert 0 < await client.pttl("adiuva:rl:{login:addr:1.2.3.4}:held") <= 500
        await asyncio.sleep(0.6)
        assert sorted(k.decode() for k in await client.keys("*")) == ["adiuva:rl:{user:a}"]  # nothing left behind
        await store.settle("login:addr:1.2.3.4", d.ticket, keep=True)  # after expiry: creates nothing
        assert await client.exists("adiuva:rl:{login:addr:1.2.3.4}") == 0
        assert await store.sweep() == 0
    finally:
        await client.aclose()


async def test_redis_store_reloads_its_script_and_counts_each_call_once(redis_url):
    """After a Redis restart or SCRIPT FLUSH the script is gone: calls batched together load it
    again and only the calls that did not run are sent again."""
    from adiuva_server.cluster.redis import connect
    from adiuva_server.ratelimit.redis import RedisRateLimitStore

    client = connect(redis_url)
    try:
        store = RedisRateLimitStore(client)
        await store.hit("k", 100, 60)
        await client.script_flush()
        decisions = await asyncio.gather(*[store.hit("k", 100, 60) for _ in range(20)])
        assert all(d.allowed for d in decisions)
        assert (await store.check("k", 100, 60)).remaining == 100 - 21
        await client.script_flush()
        assert (await store.hit("k", 100, 60)).remaining == 100 - 22  # alone: the same
    finally:
        await client.aclose()
