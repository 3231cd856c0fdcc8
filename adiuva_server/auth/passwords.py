"""argon2id hashing off the event loop, with a cap on concurrent hashes.

Each hash holds `memory_cost` KiB while it runs and keeps a core busy for ~20 ms, so hashes
run on a small dedicated pool (one per CPU by default): a login storm queues there instead of
stalling other requests or exhausting memory. Past `max_waiting` queued hashes the server
answers 503 with Retry-After rather than building an unbounded queue.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from concurrent.futures import ThreadPoolExecutor

import argon2

from adiuva_server import errors
from adiuva_server.config import Settings


class PasswordHasher:
    def __init__(self, settings: Settings, max_waiting: int = 256) -> None:
        self._ph = argon2.PasswordHasher(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            type=argon2.Type.ID,
        )
        workers = settings.max_concurrent_hashes or os.cpu_count() or 2
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="argon2")
        self._pending = 0
        self._max_waiting = max_waiting + workers
        self._dummy_hash: str | None = None

    async def _run(self, fn, *args):
        if self._pending >= self._max_waiting:
            raise errors.ServiceUnavailable(
                "too many logins in progress; try again shortly", headers={"Retry-After": "1"}
            )
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._pending -= 1

    async def hash(self, password: str) -> str:
        return await self._run(self._ph.hash, password)

    def hash_sync(self, password: str) -> str:
        """For the CLI, which has no event loop to protect."""
        return self._ph.hash(password)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        """Constant work whether or not the account exists: an unknown account is checked
        against a dummy hash so response times do not reveal which emails are registered."""
        if stored_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash(secrets.token_urlsafe(16))
            await self._run(self._verify, self._dummy_hash, password)
            return False
        return await self._run(self._verify, stored_hash, password)

    def _verify(self, stored_hash: str, password: str) -> bool:
        try:
            return self._ph.verify(stored_hash, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        return self._ph.check_needs_rehash(stored_hash)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
