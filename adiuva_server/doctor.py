"""`adiuva doctor`: check the whole server and say plainly what is wrong (and, with `fix`,
mend what can be mended safely). Each check is a small function returning findings.

The server runs the same checks without `fix` in the background (DoctorMonitor) for the
admin status, as `adiuva doctor` would from outside: nothing blocks its event loop (file and
SQLite work runs in threads), nothing takes a write lock (the checks read on connections of their
own, so the server's read pools stay free; in WAL mode writers go on meanwhile) and nothing is
deleted or changed.

Both metadata backends: on SQLite the data dir's file is checked (integrity, foreign keys,
schema version); on PostgreSQL (DATABASE_URL) the connection and the schema version. The
storage check then reads the metadata through that backend's storage store."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib.util
import logging
import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from adiuva_server.config import JWT_SECRET_FILE, Settings
from adiuva_server.db import Database, connect
from adiuva_server.db.database import migrations
from adiuva_server.server_backup import remove_leftovers, server_running
from adiuva_server.storage import maintenance
from adiuva_server.storage.blobs import BlobStore
from adiuva_server.storage.store import SQLiteStorageStore, StorageStore
from adiuva_server.tls import KEY_FILE

log = logging.getLogger(__name__)

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Finding:
    level: str
    area: str
    message: str

    def __str__(self) -> str:
        return f"[{self.level:>4}] {self.area}: {self.message}"


async def run_doctor(settings: Settings, fix: bool = False) -> list[Finding]:
    findings = await asyncio.to_thread(_permissions, settings, fix)
    if settings.backend == "postgresql":
        database, current = await _postgres_database(settings)
    else:
        database, current = await asyncio.to_thread(_database, settings)
    findings += database
    if not current:
        return findings  # the rest reads the database, and only at this adiuva's schema
    findings += await _storage(settings, fix)
    if fix and (removed := await asyncio.to_thread(remove_leftovers, settings)):
        findings.append(Finding(OK, "backups", f"removed {removed} leftover(s) of interrupted server backups"))
    findings += await _llm(settings)
    findings.append(await asyncio.to_thread(_license, settings))
    return findings


def _license(settings: Settings) -> Finding:
    """The license file as the server reads it: homelab mode is fine; an unusable file, an
    expiry near or past, is said."""
    from adiuva_server.license.state import LicenseState, LicenseStatus

    ev = LicenseState.load(settings).current
    if ev.status is LicenseStatus.NONE:
        return Finding(OK, "license", "no license file: homelab mode (tiers are set with `adiuva user set-tier`)")
    if ev.status is LicenseStatus.INVALID:
        return Finding(FAIL, "license", ev.reason + "; install a valid one with `adiuva license install FILE` or remove it")
    return Finding(OK if ev.status is LicenseStatus.VALID else WARN, "license", f"{ev.status.value}: {ev.reason}")


def _permissions(settings: Settings, fix: bool) -> list[Finding]:
    out = []
    for path, mode in ((settings.data_dir, 0o700), (settings.data_dir / JWT_SECRET_FILE, 0o600), (settings.data_dir / KEY_FILE, 0o600)):
        if not path.exists():
            continue
        actual = stat.S_IMODE(path.stat().st_mode)
        if actual & 0o077:
            if fix:
                os.chmod(path, mode)
                out.append(Finding(OK, "permissions", f"{path} was {actual:o}, now {mode:o} (fixed)"))
            else:
                out.append(Finding(FAIL, "permissions", f"{path} is readable by others (mode {actual:o}; want {mode:o}); --fix mends it"))
    if not out:
        out.append(Finding(OK, "permissions", f"{settings.data_dir} and its secrets are private to their owner"))
    return out


def _database(settings: Settings) -> tuple[list[Finding], bool]:
    """Findings, and whether the database is sound and at this adiuva's schema version."""
    if not settings.db_path.exists():
        return [Finding(FAIL, "database", f"{settings.db_path} does not exist (has the server ever started here?)")], False
    conn = connect(settings.db_path, readonly=True)
    try:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        fk = conn.execute("PRAGMA foreign_key_check").fetchall()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
    finally:
        conn.close()
    latest = migrations()[-1][0]
    out = []
    if integrity != ["ok"]:
        out.append(Finding(FAIL, "database", "integrity check failed: " + "; ".join(integrity[:5])))
    if fk:
        out.append(Finding(FAIL, "database", f"{len(fk)} row(s) violate foreign keys"))
    if version < latest:
        out.append(Finding(WARN, "database", f"schema version {version}; the next start migrates to {latest}"))
    elif version > latest:
        out.append(Finding(FAIL, "database", f"schema version {version} is newer than this adiuva ({latest})"))
    if not out:
        out.append(Finding(OK, "database", f"integrity ok, schema version {version}"))
    return out, all(f.level == OK for f in out)


async def _postgres_database(settings: Settings) -> tuple[list[Finding], bool]:
    """DATABASE_URL: reachable, and at this adiuva's schema version (every bundled migration
    recorded; the next start applies missing ones)."""
    from adiuva_server.db.postgres import PgDatabase
    from adiuva_server.db.postgres.database import migrations as pg_migrations

    try:
        pg = await PgDatabase.open(settings.database_url, min_size=1, max_size=1, migrate=False)
    except Exception as exc:  # any failure to connect is the finding
        return [Finding(FAIL, "database", f"PostgreSQL (DATABASE_URL) is not reachable: {type(exc).__name__}: {exc}")], False
    try:
        if await pg.fetchval("SELECT to_regclass('schema_migrations')") is None:
            done: set[int] = set()
        else:
            done = {r[0] for r in await pg.fetch("SELECT version FROM schema_migrations")}
    finally:
        await pg.close()
    bundled = {v for v, _, _ in pg_migrations()}
    latest = max(bundled)
    if done and max(done) > latest:
        return [Finding(FAIL, "database", f"PostgreSQL schema version {max(done)} is newer than this adiuva ({latest})")], False
    if missing := sorted(bundled - done):
        return [Finding(WARN, "database", f"PostgreSQL schema lacks migration(s) {', '.join(map(str, missing))}; "
                                          "the next start applies them")], False
    return [Finding(OK, "database", f"PostgreSQL reachable, schema version {latest}")], True


@contextlib.asynccontextmanager
async def _storage_store(settings: Settings) -> AsyncIterator[StorageStore]:
    """The storage metadata on connections of the doctor's own, unmigrated (it only reads)."""
    if settings.backend == "postgresql":
        from adiuva_server.db.postgres import PgDatabase
        from adiuva_server.storage.postgres import PostgresStorageStore

        pg = await PgDatabase.open(settings.database_url, min_size=1, max_size=1, migrate=False)
        try:
            yield PostgresStorageStore(pg)
        finally:
            await pg.close()
        return
    # Its own connections, also inside the server: its long reads keep the server's pools free.
    db = await Database.open(settings.db_path, synchronous=settings.sqlite_synchronous, readers=1, migrate=False)
    try:
        yield SQLiteStorageStore(db)
    finally:
        await db.close()


async def _storage(settings: Settings, fix: bool) -> list[Finding]:
    async with maintenance.blob_store(settings) as blobs:
        return await _check_storage(settings, blobs, fix)


async def _check_storage(settings: Settings, blobs: BlobStore, fix: bool) -> list[Finding]:
    async with _storage_store(settings) as store:
        report = await maintenance.check(store, blobs, verify_hashes=True)
        if report.missing:
            # A record deleted or replaced while the check ran takes its object with it: only
            # objects still referenced now are missing.
            still = await store.referenced(report.missing)
            report.missing = [d for d in report.missing if d in still]
        out = []
        if report.missing:
            out.append(Finding(FAIL, "storage", f"{len(report.missing)} referenced object(s) missing, e.g. {report.missing[0]}"))
        if report.corrupt:
            out.append(Finding(FAIL, "storage", f"{len(report.corrupt)} object(s) do not hash to their name, e.g. {report.corrupt[0]}"))
        for user, kind, counted, actual in report.usage_drift[:5]:
            out.append(Finding(FAIL, "storage", f"user {user}: {kind} usage counted {counted} bytes, stored {actual}"))
        leftovers = report.unreferenced + report.temporary
        if leftovers:
            if fix:
                # A running server may be between storing an object and committing its row:
                # leave young leftovers alone unless it is stopped.
                # A bucket may be shared with servers on other machines, which no local lock sees.
                grace = (maintenance.DEFAULT_GRACE_SECONDS if settings.s3_bucket or server_running(settings.data_dir)
                         else 0.0)
                swept = await maintenance.sweep(store, blobs, grace_seconds=grace)
                left = leftovers - swept.objects_removed - swept.temporary_removed
                note = (f"; {left} younger than {grace / 3600:.0f} h left alone while the server runs "
                        "(it may still be writing them)" if left > 0 and grace else "")
                out.append(Finding(OK, "storage", f"swept {swept.objects_removed} unreferenced object(s), "
                                                  f"{swept.temporary_removed} temporary file(s){note}"))
            else:
                out.append(Finding(WARN, "storage", f"{report.unreferenced} unreferenced object(s), {report.temporary} "
                                                    "temporary file(s) (harmless; swept by the server or --fix)"))
        if not (report.missing or report.corrupt or report.usage_drift):
            out.append(Finding(OK, "storage", f"{report.referenced} referenced object(s) present and hash right"))
        return out


async def _llm(settings: Settings) -> list[Finding]:
    out = []
    models = list(dict.fromkeys((settings.llm_model, settings.llm_router_model, *settings.llm_models)))
    if any(m.startswith("ollama/") for m in models):
        import ollama

        client = ollama.AsyncClient(host=settings.ollama_host, timeout=3)
        try:
            listed = await client.list()
            names = {m.model for m in listed.models}
            for model in (m for m in models if m.startswith("ollama/")):
                name = model.split("/", 1)[1]
                found = name in names or f"{name}:latest" in names
                out.append(Finding(OK if found else WARN, "llm", f"{model}: Ollama at {settings.ollama_host} is reachable"
                                   + ("" if found else f", but has not pulled {name} (`ollama pull {name}`)")))
        except Exception as exc:  # any failure to reach it is the finding
            out.append(Finding(WARN, "llm", f"Ollama at {settings.ollama_host} is not reachable ({type(exc).__name__}); chat answers 503 until it is"))
    others = [m for m in models if not m.startswith("ollama/")]
    if others:
        if importlib.util.find_spec("litellm") is None:
            out.append(Finding(FAIL, "llm", f"{', '.join(others)} need LiteLLM: pip install 'adiuva-server[llm]'"))
        else:
            out.append(Finding(OK, "llm", f"{', '.join(others)} via LiteLLM (installed; not called, a probe would cost a request)"))
    return out


# -- in the server: the last result for the admin status ----------------------------------------

DOCTOR_FIRST_DELAY = 60.0  # after start: let the server settle (and warm its caches) first


def iso_utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class DoctorRun:
    started_at: str  # ISO 8601, UTC
    finished_at: str
    duration_seconds: float
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None  # the run itself failed (the findings are then empty)

    def count(self, level: str) -> int:
        return sum(1 for f in self.findings if f.level == level)


class DoctorMonitor:
    """The doctor's checks (never `fix`) in the background: `DOCTOR_FIRST_DELAY` after start,
    then every `settings.doctor_interval` seconds (0: only when triggered), keeping the last
    result. One worker task runs them, so runs never overlap; a trigger during a run asks for
    one more run after it (so what appears after a trigger was checked after it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.last: DoctorRun | None = None
        self.running = False
        self.next_run: float | None = None  # wall clock, of the next scheduled run
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    @property
    def busy(self) -> bool:
        """A run is in progress or about to start."""
        return self.running or self._wake.is_set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="adiuva-doctor")

    def trigger(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        interval = self.settings.doctor_interval
        delay = min(DOCTOR_FIRST_DELAY, interval) if interval > 0 else None
        while True:
            self.next_run = time.time() + delay if delay is not None else None
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()
            await self.run_once()
            delay = interval if interval > 0 else None

    async def run_once(self) -> DoctorRun:
        self.running = True
        started, clock = time.time(), time.monotonic()
        findings: list[Finding] = []
        error = None
        try:
            findings = await run_doctor(self.settings)
        except Exception:
            log.exception("the background doctor run failed")
            error = "the doctor's run failed; see the server log"
        finally:
            self.running = False
        run = self.last = DoctorRun(iso_utc(started), iso_utc(time.time()), round(time.monotonic() - clock, 3), findings, error)
        log.info("doctor: %d ok, %d warning(s), %d problem(s)%s", run.count(OK), run.count(WARN), run.count(FAIL),
                 f" ({error})" if error else "")
        for f in findings:
            if f.level != OK:
                log.warning("doctor: %s", f)
        return run
