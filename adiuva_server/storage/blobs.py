"""The blob store: opaque bytes named by their SHA-256, written once, never changed.

`BlobStore` is the interface the storage service relies on; `FileBlobStore` keeps objects on
the local filesystem, `storage.s3.S3BlobStore` in an S3-compatible bucket. An upload
is received into a temporary object while it is hashed (`receive`), then made durable under
its digest (`store`) or thrown away (`discard`). The store knows nothing about references:
which objects may be deleted is decided by `storage.keeper`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from adiuva_server import errors

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

DIGEST = re.compile(r"^[0-9a-f]{64}$")
# Bytes handed to a worker thread at a time: large enough that the thread hand-off (~0.1 ms)
# is noise, small enough that memory stays flat (at most two buffers per upload in flight).
WRITE_BUFFER = 1024 * 1024
TEMP_PREFIX = "upload-"
# The lock file that orders storing against deleting across processes (flock):
# - storing an object (rename into place, or freshening an existing one) holds it shared;
# - the server's own deletions hold it shared (the keeper's pins already order them against
#   the server's stores);
# - a deletion by age (`older_than`, what a sweep from another process relies on) holds it
#   exclusive around its check-and-unlink, so it cannot unlink an object that a store has
#   just freshened for a row about to be committed;
# - every deletion also holds PAUSE_LOCK shared first, which a server backup holds exclusive.
# Each acquisition opens its own descriptor (flock is per open file description), and the locks
# are always taken in the order PAUSE_LOCK, then DELETION_LOCK, so there is no lock-order cycle.
DELETION_LOCK = "deletions.lock"
# Held shared by every deletion and exclusively by a server backup while it snapshots the
# database and links the objects the snapshot references: uploads never wait for a backup.
PAUSE_LOCK = "backup-pause.lock"
# Threads that may wait on these locks. Not the loop's default executor: an in-process server
# backup holds PAUSE_LOCK exclusively while it needs default-executor threads, so deletions
# waiting there could starve it of threads and never be released.
LOCKING_THREADS = 8
# Threads that write and fsync the objects of a batch in parallel: concurrent fsyncs share the
# filesystem's journal commits (measured here: 1,000 objects 0.9 s one by one, ~0.15 s on 8).
BATCH_WRITE_THREADS = 8


@dataclass(frozen=True, slots=True)
class Staged:
    """Bytes received and hashed but not yet stored under their digest."""

    digest: str
    size: int
    token: str  # implementation detail of the store (the temp file's path for FileBlobStore)


class BlobStore(Protocol):
    async def receive(self, chunks: AsyncIterable[bytes], max_bytes: int) -> Staged:
        """Consume `chunks` into a temporary object while hashing it. Raises PayloadTooLarge
        past `max_bytes`; on any failure nothing is left behind."""

    async def store(self, staged: Staged) -> None:
        """Make a staged object durable under its digest (a no-op apart from freshening it
        when identical bytes are already stored). Consumes the staged object."""

    async def discard(self, staged: Staged) -> None: ...

    async def put_many(self, objects: Sequence[tuple[str, bytes]]) -> None:
        """Make each (digest, bytes) durable under its digest, as `store` does (the caller has
        hashed the bytes; identical objects already stored are freshened). On failure, objects
        already put in place stay: the caller releases what no row references."""

    async def read_many(self, digests: Sequence[str]) -> list[bytes | None]:
        """The bytes of each object (None where it is missing), read off the event loop."""

    async def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        """Remove an object (only if not modified since `older_than`, a Unix time, when given)."""

    def local_path(self, digest: str) -> Path:
        """Where the object lives on this machine (downloads are served with sendfile).
        FileBlobStore only: an S3 store has no local path (use `open_range`)."""

    async def size(self, digest: str) -> int | None:
        """The object's size in bytes, or None if it is missing."""

    def open_range(self, digest: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """The bytes [start, end) of an object (to its end when `end` is None), streamed in
        chunks. Raises FileNotFoundError when the object is missing."""

    async def size_and_hash(self, digest: str) -> tuple[int, str] | None:
        """Re-read an object: its size and actual SHA-256, or None if it is missing."""

    def scan_async(self) -> AsyncIterator[list[tuple[str, float]]]:
        """Every stored object as (digest, mtime), in batches."""

    async def sweep_temporary(self, older_than: float) -> int:
        """Remove abandoned temporary objects last written before `older_than`."""


class FileBlobStore:
    """Objects at `<root>/objects/<first two hex digits>/<digest>`, temporary files in
    `<root>/tmp` on the same filesystem (so the final rename is atomic). Every object and the
    folder entry that names it are fsynced before `store` returns."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self._locking = ThreadPoolExecutor(LOCKING_THREADS, thread_name_prefix="blob-lock")
        self._writing = ThreadPoolExecutor(BATCH_WRITE_THREADS, thread_name_prefix="blob-write")

    def open(self) -> None:
        """Blocking: create the folders (0700)."""
        for d in (self.root, self.objects, self.tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def local_path(self, digest: str) -> Path:
        if not DIGEST.fullmatch(digest):  # never let a name reach the filesystem unchecked
            raise ValueError(f"not a SHA-256 hex digest: {digest!r}")
        return self.objects / digest[:2] / digest

    # -- upload -------------------------------------------------------------------------------

    async def receive(self, chunks: AsyncIterable[bytes], max_bytes: int) -> Staged:
        loop = asyncio.get_running_loop()
        fd, path = await loop.run_in_executor(None, self._new_temp)
        hasher = hashlib.sha256()
        size = 0
        parts: list[bytes] = []
        buffered = 0
        pending: asyncio.Future[None] | None = None
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise errors.PayloadTooLarge(f"the body is larger than the limit of {max_bytes} bytes")
                parts.append(chunk)
                buffered += len(chunk)
                if buffered >= WRITE_BUFFER:
                    # Double buffering: the thread hashes and writes one buffer while the
                    # event loop receives the next.
                    if pending is not None:
                        await pending
                    pending = loop.run_in_executor(None, _absorb, fd, hasher, parts)
                    parts, buffered = [], 0
            if pending is not None:
                await pending
                pending = None
            await loop.run_in_executor(None, _finish, fd, hasher, parts)
        except BaseException:
            if pending is not None:  # the thread must be done with fd before it is closed
                await asyncio.wait([pending])
            await _shielded(loop.run_in_executor(None, _close_and_remove, fd, path))
            raise
        await loop.run_in_executor(None, os.close, fd)
        return Staged(hasher.hexdigest(), size, path)

    def _new_temp(self) -> tuple[int, str]:
        return tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.tmp)

    async def store(self, staged: Staged) -> None:
        await asyncio.get_running_loop().run_in_executor(self._locking, self._store, staged)

    def _store(self, staged: Staged) -> None:
        final = self.local_path(staged.digest)
        # Shared: stores run in parallel, but never between a deletion by age's check of the
        # object's mtime and its unlink (see DELETION_LOCK).
        with _file_lock(self.root / DELETION_LOCK, exclusive=False):
            if final.exists():
                # Identical bytes are kept once. Freshen the object so a sweep running in another
                # process (which goes by age) leaves it alone until the new row is committed.
                os.unlink(staged.token)
                os.utime(final)
                return
            folder = final.parent
            if not folder.exists():
                folder.mkdir(mode=0o700, exist_ok=True)
                _fsync_dir(self.objects)
            os.rename(staged.token, final)
            _fsync_dir(folder)

    async def discard(self, staged: Staged) -> None:
        await asyncio.get_running_loop().run_in_executor(None, _remove, staged.token)

    async def put_many(self, objects: Sequence[tuple[str, bytes]]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._locking, self._put_many, objects)

    def _put_many(self, objects: Sequence[tuple[str, bytes]]) -> None:
        wanted = dict(objects)  # identical bytes are kept once
        temps: dict[str, str] = {}
        try:
            # The slow part (a write and an fsync per object) outside the lock, in parallel.
            missing = [d for d in wanted if not self.local_path(d).exists()]
            written, failure = self._parallel(self._write_temp, [wanted[d] for d in missing])
            temps.update((d, t) for d, t in zip(missing, written) if t is not None)
            if failure is not None:
                raise failure
            folders: set[Path] = set()
            new_folder = False
            # As in `_store`: shared, so no deletion by age falls between a freshen and its row.
            with _file_lock(self.root / DELETION_LOCK, exclusive=False):
                for digest, data in wanted.items():
                    final = self.local_path(digest)
                    if final.exists():
                        os.utime(final)
                        continue
                    temp = temps.pop(digest, None) or self._write_temp(data)  # deleted meanwhile: rare
                    if not final.parent.exists():
                        final.parent.mkdir(mode=0o700, exist_ok=True)
                        new_folder = True
                    os.rename(temp, final)
                    folders.add(final.parent)
                if new_folder:
                    _fsync_dir(self.objects)
                _, failure = self._parallel(_fsync_dir, list(folders))  # once per folder, not per object
                if failure is not None:
                    raise failure
        finally:
            for temp in temps.values():
                _remove(temp)

    def _parallel(self, fn: Callable[[Any], Any], args: list) -> tuple[list, BaseException | None]:
        """Blocking: `fn` over `args` on the batch writers, waiting for every call even when one
        fails (so nothing is created after the caller has cleaned up). Returns the results in
        order (None where a call failed) and the first failure."""
        futures = [self._writing.submit(fn, a) for a in args]
        results: list = []
        failure: BaseException | None = None
        for f in futures:
            try:
                results.append(f.result())
            except BaseException as exc:
                results.append(None)
                failure = failure or exc
        return results, failure

    def _write_temp(self, data: bytes) -> str:
        fd, path = self._new_temp()
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            _remove(path)
            raise
        os.close(fd)
        return path

    async def read_many(self, digests: Sequence[str]) -> list[bytes | None]:
        return await asyncio.get_running_loop().run_in_executor(None, self._read_many, digests)

    def _read_many(self, digests: Sequence[str]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for digest in digests:
            try:
                with open(self.local_path(digest), "rb", buffering=0) as fh:
                    found.append(fh.read())
            except FileNotFoundError:
                found.append(None)
        return found

    # -- maintenance ----------------------------------------------------------------------------

    async def delete(self, digest: str, *, older_than: float | None = None) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._locking, self._delete, digest, older_than)

    def _delete(self, digest: str, older_than: float | None) -> bool:
        path = self.local_path(digest)
        # Every deletion waits while a server backup links objects (PAUSE_LOCK); by age it is
        # exclusive, so no store freshens the object between the check and the unlink.
        with _file_lock(self.root / PAUSE_LOCK, exclusive=False), \
                _file_lock(self.root / DELETION_LOCK, exclusive=older_than is not None):
            try:
                if older_than is not None and path.stat().st_mtime >= older_than:
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    @contextlib.contextmanager
    def deletions_paused(self) -> Iterator[None]:
        """Blocking: while held, no process deletes an object from this store (a server backup
        holds it while it links the objects its database snapshot references)."""
        with _file_lock(self.root / PAUSE_LOCK, exclusive=True):
            yield

    async def size_and_hash(self, digest: str) -> tuple[int, str] | None:
        return await asyncio.get_running_loop().run_in_executor(None, self._size_and_hash, digest)

    def _size_and_hash(self, digest: str) -> tuple[int, str] | None:
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(self.local_path(digest), "rb", buffering=0) as fh:
                while block := fh.read(WRITE_BUFFER):
                    hasher.update(block)
                    size += len(block)
        except FileNotFoundError:
            return None
        return size, hasher.hexdigest()

    def scan(self) -> Iterator[list[tuple[str, float]]]:
        for folder in sorted(self.objects.iterdir()):
            if not folder.is_dir():
                continue
            batch = []
            with os.scandir(folder) as entries:
                for entry in entries:
                    if DIGEST.fullmatch(entry.name) and entry.name[:2] == folder.name:
                        with contextlib.suppress(FileNotFoundError):
                            batch.append((entry.name, entry.stat().st_mtime))
            if batch:
                yield batch

    async def scan_async(self) -> AsyncIterator[list[tuple[str, float]]]:
        loop = asyncio.get_running_loop()
        batches = self.scan()
        while (batch := await loop.run_in_executor(None, next, batches, None)) is not None:
            yield batch

    async def size(self, digest: str) -> int | None:
        try:
            return (await asyncio.get_running_loop().run_in_executor(None, self.local_path(digest).stat)).st_size
        except FileNotFoundError:
            return None

    async def open_range(self, digest: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        fh = await loop.run_in_executor(None, open, self.local_path(digest), "rb", 0)
        try:
            await loop.run_in_executor(None, fh.seek, start)
            left = None if end is None else max(0, end - start)
            while left is None or left > 0:
                block = await loop.run_in_executor(None, fh.read, WRITE_BUFFER if left is None else min(left, WRITE_BUFFER))
                if not block:
                    break
                if left is not None:
                    left -= len(block)
                yield block
        finally:
            await loop.run_in_executor(None, fh.close)

    async def sweep_temporary(self, older_than: float) -> int:
        return await asyncio.get_running_loop().run_in_executor(None, self._sweep_temporary, older_than)

    def _sweep_temporary(self, older_than: float) -> int:
        removed = 0
        with os.scandir(self.tmp) as entries:
            for entry in entries:
                try:
                    if entry.name.startswith(TEMP_PREFIX) and entry.stat().st_mtime < older_than:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def temporary_count(self) -> int:
        """Blocking; for tests and diagnostics."""
        return sum(1 for e in os.scandir(self.tmp) if e.name.startswith(TEMP_PREFIX))


# -- blocking helpers (run in worker threads) ------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path, *, exclusive: bool) -> Iterator[None]:
    """An advisory lock shared between processes (flock); a no-op where flock does not exist."""
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _absorb(fd: int, hasher: hashlib._Hash, parts: list[bytes]) -> None:
    data = b"".join(parts) if len(parts) > 1 else parts[0]
    hasher.update(data)  # releases the GIL for large buffers
    _write_all(fd, data)


def _finish(fd: int, hasher: hashlib._Hash, parts: list[bytes]) -> None:
    if parts:
        _absorb(fd, hasher, parts)
    os.fsync(fd)


def _close_and_remove(fd: int, path: str) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    _remove(path)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _shielded(fut: asyncio.Future) -> None:
    """Let a clean-up finish even when the request that started it is being cancelled."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(fut)
