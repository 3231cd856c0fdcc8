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
