"""The sliding-window store on a controlled clock (the HTTP behaviour is in test_http.py)."""

from adiuva_server.ratelimit import MemoryRateLimitStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sliding_window_counts_retry_after_and_sweep():
    clock = Clock()
    store = MemoryRateLimitStore(clock)
    for i in range(3):
        d = store.hit("k", 3, 60)
        assert d.allowed and d.remaining == 2 - i
        clock.now += 10  # events at 1000, 1010, 1020
    denied = store.hit("k", 3, 60)  # at 1030
    assert not denied.allowed and denied.remaining == 0
    assert denied.retry_after == 30  # the event at 1000 leaves the window at 1060
    assert not store.check("k", 3, 60).allowed
    clock.now = 1060.5
    assert store.hit("k", 3, 60).allowed  # one slot freed, and only one
    assert not store.hit("k", 3, 60).allowed
    store.reset("k")
    assert store.check("k", 3, 60).remaining == 3
    store.hit("a", 5, 60)
    clock.now += 61
    assert store.sweep() == 1 and len(store) == 0
