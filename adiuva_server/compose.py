"""The composition root: the one place that picks each backend from the settings and wires
every store, service and background job. Handlers and services never know which backend
they run on; they find what they need on the app under the typed keys of `keys.py`.

`open_stores` picks the metadata backend (`settings.backend`: the data dir's SQLite file, or
DATABASE_URL's PostgreSQL) and builds every feature's store on it; the server
(`open_services`) and the CLI commands (cli/common.run_with_stores) both open their stores
there. `services(app)` is the app's cleanup context (created first, closed last). The order
below is the order of dependencies; an AsyncExitStack closes them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from adiuva_server import server_backup
from adiuva_server.admin.service import AdminService
from adiuva_server.admin.store import AdminStore, SQLiteAdminStore
from adiuva_server.auth.passwords import PasswordHasher
from adiuva_server.auth.service import AuthService
from adiuva_server.auth.store import AccountStore, SQLiteAccountStore
from adiuva_server.billing import service as billing_service
from adiuva_server.billing.policy import Policy
from adiuva_server.billing.service import BillingService
from adiuva_server.billing.sqlite import SQLiteBillingStore
from adiuva_server.billing.store import BillingStore
from adiuva_server.chat import plans
from adiuva_server.chat.batches import BatchStore, SQLiteBatchStore
from adiuva_server.chat.llm import LLM
from adiuva_server.chat.orchestrator import Orchestrator
from adiuva_server.clock import Clock
from adiuva_server.cluster import Shared, open_shared
from adiuva_server.config import Settings
from adiuva_server.console.store import ConsoleSessions, SQLiteConsoleSessions
from adiuva_server.db import Database
from adiuva_server.db.postgres import PgDatabase
from adiuva_server.jobs import Jobs
from adiuva_server.keys import (
    ADMIN, AUTH, BILLING, CHAT, CLOCK, CONSOLE_SESSIONS, DB, HASHER, JOBS, LICENSE, MARKETPLACE, PG, RATE_LIMITS, SETTINGS,
    SHARED, STORAGE, VECTORS,
)
from adiuva_server.license.state import LicenseState
from adiuva_server.marketplace.service import MarketplaceService
from adiuva_server.marketplace.sqlite import SQLiteMarketplaceStore
from adiuva_server.marketplace.store import MarketplaceStore
from adiuva_server.ratelimit import RateLimitStore
from adiuva_server.storage import maintenance
from adiuva_server.storage.pins import LocalPins, SharedPins
from adiuva_server.storage.service import StorageService
from adiuva_server.storage.store import SQLiteStorageStore, StorageStore
from adiuva_server.vectors import snapshots
from adiuva_server.vectors.mirror import VectorMirror
from adiuva_server.vectors.service import VectorService
from adiuva_server.vectors.store import SQLiteVectorStore, VectorStore, upgrade_legacy_layout

log = logging.getLogger(__name__)

HOUSEKEEPING_SECONDS = 60.0
SWEEP_SECONDS = 6 * 3600.0


# -- the stores: the one place that picks the metadata backend -----------------------------------


@dataclasses.dataclass
class Stores:
    """Every feature's store on the metadata backend the settings choose (`settings.backend`).
    `db` is the data dir's SQLite file, open in both modes: on "sqlite" every store is on it; on
    "postgresql" only what stays per node (server backups of the data dir) reads it."""

    db: Database
    pg: PgDatabase | None  # DATABASE_URL: the one pool every PostgreSQL store shares
    accounts: AccountStore
    storage: StorageStore
    admin: AdminStore
    billing: BillingStore
    marketplace: MarketplaceStore
    batches: BatchStore
    console_sessions: ConsoleSessions
    pins: SharedPins  # objects being stored, seen by every node (storage/pins.py)

    async def vectors(self, mirror: VectorMirror) -> VectorStore:
        if self.pg is not None:
            from adiuva_server.vectors.postgres import PostgresVectorStore

            return PostgresVectorStore(self.pg, mirror)
        await upgrade_legacy_layout(self.db)  # migration 0009's data step, before anything is served
        return SQLiteVectorStore(self.db, mirror, self.db.path.parent / snapshots.DIRNAME)


def sqlite_stores(settings: Settings, db: Database) -> Stores:
    return Stores(
        db, None,
        accounts=SQLiteAccountStore(db),
        storage=SQLiteStorageStore(db),
        admin=SQLiteAdminStore(db, settings.data_dir / snapshots.DIRNAME),
        billing=SQLiteBillingStore(db, Policy.from_settings(settings)),
        marketplace=SQLiteMarketplaceStore(db),
        batches=SQLiteBatchStore(db),
        console_sessions=SQLiteConsoleSessions(db),
        pins=LocalPins(),
    )


def postgres_stores(settings: Settings, db: Database, pg: PgDatabase) -> Stores:
    from adiuva_server.admin.postgres import PostgresAdminStore
    from adiuva_server.auth.postgres import PostgresAccountStore
    from adiuva_server.billing.postgres import PostgresBillingStore
    from adiuva_server.chat.postgres import PostgresBatchStore
    from adiuva_server.console.postgres import PostgresConsoleSessions
    from adiuva_server.marketplace.postgres import PostgresMarketplaceStore
    from adiuva_server.storage.pins import PostgresPins
    from adiuva_server.storage.postgres import PostgresStorageStore

    return Stores(
        db, pg,
        accounts=PostgresAccountStore(pg),
        storage=PostgresStorageStore(pg),
        admin=PostgresAdminStore(pg),
        billing=PostgresBillingStore(pg, Policy.from_settings(settings)),
        marketplace=PostgresMarketplaceStore(pg),
        # A dead node's running batches stop counting after the longest run a plan can take.
        batches=PostgresBatchStore(pg, stale_after=plans.MAX_STEPS * settings.llm_timeout * 2),
        console_sessions=PostgresConsoleSessions(pg),
        pins=PostgresPins(pg),
    )


@contextlib.asynccontextmanager
async def open_stores(settings: Settings, *, server: bool = False) -> AsyncIterator[Stores]:
    """Open the metadata backend the settings choose, migrated (PostgreSQL: once per cluster,
    under the migration advisory lock), and every store on it; close them on exit. `server`:
    the server's pools; otherwise the small ones of a CLI command."""
    async with contextlib.AsyncExitStack() as stack:
        if server:
            db = await Database.open(settings.db_path, synchronous=settings.sqlite_synchronous, watch_commits=True)
        else:
            db = await Database.open(settings.db_path, synchronous=settings.sqlite_synchronous, readers=1)
        stack.push_async_callback(db.close)
        if settings.backend != "postgresql":
            yield sqlite_stores(settings, db)
            return
        pg = await (PgDatabase.open(settings.database_url) if server else
                    PgDatabase.open(settings.database_url, min_size=1, max_size=2))
        stack.push_async_callback(pg.close)
        yield postgres_stores(settings, db, pg)


@dataclasses.dataclass
class Services:
    settings: Settings
    db: Database
    hasher: PasswordHasher
    rate_limits: RateLimitStore
    auth: AuthService
    storage: StorageService
    vectors: VectorService
    chat: Orchestrator
    admin: AdminService
    console_sessions: ConsoleSessions
    jobs: Jobs
    billing: BillingService
    license: LicenseState
    shared: Shared
    marketplace: MarketplaceService
    stores: Stores

    @property
    def pg(self) -> PgDatabase | None:
        """DATABASE_URL=postgresql://...: the one pool every PostgreSQL store shares; None on SQLite."""
        return self.stores.pg


@contextlib.asynccontextmanager
async def open_services(settings: Settings, clock: Clock | None = None) -> AsyncIterator[Services]:
    """Build every backend and service from `settings`; close them all on exit."""
    async with contextlib.AsyncExitStack() as stack:
        # What the processes of a cluster share (REDIS_URL; else in this process), first: an
        # unreachable Redis stops the start before anything else opens.
        shared = await stack.enter_async_context(open_shared(settings))

        # First: registration asks it (max_users, the default tier), and so do billing and plugins.
        license = LicenseState.for_settings(settings, clock)
        await license.check()

        # The metadata backend (SQLite, or DATABASE_URL's PostgreSQL) and every store on it.
        stores = await stack.enter_async_context(open_stores(settings, server=True))
        db = stores.db

        hasher = PasswordHasher(settings)
        stack.callback(hasher.close)
        rate_limits = shared.rate_limits
        auth = AuthService(settings, stores.accounts, hasher, rate_limits, license=license)
        if stores.pg is not None:  # its per-request account check from a cache kept by notices
            await stores.accounts.listen()
            stack.push_async_callback(stores.accounts.stop_listening)

        blobs = await stack.enter_async_context(maintenance.blob_store(settings))
        # Nothing of this process is uploading yet: every temporary file is a leftover of an
        # earlier run. A bucket is shared with other nodes, whose uploads may be in flight: only
        # what is older than the grace period there.
        removed = await blobs.sweep_temporary(
            time.time() - maintenance.DEFAULT_GRACE_SECONDS if settings.s3_bucket else float("inf"))
        if removed:
            log.info("removed %d abandoned upload(s)", removed)
        storage = StorageService(settings, stores.storage, blobs, stores.pins)
        stack.push_async_callback(storage.keeper.drain)

        mirror = VectorMirror(settings.vector_cache_bytes, settings.vector_cache_min_vectors)
        vector_store = await stores.vectors(mirror)
        vectors = VectorService(settings, vector_store)
        stack.push_async_callback(vector_store.close)

        llm = LLM(settings)
        stack.push_async_callback(llm.close)
        batches = stores.batches
        interrupted = await batches.interrupt_running()
        if interrupted:
            log.info("marked %d batches left running by the previous process as interrupted", interrupted)
        chat = Orchestrator(settings, llm, batches, plan_store=shared.plan_store)

        admin = AdminService(settings, stores.storage, stores.admin, auth.store, hasher, blobs, keeper=storage.keeper, mirror=mirror, auth=auth)
        stack.push_async_callback(admin.stop_background)  # server backups started from the console or API
        stack.push_async_callback(admin.doctor.stop)  # before the database closes under it

        # Built in homelab mode too (nothing is opened until used): the license may change while
        # the server runs; the routes and the job ask billing.mode each time.
        gateway = await stack.enter_async_context(billing_service.stripe_gateway(settings))
        marketplace = MarketplaceService(settings, stores.marketplace, license, gateway)
        billing = BillingService(settings, stores.billing, gateway, license,
                                 payments=marketplace)
        await marketplace.import_bundled()  # idempotent: a restart writes nothing

        jobs = Jobs(shared.lease)
        # Idle in-memory rate-limit windows are each process's own (a Redis store has none).
        jobs.every("ratelimit-sweep", HOUSEKEEPING_SECONDS, rate_limits.sweep, cluster=False)
        jobs.every("session-purge", HOUSEKEEPING_SECONDS, lambda: purge_sessions(auth))
        jobs.every("storage-sweep", SWEEP_SECONDS, lambda: storage_sweep(storage))
        jobs.every("server-backup", settings.backup_interval, lambda: server_backup.scheduled_backup(settings),
                   first=settings.backup_interval)
        jobs.every("billing", billing_service.JOB_SECONDS, billing.run_jobs, first=60.0)
        services = Services(settings, db, hasher, rate_limits, auth, storage, vectors, chat, admin,
                            stores.console_sessions, jobs, billing, license, shared, marketplace, stores)
        yield services


async def services(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: every service on the app under its key; background work started once the
    app's own contexts are up, stopped before they close."""
    async with open_services(app[SETTINGS], app[CLOCK]) as s:
        app[DB], app[HASHER], app[RATE_LIMITS], app[AUTH] = s.db, s.hasher, s.rate_limits, s.auth
        app[STORAGE], app[VECTORS], app[CHAT], app[ADMIN] = s.storage, s.vectors, s.chat, s.admin
        app[CONSOLE_SESSIONS], app[JOBS], app[BILLING] = s.console_sessions, s.jobs, s.billing
        app[LICENSE], app[SHARED], app[MARKETPLACE] = s.license, s.shared, s.marketplace
        if s.pg is not None:
            app[PG] = s.pg
        s.vectors.store.start_warm_up()  # in the background: searches never wait for it
        s.admin.doctor.start()
        s.jobs.start()
        # Not one of the jobs: it waits on the app's clock (tests move it), and every node keeps
        # its own state.
        license_check = asyncio.create_task(s.license.run_daily(), name="license-check")
        try:
            yield
        finally:
            license_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await license_check
            await s.jobs.stop()


# -- the jobs ------------------------------------------------------------------------------------


async def purge_sessions(auth: AuthService) -> None:
    """Drop expired refresh tokens."""
    purged = await auth.store.purge_expired_sessions(int(time.time()))
    if purged:
        log.debug("purged %d expired refresh tokens", purged)


async def storage_sweep(storage: StorageService) -> None:
    """Unreferenced objects (a crash, a deleted user), abandoned temporary files and tombstones
    past their retention: at start, then every few hours. The keeper's pins protect objects
    whose rows are being written; the grace period spares temporary files of uploads still
    being received."""
    # No grace period for objects: this node's pins and every other node's (shared) protect
    # the objects whose rows are being written.
    await storage.keeper.pins.purge()
    report = await maintenance.sweep(storage.store, storage.blobs, object_grace_seconds=0, keeper=storage.keeper)
    if report.objects_removed or report.temporary_removed:
        log.info("storage sweep removed %d object(s), %d temporary file(s)",
                 report.objects_removed, report.temporary_removed)
    forgotten = await storage.purge_tombstones()
    if forgotten:
        log.info("forgot %d deleted record(s) older than the tombstone retention", forgotten)
