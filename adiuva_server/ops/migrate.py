"""`adiuva migrate`: move a homelab server (one SQLite file and its blob files) onto the shared
backends of a cluster: PostgreSQL (`DATABASE_URL`) and an S3-compatible bucket (`S3_BUCKET`).

The homelab data dir is only read. The database is copied from one consistent snapshot (SQLite's
backup API, into a temporary file migrated to the current schema), so an older server's file
migrates too and a running server is not disturbed (but its later writes are not carried over:
the command refuses while a server runs on the data dir). The order makes a failure harmless:

1. every object the snapshot references is streamed into the bucket under its content address,
   then read back and hashed: a missing, short or corrupt object stops the migration before any
   metadata exists in PostgreSQL (objects the bucket holds already, with the right hash, are
   kept: a second run resumes);
2. every table is copied into the empty PostgreSQL database in one transaction (ops/tablecopy.py),
   so it holds all or nothing;
3. every table's row count is compared between the snapshot and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adiuva_server import errors, server_backup
from adiuva_server.config import Settings
from adiuva_server.db import Database
from adiuva_server.db.postgres import PgDatabase
from adiuva_server.ops import tablecopy
from adiuva_server.storage import maintenance
from adiuva_server.storage.store import SQLiteStorageStore

Progress = Callable[[int], None]
# Objects verified concurrently (each streams in chunks: memory stays a few parts per object).
PARALLEL = 4


class MigrationError(errors.AdiuvaError):
    status = 500
    code = "migration_failed"
    title = "The migration failed"


@dataclass
class Migrated:
    rows: dict[str, int] = field(default_factory=dict)
    objects: int = 0
    object_bytes: int = 0
    objects_present: int = 0  # in the bucket already, with the right hash


@dataclass(frozen=True)
class Plan:
    """What will be copied: known before anything is written, for the progress bar."""

    rows: int
    objects: list[tuple[str, int]]

    @property
    def total(self) -> int:
        return self.rows + len(self.objects)


async def migrate(settings: Settings, target: Settings, *, on_plan: Callable[[Plan], None] | None = None,
                  progress: Progress | None = None) -> Migrated:
    """Copy the server of `settings` (its SQLite data dir) into the backends of `target`
    (`database_url`, and `s3_bucket` with its endpoint and keys)."""
    if not target.database_url:
        raise errors.ValidationError.field("to", "give the PostgreSQL URL to migrate to (postgresql://...)")
    if not target.s3_bucket:
        raise errors.ValidationError.field("s3_bucket", "give the bucket the blobs go to (--s3-bucket or S3_BUCKET)")
    if server_backup.server_running(settings.data_dir):
        raise MigrationError(f"a server is running on {settings.data_dir}; stop it first (writes made after the "
                             "snapshot would not be carried over)")
    with tempfile.TemporaryDirectory(prefix=".adiuva-migrate-", dir=settings.data_dir) as scratch:
        snapshot = Path(scratch) / "snapshot.db"
        await asyncio.to_thread(server_backup._snapshot_database, settings.db_path, snapshot)
        db = await Database.open(snapshot, synchronous="off", readers=1)  # migrated to the current schema
        try:
            objects = await SQLiteStorageStore(db).referenced_objects()
        finally:
            await db.close()
        tables = await asyncio.to_thread(tablecopy.sqlite_tables, snapshot)
        counts = {t: await asyncio.to_thread(tablecopy.sqlite_count, snapshot, t) for t, _ in tables}
        plan = Plan(sum(counts.values()), sorted(objects))
        if on_plan is not None:
            on_plan(plan)
        result = Migrated()
        await _copy_objects(settings, target, plan.objects, result, progress)
        pg = await PgDatabase.open(target.database_url)
        try:
            try:
                result.rows = await tablecopy.sqlite_to_pg(snapshot, pg, progress)
            except tablecopy.CopyError as exc:
                raise MigrationError(str(exc)) from None
            found = await tablecopy.pg_counts(pg, list(result.rows))
        finally:
            await pg.close()
        wrong = [f"{t}: {counts[t]} in SQLite, {found[t]} in PostgreSQL" for t in result.rows if found[t] != counts[t]]
        if wrong:
            raise MigrationError("row counts differ after the copy: " + "; ".join(wrong))
        return result


async def _copy_objects(settings: Settings, target: Settings, objects: list[tuple[str, int]], result: Migrated,
                        progress: Progress | None) -> None:
    source = await asyncio.to_thread(maintenance.open_blob_store, settings)
    async with maintenance.blob_store(target) as bucket:
        gate = asyncio.Semaphore(PARALLEL)

        async def one(digest: str, size: int) -> None:
            async with gate:
                there = await bucket.size_and_hash(digest)
                if there == (size, digest):
                    result.objects_present += 1
                else:
                    if await source.size(digest) != size:
                        raise MigrationError(f"object {digest} is missing or has the wrong size in {settings.data_dir}; "
                                             "run `adiuva doctor` on the homelab server first")
                    staged = await bucket.receive(source.open_range(digest), size)
                    if staged.digest != digest:
                        await bucket.discard(staged)
                        raise MigrationError(f"object {digest} in {settings.data_dir} does not hash to its name; "
                                             "run `adiuva doctor` on the homelab server first")
                    await bucket.store(staged)
                    if await bucket.size_and_hash(digest) != (size, digest):  # read back: what the bucket holds
                        raise MigrationError(f"object {digest} did not arrive intact in the bucket")
                result.objects += 1
                result.object_bytes += size
                if progress:
                    progress(1)

        tasks = [asyncio.ensure_future(one(d, s)) for d, s in objects]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)
            raise
