"""Background jobs: every periodic job of the server, registered here, in one place, and each run
by one process of the cluster at a time.

A job runs where its lease is held (`cluster.Leases`: in process by default, Redis when
REDIS_URL is set; a PostgreSQL advisory lock can implement the same interface). Every process
tries to take each job's lease; the one that gets it runs the job's schedule and renews the lease
every LEASE_SECONDS/3 while it does. The others try again every RETRY_SECONDS, so when the holder
stops (its lease released) or dies (its lease expires) another one takes over. A holder that
cannot renew stops the job before its lease can run out, so two never run it at once.
Jobs marked `per_node` tidy this process's own state and run in every process, without a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from adiuva_server.cluster import Leases
from adiuva_server.keys import AUTH, DB, RATE_LIMITS, SETTINGS, SHARED, STORAGE

log = logging.getLogger(__name__)

LEASE_SECONDS = 30.0
RETRY_SECONDS = 10.0
HOUSEKEEPING_SECONDS = 60.0
SWEEP_SECONDS = 6 * 3600.0


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    run: Callable[[], Awaitable[object]]
    every: float  # seconds between the end of one run and the start of the next
    first_after: float = 0.0  # seconds from taking the lease to the first run
    per_node: bool = False


def registered(app: web.Application) -> list[Job]:
    """Every periodic job of the server."""
    from adiuva_server import server_backup
    from adiuva_server.storage import maintenance

    settings = app[SETTINGS]

    async def purge_sessions() -> None:
        purged = await app[AUTH].store.purge_expired_sessions(int(time.time()))
        if purged:
            log.debug("purged %d expired refresh tokens", purged)

    async def sweep_storage() -> None:
        # The keeper's pins protect objects whose rows are being written; the grace period
        # spares temporary files of uploads still being received.
        service = app[STORAGE]
        report = await maintenance.sweep(app[DB], service.blobs, object_grace_seconds=0, keeper=service.keeper)
        if report.objects_removed or report.temporary_removed:
            log.info("storage sweep removed %d object(s), %d temporary file(s)",
                     report.objects_removed, report.temporary_removed)

    async def purge_tombstones() -> None:
        forgotten = await app[STORAGE].purge_tombstones()
        if forgotten:
            log.info("forgot %d deleted record(s) older than the tombstone retention", forgotten)

    jobs = [
        # Idle in-memory rate-limit windows are this process's own (a Redis store has none).
        Job("ratelimit.sweep", lambda: app[RATE_LIMITS].sweep(), HOUSEKEEPING_SECONDS, per_node=True),
        Job("auth.purge_sessions", purge_sessions, HOUSEKEEPING_SECONDS),
        # Unreferenced objects (a crash, a deleted user) and abandoned temporary files, and the
        # tombstones past their retention: at start, then every few hours.
        Job("storage.sweep", sweep_storage, SWEEP_SECONDS),
        Job("storage.tombstones", purge_tombstones, SWEEP_SECONDS),
    ]
    if settings.backup_interval > 0:
        jobs.append(Job("server.backup", lambda: server_backup.scheduled_backup(settings),
                        settings.backup_interval, first_after=settings.backup_interval))
    return jobs


class JobRunner:
    def __init__(self, leases: Leases, *, lease_seconds: float = LEASE_SECONDS, retry_seconds: float = RETRY_SECONDS) -> None:
        self.leases = leases
        self.lease_seconds = lease_seconds
        self.retry_seconds = retry_seconds

    async def keep(self, job: Job) -> None:
        """Run `job` whenever this process holds its lease; until cancelled."""
        if job.per_node:
            await schedule(job)
            return
        while True:
            try:
                token = await self.leases.acquire(job.name, self.lease_seconds)
            except Exception as exc:
                log.warning("job %s: cannot take its lease (%s); retrying", job.name, exc)
                token = None
            if token is None:
                await asyncio.sleep(self.retry_seconds)
                continue
            try:
                await self._hold(job, token)
            finally:
                with contextlib.suppress(Exception):
                    await self.leases.release(job.name, token)

    async def _hold(self, job: Job, token: str) -> None:
        loop = asyncio.get_running_loop()
        ttl = self.lease_seconds
        valid_until = loop.time() + ttl
        body = asyncio.create_task(schedule(job), name=f"adiuva-job-{job.name}")
        try:
            while True:
                await asyncio.wait({body}, timeout=ttl / 3)
                if body.done():
                    return
                asked = loop.time()
                try:
                    if not await self.leases.renew(job.name, token, ttl):
                        log.warning("job %s: lost its lease; another process may run it now", job.name)
                        return
                    valid_until = asked + ttl
                except Exception as exc:
                    # Unknown whether it was renewed: stop while it surely still holds (the next
                    # attempt would come too close to its end).
                    if valid_until - loop.time() < ttl / 2:
                        log.warning("job %s: cannot renew its lease (%s); stopping it here", job.name, exc)
                        return
        finally:
            body.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await body


async def schedule(job: Job) -> None:
    await asyncio.sleep(job.first_after)
    while True:
        try:
            await job.run()
        except Exception:
            log.exception("job %s failed; next run in %.0f s", job.name, job.every)
        await asyncio.sleep(job.every)


async def run_jobs(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx, after every service the jobs use: runs them until the server stops."""
    runner = JobRunner(app[SHARED].leases)
    tasks = [asyncio.create_task(runner.keep(job), name=f"adiuva-lease-{job.name}") for job in registered(app)]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
