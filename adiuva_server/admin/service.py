"""What an admin can do, for the admin API and the `adiuva user` CLI alike.

Deleting a user removes their bytes at once, not at the next sweep: the rows (every table
cascades from users; SQLite's secure_delete overwrites them with zeros), the objects that no
one else references (safely against a concurrent upload of the same bytes: see
storage/maintenance.release_now), any in-memory copy of their vectors, and what the backend
keeps beyond the rows (the admin store's `scrub_deleted`: on SQLite the vector snapshot files,
vectors/snapshots.py, and the page images the WAL still held, checkpointed and truncated). A
server backup taken after holds none of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from adiuva_server import errors
from adiuva_server.admin.store import AdminStore, Counts, UserWithUsage
from adiuva_server.auth.passwords import PasswordHasher
from adiuva_server.auth.service import AuthService, UserAdmin, check_password, check_tier, normalise_email
from adiuva_server.auth.store import AccountStore, User
from adiuva_server.config import Settings
from adiuva_server.doctor import DoctorMonitor
from adiuva_server.storage import maintenance
from adiuva_server.storage.blobs import BlobStore
from adiuva_server.storage.keeper import BlobKeeper
from adiuva_server.storage.store import StorageStore
from adiuva_server.vectors.mirror import VectorMirror

if TYPE_CHECKING:
    from adiuva_server.compose import Stores

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Deletion:
    user_id: str
    email: str
    objects_deleted: int
    objects_kept: int  # shared with another user, or (from another process) left for the sweep
    wal_truncated: bool  # what the backend kept beyond the rows is gone (SQLite's WAL; always on PostgreSQL)


class AdminService:
    """`keeper`: the server's own (its pins make deleting objects at once safe); None from
    another process, which then leaves objects younger than `grace_seconds` to the server's
    sweep (0 when no server runs on the data dir)."""

    def __init__(self, settings: Settings, storage: StorageStore, store: AdminStore, accounts: AccountStore,
                 hasher: PasswordHasher, blobs: BlobStore, *, keeper: BlobKeeper | None = None, mirror: VectorMirror | None = None,
                 auth: AuthService | None = None, grace_seconds: float = maintenance.DEFAULT_GRACE_SECONDS) -> None:
        self.settings = settings
        self.storage = storage
        self.accounts = accounts
        self.store = store
        self.users = UserAdmin(settings, accounts, hasher, auth.license if auth is not None else None)
        self.hasher = hasher
        self.blobs = blobs
        self.keeper = keeper
        self.mirror = mirror
        self.auth = auth
        self.grace_seconds = grace_seconds
        self.started = time.monotonic()
        self.backup_job: BackupJob | None = None  # the console's latest (start_server_backup)
        # The server's background doctor (started by the admin feature's context, not here: the
        # CLI makes an AdminService too).
        self.doctor = DoctorMonitor(settings)

    # -- users --------------------------------------------------------------------------------

    async def list_users(self, q: str | None, page: int, limit: int) -> tuple[list[UserWithUsage], int]:
        return await self.store.users(q.strip() if q and q.strip() else None, (page - 1) * limit, limit)

    async def user(self, user_id: str) -> UserWithUsage:
        found = await self.store.user(user_id)
        if found is None:
            raise errors.NotFound("no such user")
        return found

    async def create_user(self, email: str, password: str | None, tier: str | None, admin: bool) -> tuple[UserWithUsage, str | None]:
        user, generated = await self.users.add(email, password, tier, admin)
        return await self.user(user.id), generated

    async def update_user(self, user_id: str, *, tier: str | None = None, disabled: bool | None = None,
                          admin: bool | None = None, password: str | None = None) -> UserWithUsage:
        changes: dict[str, object] = {}
        if tier is not None:
            changes["tier"] = check_tier(tier)
        if disabled is not None:
            changes["disabled"] = int(disabled)
        if admin is not None:
            changes["is_admin"] = int(admin)
        if password is not None:
            check_password(self.settings, password)
            changes["password_hash"] = await self.hasher.hash(password)
        if not changes:
            raise errors.ValidationError("nothing to change: give tier, disabled, admin or password")
        user = await self.accounts.update_user_by_id(user_id, **changes)
        return await self.user(user_id)

    async def unlock(self, user_id: str) -> None:
        # The throttle generation lives in the database: any process may lift a back-off.
        await self.accounts.unlock((await self.user(user_id)).user.email)

    async def by_email(self, email: str) -> User:
        user = await self.accounts.get_by_email(normalise_email(email))
        if user is None:
            raise errors.NotFound(f"no user with email {email.strip()}")
        return user

    async def delete_user(self, user_id: str, *, keep_an_admin: bool = True) -> Deletion:
        """Delete a user and everything they own, at once. The API keeps an active admin
        (LastAdmin); the CLI, run by whoever holds the data dir, may delete the last one."""
        user = await self.accounts.get_by_id(user_id)
        if user is None:
            raise errors.NotFound("no such user")
        digests = await self.accounts.delete_user_by_id(user_id, inside=self.store.user_objects,
                                                        keep_an_admin=keep_an_admin) or []
        deleted = await maintenance.release_now(self.storage, self.blobs, digests, keeper=self.keeper,
                                                grace_seconds=self.grace_seconds)
        if self.mirror is not None:  # her embeddings must not stay in memory either
            for key in self.mirror.keys():
                if key[0] == user_id:
                    self.mirror.discard(key)
        # After the copies: a snapshot being written for one of them is then not kept.
        truncated = await self.store.scrub_deleted(user_id)
        if not truncated:
            log.warning("the WAL could not be emptied after deleting a user (a long read was running); "
                        "it is at the next checkpoint")
        return Deletion(user_id, user.email, deleted, len(digests) - deleted, truncated)

    # -- the server ---------------------------------------------------------------------------

    async def counts(self) -> Counts:
        return await self.store.counts()

    async def database_bytes(self) -> int:
        return await self.store.database_bytes()

    def uptime(self) -> float:
        return time.monotonic() - self.started

    async def server_backups(self):
        from adiuva_server.server_backup import list_backups

        return await asyncio.to_thread(list_backups, self.settings)

    async def create_server_backup(self):
        from adiuva_server.server_backup import create_backup

        return await create_backup(self.settings)


    # -- for the admin console: a backup with progress, verify, download ----------------------

    def start_server_backup(self) -> BackupJob:
        """Start a server backup in the background (one at a time) and return its progress."""
        if self.backup_job is not None and not self.backup_job.finished:
            raise errors.Conflict("a server backup is already running")
        job = self.backup_job = BackupJob()
        self._backup_task = asyncio.create_task(self._run_backup(job))
        return job

    async def _run_backup(self, job: BackupJob) -> None:
        from adiuva_server.server_backup import BackupError, create_backup

        def on_total(total: int) -> None:
            job.total_bytes = total

        def progress(n: int) -> None:  # from the archive writer's thread; the only writer
            job.done_bytes += n

        try:
            path, _ = await create_backup(self.settings, progress=progress, on_total=on_total)
            job.name = path.name
        except BackupError as exc:
            job.error = exc.detail
        except Exception:
            log.exception("server backup failed")
            job.error = "the backup failed; see the server log"
        finally:
            job.finished = True

    async def stop_background(self) -> None:
        """At shutdown: cancel a backup in progress (its leftovers go at the next start)."""
        task = getattr(self, "_backup_task", None)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def server_backup_path(self, name: str) -> Path:
        """The archive of that name in the backup folder (only a listed one: never a path)."""
        for path, _, _ in await self.server_backups():
            if path.name == name:
                return path
        raise errors.NotFound("no server backup of that name")

    async def verify_server_backup(self, name: str):
        """Read the whole archive: every hash and the database's integrity (BackupError if not)."""
        from adiuva_server.server_backup import verify_backup

        return await asyncio.to_thread(verify_backup, await self.server_backup_path(name))


@dataclass(slots=True)
class BackupJob:
    total_bytes: int = 0  # known once the members are collected
    done_bytes: int = 0
    name: str | None = None  # the archive, once written
    error: str | None = None
    finished: bool = False


async def delete_user_from_cli(settings: Settings, stores: Stores, email: str) -> Deletion:
    """`adiuva user delete`, in its own process: the same deletion as the admin API's. While no
    server runs on the data dir, its lock is held (none starts meanwhile) and every unreferenced
    object goes at once; while one runs, objects it may be storing again right now (written in
    the last grace period) are left for its sweep."""
    import contextlib

    from adiuva_server.errors import ConfigError
    from adiuva_server.server_backup import hold_server_lock

    async with maintenance.blob_store(settings) as blobs, contextlib.AsyncExitStack() as stack:
        try:
            stack.enter_context(hold_server_lock(settings.data_dir))
            # A bucket may be shared with servers on other machines, which no local lock sees.
            grace = maintenance.DEFAULT_GRACE_SECONDS if settings.s3_bucket else 0.0
        except ConfigError:
            grace = maintenance.DEFAULT_GRACE_SECONDS
        service = AdminService(settings, stores.storage, stores.admin, stores.accounts, PasswordHasher(settings), blobs,
                               grace_seconds=grace)
        return await service.delete_user((await service.by_email(email)).id, keep_an_admin=False)
