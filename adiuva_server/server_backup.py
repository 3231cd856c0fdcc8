"""Whole-server backups: one tar archive holding a consistent SQLite snapshot, every blob that
snapshot references, the JWT secret and the TLS certificate, and a manifest of SHA-256 hashes.

- The database is copied with SQLite's online backup API while the server keeps serving and
  writing (WAL: readers never block writers).
- A blob referenced by the snapshot may stop being referenced a moment later and be deleted by
  the server; so, while the snapshot is taken and its objects are hard-linked into a staging
  folder, blob deletions are paused (a lock every deleting process respects). Writing the
  archive happens after, from the staging folder, without holding anything.
- Blobs are already encrypted by the clients (incompressible): the archive is a plain tar.
- A restore extracts into a fresh folder next to the target, verifying every hash and the
  database's integrity, and only then swaps it into place: a failed restore changes nothing.
- A server on PostgreSQL (DATABASE_URL) or a bucket (S3_BUCKET) gets a logical backup in the
  same format: every table exported from one PostgreSQL snapshot into a SQLite file at the
  current schema (ops/tablecopy.py), and every object it references streamed out of the blob
  store into the archive, each verified against its name. Deletions cannot be paused across
  nodes, so if an object the snapshot references is gone (deleted since), a newer snapshot is
  taken, a few times at most. So any archive restores into a data dir, or (`restore --to`) into
  an empty PostgreSQL database and a bucket (ops/migrate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from dataclasses import dataclass, field
from pathlib import Path

from adiuva_server import __version__
from adiuva_server.config import JWT_SECRET_FILE, LICENSE_FILE, Settings
from adiuva_server.db import Database, connect
from adiuva_server.db.database import migrations
from adiuva_server.errors import AdiuvaError, ConfigError
from adiuva_server.storage.blobs import DIGEST
from adiuva_server.storage.maintenance import open_blob_store
from adiuva_server.storage.store import REFERENCED_OBJECTS_SQL, SQLiteStorageStore
from adiuva_server.tls import CERT_FILE, KEY_FILE

log = logging.getLogger(__name__)
T = TypeVar("T")

FORMAT = "adiuva-server-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DB_MEMBER = "adiuva.db"
BACKUP_DIR = "server-backups"
SERVER_LOCK = "server.lock"
BACKUP_LOCK = "backup.lock"  # held while a backup runs: one at a time, and its staging is not a leftover
STAGING_PREFIX = ".backup-"
CHUNK = 1024 * 1024
_ARCHIVE_NAME = re.compile(r"^adiuva-\d{8}T\d{6}Z(-scheduled)?\.tar$")
SCHEDULED_SUFFIX = "-scheduled.tar"  # the only archives the schedule prunes

Progress = Callable[[int], None]  # called with bytes just written or read


class BackupError(AdiuvaError):
    status = 400
    code = "backup_error"
    title = "Server backup failed"


@dataclass
class Manifest:
    created_at: str
    server_version: str
    schema_version: int
    files: dict[str, dict] = field(default_factory=dict)  # archive path -> {size, sha256}
    counts: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_at": self.created_at,
            "server_version": self.server_version, "schema_version": self.schema_version,
            "counts": self.counts, "files": self.files,
        }, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
                raise BackupError("not an Adiuva server backup (or a newer format)")
            return cls(data["created_at"], data["server_version"], data["schema_version"], data["files"], data["counts"])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BackupError("the backup's manifest is unreadable") from None

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def backup_dir(settings: Settings) -> Path:
    return settings.data_dir / BACKUP_DIR


def _utc_stamp() -> tuple[str, str]:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return now.strftime("%Y%m%dT%H%M%SZ"), now.isoformat().replace("+00:00", "Z")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- create ---------------------------------------------------------------------------------


async def create_backup(settings: Settings, out: Path | None = None, progress: Progress | None = None,
                        on_total: Callable[[int], None] | None = None, *, scheduled: bool = False) -> tuple[Path, Manifest]:
    """Snapshot the server into one archive (default: `<data dir>/server-backups/adiuva-<UTC>.tar`,
    or `adiuva-<UTC>-scheduled.tar` for the schedule's, the only ones it prunes)."""
    stamp, created = _utc_stamp()
    if out is None:
        folder = backup_dir(settings)
        folder.mkdir(mode=0o700, exist_ok=True)
        out = folder / (f"adiuva-{stamp}{SCHEDULED_SUFFIX}" if scheduled else f"adiuva-{stamp}.tar")
    out = Path(out)
    if out.exists():
        raise BackupError(f"{out} already exists")
    if settings.backend == "sqlite" and not settings.db_path.exists():
        raise BackupError(f"no database in {settings.data_dir} (has the server ever started here?)")
    with _backup_lock(settings.data_dir) as free:
        if not free:
            raise BackupError("another backup of this server is running; try again when it is done")
        if settings.backend == "postgresql" or settings.s3_bucket:
            return await _create_logical(settings, out, created, progress, on_total)
        return await _create(settings, out, created, progress, on_total)


async def _create(settings: Settings, out: Path, created: str, progress: Progress | None,
                  on_total: Callable[[int], None] | None) -> tuple[Path, Manifest]:
    staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=STAGING_PREFIX, dir=settings.data_dir))
    try:
        blobs = await asyncio.to_thread(open_blob_store, settings)
        async with _deletions_paused(blobs):
            snapshot = staging / DB_MEMBER
            await _to_thread_to_the_end(_snapshot_database, settings.db_path, snapshot)
            db = await Database.open(snapshot, synchronous="normal", readers=1, migrate=False)
            try:
                (schema,) = await db.fetchone("PRAGMA user_version")
                if schema != migrations()[-1][0]:
                    raise BackupError(f"the database is at schema version {schema}, this adiuva writes "
                                      f"{migrations()[-1][0]}: back up with the adiuva that runs this server")
                referenced = [d for d, _ in await SQLiteStorageStore(db).referenced_objects()]
                counts = await _counts(db)
            finally:
                await db.close()
            linked = await asyncio.to_thread(_link_objects, blobs.objects, staging / "blobs", referenced)
        return await _finish(settings, out, Manifest(created, __version__, schema, counts=counts), snapshot, linked,
                             progress, on_total)
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)


# A logical backup retakes its snapshot when an object it references was deleted meanwhile.
SNAPSHOT_ATTEMPTS = 3


async def _create_logical(settings: Settings, out: Path, created: str, progress: Progress | None,
                          on_total: Callable[[int], None] | None) -> tuple[Path, Manifest]:
    from adiuva_server.storage.maintenance import blob_store

    staging = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=STAGING_PREFIX, dir=settings.data_dir))
    try:
        async with blob_store(settings) as blobs:
            for attempt in range(SNAPSHOT_ATTEMPTS):
                snapshot = staging / DB_MEMBER
                await asyncio.to_thread(_remove_all, staging)
                await _export_database(settings, snapshot)
                db = await Database.open(snapshot, synchronous="normal", readers=1, migrate=False)
                try:
                    referenced = await SQLiteStorageStore(db).referenced_objects()
                    counts = await _counts(db)
                finally:
                    await db.close()
                copied = await _fetch_objects(blobs, staging / "blobs", referenced)
                if copied is not None:
                    break
                log.info("an object of the backup's snapshot was deleted meanwhile; taking a newer snapshot")
            else:
                raise BackupError(f"objects kept vanishing under {SNAPSHOT_ATTEMPTS} snapshots in a row (heavy "
                                  "deleting?); try again later")
        manifest = Manifest(created, __version__, migrations()[-1][0], counts=counts)
        return await _finish(settings, out, manifest, snapshot, copied, progress, on_total)
    finally:
        await asyncio.to_thread(shutil.rmtree, staging, True)


def _write_private(path: Path, data: bytes) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
        fh.write(data)


def _remove_all(folder: Path) -> None:
    for path in folder.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


async def _export_database(settings: Settings, snapshot: Path) -> None:
    """The metadata as a SQLite file at the current schema: PostgreSQL's tables exported from one
    snapshot, or (SQLite with a bucket) SQLite's online backup."""
    if settings.backend == "sqlite":
        await _to_thread_to_the_end(_snapshot_database, settings.db_path, snapshot)
        return
    from adiuva_server.db.postgres import PgDatabase
    from adiuva_server.ops import tablecopy

    db = await Database.open(snapshot, synchronous="normal", readers=1)  # the current schema, empty
    await db.close()
    pg = await PgDatabase.open(settings.database_url, min_size=1, max_size=2)
    try:
        await tablecopy.pg_to_sqlite(pg, snapshot)
    finally:
        await pg.close()


async def _fetch_objects(blobs: Any, staging: Path, objects: list[tuple[str, int]]) -> list[tuple[str, Path]] | None:
    """Stream each referenced object out of the blob store into `staging`, checking its size
    (the archive writer checks its hash); None when one is gone (deleted after the snapshot)."""
    out = []
    for digest, size in sorted(set(objects)):
        target = staging / digest[:2] / digest
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            try:
                async for chunk in blobs.open_range(digest):
                    await asyncio.to_thread(fh.write, chunk)
                    written += len(chunk)
            except FileNotFoundError:
                return None
        if written != size:
            raise BackupError(f"object {digest} holds {written} bytes where {size} are recorded; run `adiuva doctor`")
        out.append((digest, target))
    return out


async def _finish(settings: Settings, out: Path, manifest: Manifest, snapshot: Path, linked: list[tuple[str, Path]],
                  progress: Progress | None, on_total: Callable[[int], None] | None) -> tuple[Path, Manifest]:
    """Write the archive: the database, the objects, the secrets and the license."""
    members = [(DB_MEMBER, snapshot)] + [(f"blobs/{d[:2]}/{d}", p) for d, p in linked]
    for name, rel in ((JWT_SECRET_FILE, JWT_SECRET_FILE), ("tls/cert.pem", CERT_FILE), ("tls/key.pem", KEY_FILE)):
        if (settings.data_dir / rel).is_file():
            members.append((name, settings.data_dir / rel))
    if settings.jwt_secret and not (settings.data_dir / JWT_SECRET_FILE).is_file():
        # Given as JWT_SECRET (every node of a cluster has it): restored servers must sign alike.
        secret = snapshot.parent / JWT_SECRET_FILE
        await asyncio.to_thread(_write_private, secret, settings.jwt_secret.encode())
        members.append((JWT_SECRET_FILE, secret))
    # The license too (wherever ADIUVA_LICENSE_FILE keeps it): a restored server without it
    # would wake in homelab mode and give new accounts the team tier.
    if settings.license_path.is_file():
        members.append((LICENSE_FILE, settings.license_path))
    if on_total:
        on_total(await asyncio.to_thread(lambda: sum(p.stat().st_size for _, p in members)))
    await asyncio.to_thread(_write_archive, out, members, manifest, progress)
    return out, manifest


@contextlib.contextmanager
def _try_lock(path: Path) -> Iterator[bool]:
    """An exclusive flock on `path`, never waiting: yields whether it was free (and is now held
    until the block ends). Where flock does not exist (Windows), always True."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _backup_lock(data_dir: Path):
    return _try_lock(data_dir / BACKUP_LOCK)


def remove_leftovers(settings: Settings) -> int:
    """Staging folders and partial archives of backups that crashed or were cancelled (unless a
    backup is running right now). Their hard links would otherwise keep deleted objects' space."""
    removed = 0
    with _backup_lock(settings.data_dir) as free:
        if not free:
            return 0
        for path in settings.data_dir.glob(STAGING_PREFIX + "*"):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
        folder = backup_dir(settings)
        for path in folder.glob("*.partial") if folder.is_dir() else ():
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.asynccontextmanager
async def _deletions_paused(blobs):
    # Taking the lock may wait for a deletion in progress: do it off the event loop.
    paused = blobs.deletions_paused()
    await asyncio.to_thread(paused.__enter__)
    try:
        yield
    finally:
        paused.__exit__(None, None, None)


async def _to_thread_to_the_end(fn: Callable[..., T], *args: Any) -> T:
    """`fn` in a worker thread; if we are cancelled (the server stopping during a scheduled
    backup), wait for the thread before going on: it holds a connection to the live database,
    which must be closed before the server's own Database closes (see WalIndexHeader)."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await asyncio.wait((work,))
        raise


def _snapshot_database(source: Path, target: Path) -> None:
    src = connect(source, readonly=True)
    dst = connect(target)
    try:
        src.backup(dst)  # one step: a consistent snapshot of one read transaction
    finally:
        dst.close()
        src.close()


async def _counts(db: Database) -> dict[str, int]:
    counts = {}
    for name, sql in {
        "users": "SELECT count(*) FROM users",
        "records": "SELECT count(*) FROM storage_records WHERE checksum IS NOT NULL",
        "backups": "SELECT count(*) FROM storage_backups",
        "vectors": "SELECT count(*) FROM vector_items",
    }.items():
        counts[name] = (await db.fetchone(sql))[0]
    return counts


def _link_objects(objects: Path, staging: Path, digests: list[str]) -> list[tuple[str, Path]]:
    """Hard-link (copy where links are impossible) each referenced object into staging."""
    out = []
    for digest in sorted(set(digests)):
        src = objects / digest[:2] / digest
        dst = staging / digest[:2] / digest
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except FileNotFoundError:
            raise BackupError(f"object {digest} is referenced but missing; run `adiuva doctor`") from None
        except OSError:
            shutil.copy2(src, dst)
        out.append((digest, dst))
    return out


def _write_archive(out: Path, members: list[tuple[str, Path]], manifest: Manifest, progress: Progress | None) -> None:
    tmp = out.with_name(out.name + ".partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, path in members:
                info = tarfile.TarInfo(name)
                info.size = path.stat().st_size
                info.mode = 0o600
                info.mtime = int(path.stat().st_mtime)
                with open(path, "rb") as fh:
                    hashing = _HashingReader(fh, progress)
                    tar.addfile(info, hashing)
                digest = hashing.hexdigest()
                if name.startswith("blobs/") and digest != name.rsplit("/", 1)[1]:
                    raise BackupError(f"object {name} does not hash to its name (corrupt on disk); run `adiuva doctor`")
                manifest.files[name] = {"size": info.size, "sha256": digest}
            body = manifest.to_json()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode, info.mtime = len(body), 0o600, int(dt.datetime.now().timestamp())
            tar.addfile(info, io.BytesIO(body))
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


class _HashingReader:
    def __init__(self, fh, progress: Progress | None) -> None:
        self.fh, self.progress, self.sha = fh, progress, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.sha.update(data)
        if self.progress and data:
            self.progress(len(data))
        return data

    def hexdigest(self) -> str:
        return self.sha.hexdigest()


# -- schedule -------------------------------------------------------------------------------


async def scheduled_backup(settings: Settings) -> None:
    """One scheduled backup into the backup folder, then prune to `backup_keep` (a job of
    `compose.py`, every `backup_interval` seconds; a failure is logged and retried then)."""
    path, manifest = await create_backup(settings, scheduled=True)
    pruned = await asyncio.to_thread(prune_backups, settings, settings.backup_keep)
    log.info("scheduled backup %s written (%d bytes); %d old archive(s) pruned",
             path.name, path.stat().st_size, len(pruned))


# -- verify, list ---------------------------------------------------------------------------


def _safe_member(name: str) -> bool:
    if name == MANIFEST or name in (DB_MEMBER, JWT_SECRET_FILE, "tls/cert.pem", "tls/key.pem", LICENSE_FILE):
        return True
    parts = name.split("/")
    return len(parts) == 3 and parts[0] == "blobs" and DIGEST.fullmatch(parts[2]) is not None and parts[1] == parts[2][:2]


def _read_members(archive: Path, sink: Callable[[str], object] | None, progress: Progress | None) -> tuple[Manifest, dict[str, dict]]:
    """Stream through the archive hashing every member; `sink(name)` may return a writable
    file to receive the member's bytes. Returns the manifest and what was actually found."""
    found: dict[str, dict] = {}
    manifest = None
    try:
        with tarfile.open(archive, mode="r|") as tar:
            for info in tar:
                if not info.isfile() or not _safe_member(info.name) or info.name in found:
                    raise BackupError(f"unexpected entry {info.name!r} in the archive")
                fh = tar.extractfile(info)
                if info.name == MANIFEST:
                    manifest = Manifest.from_json(fh.read(16 * 1024 * 1024 + 1))
                    continue
                out = sink(info.name) if sink else None
                sha, size = hashlib.sha256(), 0
                try:
                    while block := fh.read(CHUNK):
                        sha.update(block)
                        size += len(block)
                        if out is not None:
                            out.write(block)
                        if progress:
                            progress(len(block))
                    if out is not None:
                        out.flush()
                        os.fsync(out.fileno())
                finally:
                    if out is not None:
                        out.close()
                found[info.name] = {"size": size, "sha256": sha.hexdigest()}
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise BackupError(f"{archive} does not exist") from None
        raise BackupError(f"{archive} is not a readable backup archive: {exc}") from None
    if manifest is None:
        raise BackupError("the archive has no manifest (truncated?)")
    return manifest, found


def _check(manifest: Manifest, found: dict[str, dict]) -> list[str]:
    problems = []
    for name, want in manifest.files.items():
        got = found.get(name)
        if got is None:
            problems.append(f"missing: {name}")
        elif got != want:
            problems.append(f"damaged: {name}")
        elif name.startswith("blobs/") and got["sha256"] != name.rsplit("/", 1)[1]:
            problems.append(f"damaged: {name}")
    problems += [f"not in the manifest: {n}" for n in found if n not in manifest.files]
    if DB_MEMBER not in found:
        problems.append("missing: the database")
    return problems


def _integrity(db_path: Path, found: dict[str, dict]) -> list[str]:
    """SQLite's integrity check, and every object the database references present in the
    archive (the manifest alone is not proof: it was written by the same run)."""
    conn = connect(db_path, readonly=True)
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if rows != ["ok"]:
            return [f"database: {r}" for r in rows]
        referenced = [r[0] for r in conn.execute(REFERENCED_OBJECTS_SQL).fetchall()]
    finally:
        conn.close()
    return [f"missing: object {d} referenced by the database" for d in referenced if f"blobs/{d[:2]}/{d}" not in found]


def verify_backup(archive: Path, progress: Progress | None = None) -> Manifest:
    """Read the whole archive: every hash must match the manifest and the database must pass
    SQLite's integrity check. Raises BackupError naming what is wrong."""
    with tempfile.TemporaryDirectory(prefix="adiuva-verify-") as tmp:
        db_copy = Path(tmp) / DB_MEMBER
        manifest, found = _read_members(
            Path(archive), lambda n: open(db_copy, "wb") if n == DB_MEMBER else None, progress)
        problems = _check(manifest, found)
        if not problems:
            problems = _integrity(db_copy, found)
    if problems:
        raise BackupError(f"{archive} failed verification: " + "; ".join(problems[:10]))
    return manifest


def read_manifest(archive: Path) -> Manifest:
    """The manifest only (seeks over the members' data)."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            member = tar.getmember(MANIFEST)
            return Manifest.from_json(tar.extractfile(member).read(16 * 1024 * 1024))
    except (tarfile.TarError, KeyError, OSError):
        raise BackupError(f"{archive} is not a readable backup archive") from None


def list_backups(settings: Settings) -> list[tuple[Path, int, Manifest | None]]:
    folder = backup_dir(settings)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        if _ARCHIVE_NAME.match(path.name):
            try:
                manifest = read_manifest(path)
            except BackupError:
                manifest = None
            out.append((path, path.stat().st_size, manifest))
    return out


def prune_backups(settings: Settings, keep: int) -> list[Path]:
    """Delete the oldest scheduled archives beyond the newest `keep`; the ones an admin made
    with `adiuva backup create` are theirs to delete."""
    archives = [p for p, _, _ in list_backups(settings) if p.name.endswith(SCHEDULED_SUFFIX)]
    doomed = archives[:-keep] if keep > 0 else archives
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


# -- restore ------------------------------------------------------------------------------


def server_running(data_dir: Path) -> bool:
    """Whether an `adiuva serve` holds this data dir (its lock file is locked)."""
    if not (data_dir / SERVER_LOCK).exists():
        return False
    with _try_lock(data_dir / SERVER_LOCK) as free:
        return not free


@contextlib.contextmanager
def hold_server_lock(data_dir: Path) -> Iterator[None]:
    """Held by `adiuva serve` for its lifetime: one server per data dir, and restore can tell."""
    with _try_lock(data_dir / SERVER_LOCK) as free:
        if not free:
            raise ConfigError(f"another adiuva server is already running on {data_dir}")
        yield


def restore_backup(archive: Path, data_dir: Path, *, force: bool = False, progress: Progress | None = None) -> Manifest:
    data_dir = Path(data_dir).expanduser().resolve()  # a symlinked data dir is restored where it points
    if data_dir.exists() and any(data_dir.iterdir()):
        if not force:
            raise BackupError(f"{data_dir} is not empty; use --force to replace its contents")
        if server_running(data_dir):
            raise BackupError(f"a server is running on {data_dir}; stop it first")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.restore-", dir=data_dir.parent))
    try:
        def sink(name: str):
            if name.startswith("blobs/"):
                target = staging / "blobs" / "objects" / name.split("/", 1)[1]
            else:
                target = staging / name
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")

        manifest, found = _read_members(Path(archive), sink, progress)
        problems = _check(manifest, found) or _integrity(staging / DB_MEMBER, found)
        if problems:
            raise BackupError(f"{archive} failed verification: " + "; ".join(problems[:10]))
        if manifest.schema_version > migrations()[-1][0]:
            raise BackupError("the backup comes from a newer adiuva; upgrade before restoring")
        for folder in (staging, staging / "blobs", staging / "blobs" / "objects", staging / "blobs" / "tmp"):
            folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(staging, 0o700)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Everything is verified and durable in `staging`; swap it in.
    if not data_dir.exists():
        os.rename(staging, data_dir)
        _fsync_dir(data_dir.parent)
        return manifest
    old = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.old-", dir=data_dir.parent)) / "data"
    os.rename(data_dir, old)
    try:
        os.rename(staging, data_dir)
    except BaseException:
        os.rename(old, data_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(data_dir.parent)
    # Keep the server's own backup archives across a restore.
    if (old / BACKUP_DIR).is_dir():
        os.rename(old / BACKUP_DIR, data_dir / BACKUP_DIR)
    shutil.rmtree(old.parent, ignore_errors=True)
    return manifest
