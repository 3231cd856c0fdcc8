"""Background jobs, registered in one place (`compose.py`) and run by one `Jobs` runner.

A job is a name, an interval and an async function. Each runs in its own task: after
`first` seconds, then every `interval` seconds; a failure is logged and retried at the next
interval, never the end of the job. With several nodes, a job must run once per cluster: the
runner asks its `Lease` before each run (one process: `LocalLease`, always granted).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Lease(Protocol):
    """Who may run a cluster job now. `acquire` returns a held lease or None (someone else runs
    it); `release` gives it back (only the holder's)."""

    async def acquire(self, name: str, seconds: float) -> object | None: ...

    async def release(self, held: object) -> None: ...


class LocalLease:
    """One process: every job is this process's own."""

    async def acquire(self, name: str, seconds: float) -> object | None:
        return name

    async def release(self, held: object) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    interval: float
    run: Callable[[], Awaitable[object]]
    first: float = 0.0
    cluster: bool = True  # False: every node runs it (e.g. its own in-memory sweeps)


class Jobs:
    def __init__(self, lease: Lease | None = None) -> None:
        self.lease = lease or LocalLease()
        self.jobs: list[Job] = []
        self._tasks: list[asyncio.Task[None]] = []

    def every(self, name: str, interval: float, run: Callable[[], Awaitable[object]], *,
              first: float = 0.0, cluster: bool = True) -> None:
        if interval <= 0:
            return  # switched off by its setting
        self.jobs.append(Job(name, interval, run, first, cluster))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop(job), name=f"job:{job.name}") for job in self.jobs]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def run_once(self, job: Job) -> bool:
        """Run `job` now if this node may (its lease); return whether it ran."""
        held = await self.lease.acquire(job.name, job.interval) if job.cluster else job.name
        if held is None:
            return False
        try:
            await job.run()
        finally:
            if job.cluster:
                await self.lease.release(held)
        return True

    async def _loop(self, job: Job) -> None:
        await asyncio.sleep(job.first)
        while True:
            try:
                await self.run_once(job)
            except Exception:
                log.exception("background job %s failed; next attempt in %.0f s", job.name, job.interval)
            await asyncio.sleep(job.interval)
