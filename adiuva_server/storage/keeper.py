"""Which blobs may be deleted, and when: the one place that orders object writes, row writes and
object deletions so that no committed row ever points at a missing object.

- An object is stored (durable) before the transaction that references it starts, and it is
  pinned from before it is stored until that transaction has finished, whatever happens to the
  request meanwhile (the transaction runs on as its own task if the request is cancelled).
- An object is deleted only when it is not pinned, no committed row references it, and no
  upload of the same bytes can slip in between (such an upload waits for the deletion and
  then stores the object again).
- Another process (e.g. an admin's sweep) cannot see these pins; it only deletes objects older
  than a grace period, and storing identical bytes again freshens the object's time.
- Other nodes of a cluster see them through `pins` (storage/pins.py): an object is pinned there
  too before it is stored, and deleted only under its shared lock with no pin anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

from adiuva_server.storage.blobs import BlobStore, Staged
from adiuva_server.storage.pins import LocalPins, SharedPins
from adiuva_server.storage.store import StorageStore

T = TypeVar("T")


class BlobKeeper:
    def __init__(self, blobs: BlobStore, store: StorageStore, pins: SharedPins | None = None) -> None:
        self.blobs = blobs
        self.store = store
        self.pins = pins or LocalPins()
        self._pins: Counter[str] = Counter()
        self._deleting: dict[str, asyncio.Future[None]] = {}
        self._writes: set[asyncio.Task] = set()

    def _unpin(self, digest: str) -> None:
        self._pins[digest] -= 1
        if self._pins[digest] <= 0:
            del self._pins[digest]

    async def commit(self, staged: Staged, write: Callable[[], Awaitable[T]]) -> T:
        """Store `staged` durably, then run `write` (the transaction that references it).
        If `write` fails, the object is freed again unless something else references it."""
        digest = staged.digest
        self._pins[digest] += 1
        token = None
        try:
            while (deleting := self._deleting.get(digest)) is not None:
                await asyncio.shield(deleting)
            token = await self.pins.pin([digest])
            await self.blobs.store(staged)
        except BaseException:
            self._unpin(digest)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.pins.unpin(token))
            with contextlib.suppress(Exception):
                await asyncio.shield(self.blobs.discard(staged))
            raise
        task = asyncio.ensure_future(self._then_unpin(write, token))
        self._writes.add(task)
        task.add_done_callback(lambda t: (self._writes.discard(t), self._unpin(digest)))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise  # the transaction finishes on its own; a sweep removes what it leaves unused
        except BaseException:
            await self.release([digest])
            raise

    async def commit_many(self, objects: Sequence[tuple[str, bytes]], write: Callable[[], Awaitable[T]]) -> T:
        """`commit` for bytes already in memory and hashed (a batch): every object is durable
        before `write` starts, and pinned until it has finished."""
        digests = list(dict.fromkeys(d for d, _ in objects))
        for digest in digests:
            self._pins[digest] += 1

        def unpin_all(_: object = None) -> None:
            for digest in digests:
                self._unpin(digest)

        storing: asyncio.Future[None] | None = None
        token = None
        try:
            for digest in digests:
                while (deleting := self._deleting.get(digest)) is not None:
                    await asyncio.shield(deleting)
            token = await self.pins.pin(digests)
            storing = asyncio.ensure_future(self.blobs.put_many(objects))
            await asyncio.shield(storing)
        except BaseException:
            if storing is not None and not storing.done():  # cancelled: let the thread finish first
                await asyncio.wait([storing])
            unpin_all()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.pins.unpin(token))
            with contextlib.suppress(Exception):  # what it put in place, if no row references it
                await asyncio.shield(self.release(digests))
            raise
        task = asyncio.ensure_future(self._then_unpin(write, token))
        self._writes.add(task)
        task.add_done_callback(lambda t: (self._writes.discard(t), unpin_all()))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise  # the transaction finishes on its own; a sweep removes what it leaves unused
        except BaseException:
            await self.release(digests)
            raise

    async def _then_unpin(self, write: Callable[[], Awaitable[T]], token: str | None) -> T:
        """The referencing transaction, then the shared pin goes (whatever its outcome)."""
        try:
            return await write()
        finally:
            with contextlib.suppress(Exception):  # an unpin lost with the database expires
                await self.pins.unpin(token)

    async def release(self, digests: Iterable[str], *, older_than: float | None = None) -> int:
        """Delete those of `digests` that nothing references (and, with `older_than`, that were
        last written before that Unix time). Returns how many objects were deleted."""
        freed = 0
        loop = asyncio.get_running_loop()
        for digest in dict.fromkeys(d for d in digests if d):
            if self._pins.get(digest) or digest in self._deleting:
                continue
            done = loop.create_future()
            self._deleting[digest] = done
            try:
                async with self.pins.deleting(digest) as pinned_elsewhere:
                    if (not pinned_elsewhere and not await self.store.referenced([digest])
                            and await self.blobs.delete(digest, older_than=older_than)):
                        freed += 1
            finally:
                del self._deleting[digest]
                done.set_result(None)
        return freed

    async def drain(self) -> None:
        """Wait for transactions still running on behalf of cancelled requests (at shutdown)."""
        if self._writes:
            await asyncio.wait(list(self._writes))
