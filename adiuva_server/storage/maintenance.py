"""Sweeping and checking the blob store against the metadata: plain importable functions that
the server runs at start (and periodically) and that an admin tool can run on demand.

A crash can leave, at most, an abandoned temporary file or an object no row references (the
row is committed only after its object is durable); deleting a user leaves the objects only
they referenced. `sweep` removes both kinds; it never removes a referenced object. `check`
proves the opposite promise: every referenced object exists, has the right size and hashes
to its name, and the per-user usage counters agree with the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from adiuva_server.config import Settings
from adiuva_server.storage.blobs import BlobStore, FileBlobStore
from adiuva_server.storage.keeper import BlobKeeper
from adiuva_server.storage.store import StorageStore

# Another process may be between storing an object and committing its row; a sweep from
# outside the server leaves objects younger than this alone.
DEFAULT_GRACE_SECONDS = 3600.0


def blob_root(settings: Settings) -> Path:
    return settings.data_dir / "blobs"


def open_blob_store(settings: Settings) -> FileBlobStore:
    """Blocking (creates the folders): the blob store of this data dir (the files, whatever
    S3_BUCKET says: server backups work on files only)."""
    blobs = FileBlobStore(blob_root(settings))
    blobs.open()
    return blobs


@contextlib.asynccontextmanager
async def blob_store(settings: Settings) -> AsyncIterator[BlobStore]:
    """The blob store the settings choose: the S3_BUCKET bucket, or the data dir's files."""
    if not settings.s3_bucket:
        yield await asyncio.to_thread(open_blob_store, settings)
        return
    from adiuva_server.storage.s3 import S3BlobStore

    blobs = S3BlobStore(settings.s3_bucket, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                        access_key_id=settings.aws_access_key_id, secret_access_key=settings.aws_secret_access_key)
    await blobs.open()
    try:
        yield blobs
    finally:
        await blobs.close()


async def temporary_count(blobs: BlobStore) -> int:
    if isinstance(blobs, FileBlobStore):
        return await asyncio.to_thread(blobs.temporary_count)
    return await blobs.temporary_count()


@dataclass
class SweepReport:
    objects_removed: int = 0
    temporary_removed: int = 0


@dataclass
class ConsistencyReport:
    referenced: int = 0
    missing: list[str] = field(default_factory=list)  # referenced but absent
    corrupt: list[str] = field(default_factory=list)  # wrong size or hash
    unreferenced: int = 0  # stored but unused (harmless; the next sweep removes them)
    temporary: int = 0
    usage_drift: list[tuple[str, str, int, int]] = field(default_factory=list)  # (user, kind, counted, actual)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.usage_drift)


async def sweep(
    store: StorageStore, blobs: BlobStore, *, grace_seconds: float = DEFAULT_GRACE_SECONDS,
    object_grace_seconds: float | None = None, keeper: BlobKeeper | None = None,
) -> SweepReport:
    """Remove temporary files and unreferenced objects last written more than `grace_seconds`
    ago (`object_grace_seconds` for objects, if given). From another process the grace period
    protects the server's uploads in flight; inside the server, its keeper's pins do, so the
    server sweeps objects with no grace period."""
    keeper = keeper or BlobKeeper(blobs, store)
    now = time.time()
    report = SweepReport(temporary_removed=await blobs.sweep_temporary(now - grace_seconds))
    cutoff = now - (grace_seconds if object_grace_seconds is None else object_grace_seconds)
    async for batch in blobs.scan_async():
        old = [digest for digest, mtime in batch if mtime < cutoff]
        if not old:
            continue
        used = await store.referenced(old)
        report.objects_removed += await keeper.release([d for d in old if d not in used], older_than=cutoff)
    return report


async def check(store: StorageStore, blobs: BlobStore, *, verify_hashes: bool = True) -> ConsistencyReport:
    """Compare the metadata with the blob store. Reads every referenced object when
    `verify_hashes` (slow on a large store); otherwise checks presence and size only."""
    report = ConsistencyReport()
    referenced = dict(await store.referenced_objects())
    report.referenced = len(referenced)
    for digest, size in referenced.items():
        if verify_hashes:
            found = await blobs.size_and_hash(digest)
            if found is None:
                report.missing.append(digest)
            elif found != (size, digest):
                report.corrupt.append(digest)
        else:
            actual = await blobs.size(digest)
            if actual is None:
                report.missing.append(digest)
            elif actual != size:
                report.corrupt.append(digest)
    async for batch in blobs.scan_async():
        report.unreferenced += sum(1 for digest, _ in batch if digest not in referenced)
    report.temporary = await temporary_count(blobs)
    report.usage_drift = await store.usage_drift()
    return report


async def release_now(
    store: StorageStore, blobs: BlobStore, digests: list[str], *, keeper: BlobKeeper | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
) -> int:
    """Delete at once those of `digests` that no row references any more (a deleted user's
    objects), the way `sweep` decides it. Inside the server pass its keeper: its pins hold off
    any upload of the same bytes in flight, so every unreferenced object goes now. From another
    process those pins are unseen: objects written in the last `grace_seconds` are left for the
    server's next sweep (pass 0 only when no server runs on the data dir). Returns how many
    objects were deleted."""
    if keeper is not None:
        return await keeper.release(digests)
    keeper = BlobKeeper(blobs, store)
    return await keeper.release(digests, older_than=time.time() - grace_seconds if grace_seconds else None)
