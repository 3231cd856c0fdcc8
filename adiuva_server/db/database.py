"""The SQLite façade: every connection is prepared in `connect`, all writes go through one
writer connection, reads through a small pool.

- The stdlib `sqlite3` of many Python builds cannot load extensions, so connections come from
  `sqlean` (a drop-in DB-API module that can) and sqlite-vec is loaded on each of them.
- SQLite allows one writer: `write()` serialises writers on one connection and opens each
  transaction with BEGIN IMMEDIATE (a deferred transaction upgraded to a write fails at once with
  "database is locked"). Never await network I/O inside `write()`.
- `run_read(fn)` runs `fn(conn)` on a pooled plain connection in a worker thread: several
  statements (and numpy work) in one read transaction for one thread hand-off.
- `lookup()` runs a point query synchronously on the event loop. It exists for the per-request
  auth check: a primary-key read from a WAL database costs ~3 us here, an aiosqlite round trip
  ~300 us (a thread hand-off each way). Use it for indexed single-row reads only.
- `commit_marker()` tells whether anyone has committed since a cached read, so the per-request
  auth state can be cached without ever being stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import re
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiosqlite
import sqlean
import sqlite_vec

log = logging.getLogger(__name__)

Row = sqlean.Row
BUSY_TIMEOUT_MS = 10_000
# Memory-mapped reads: sqlite-vec's KNN scans read every chunk of a partition; mmap saves
# a copy per page (a 100k x 384 search: 50 ms -> 37 ms here). Address space, not resident memory.
MMAP_BYTES = 1024**3
T = TypeVar("T")
_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# The WAL-index ("-shm" file, shared memory of every connection to a WAL database) starts with
# two copies of a 48-byte header that every commit rewrites: a change counter, the last valid
# frame, salts and checksums (layout of the unix and windows VFSes: sqlite.org/walformat.html).
WAL_INDEX_HEADER = struct.Struct("=IIIBBHII")  # iVersion, unused, iChange, isInit, ...
WAL_INDEX_VERSION = 3007000
WAL_INDEX_HEADERS_BYTES = 96


def connect(path: str | Path, *, synchronous: str = "full", readonly: bool = False) -> Any:
    """Open and prepare one SQLite connection (used by the server, the CLI and tests alike)."""
    conn = sqlean.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlean.Row
    # busy_timeout before journal_mode: switching to WAL itself needs a lock.
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    # Deleted rows are overwritten with zeros, not left in free pages: a deleted user's email,
    # ids and payloads must not survive in the file or in a server backup made after.
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
    conn.execute(f"PRAGMA synchronous = {'FULL' if synchronous == 'full' else 'NORMAL'}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    conn.enable_load_extension(True)
    try:
        sqlite_vec.load(conn)
    finally:
        conn.enable_load_extension(False)
    return conn


class WalIndexHeader:
    """The WAL-index header of an open WAL database, mapped read-only (`read()` is a memory read).

    Lifetime matters: POSIX releases every fcntl() lock a process holds on a file as soon as
    *any* descriptor of that file is closed, and SQLite's connections hold locks on the -shm
    file. Closing our descriptor (or the mapping, which holds a duplicate) while they are open
    would drop their locks; another process would then take the file for new and truncate it
    under them (SIGBUS). Since the locks belong to the process, there is one mapping per file
    per process, shared by every `Database` on it, and closed only when the last of them has
    closed its connections. The rule that follows: in a process that maps it (the server), no
    other connection to the file (`connect()`) may outlive the last `Database` on it."""

    _mapped: ClassVar[dict[tuple[int, int], WalIndexHeader]] = {}

    @classmethod
    def acquire(cls, path: Path) -> WalIndexHeader:
        path = Path(os.path.realpath(path))  # where SQLite keeps it when the file is a symlink
        st = os.stat(f"{path}-shm")
        header = cls._mapped.get((st.st_dev, st.st_ino))
        if header is None:
            header = cls(path)
            cls._mapped[header._key] = header  # the file it opened, should the name have moved
        header._users += 1
        return header

    def __init__(self, path: Path) -> None:
        self._fd = os.open(f"{path}-shm", os.O_RDONLY)
        st = os.fstat(self._fd)
        self._key = (st.st_dev, st.st_ino)
        self._users = 0
        self._map: mmap.mmap | None = None
        self.usable = False
        try:
            if st.st_size >= 2 * WAL_INDEX_HEADERS_BYTES:
                self._map = mmap.mmap(self._fd, WAL_INDEX_HEADERS_BYTES, access=mmap.ACCESS_READ)
                version, _, _, is_init, *_ = WAL_INDEX_HEADER.unpack_from(self._map)
                self.usable = version == WAL_INDEX_VERSION and is_init == 1
        except (OSError, ValueError):
            pass  # not usable; still closed only by release()

    def read(self) -> bytes:
        return self._map[:WAL_INDEX_HEADERS_BYTES]  # type: ignore[index]

    def release(self) -> None:
        """Call after closing the connections this user opened."""
        self._users -= 1
        if self._users > 0:
            return
        if WalIndexHeader._mapped.get(self._key) is self:
            del WalIndexHeader._mapped[self._key]
        if self._map is not None:
            self._map.close()
        os.close(self._fd)


def _open_wal_index(conn: Any, path: Path) -> WalIndexHeader | None:
    conn.execute("PRAGMA data_version").fetchone()  # attaches this connection to the WAL-index
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        return None
    try:
        return WalIndexHeader.acquire(path)
    except OSError:
        return None


def _call_read(conn: Any, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    try:
        return fn(conn, *args)
    finally:
        if conn.in_transaction:  # a reader left mid-transaction would pin an old snapshot
            conn.rollback()


def migrations() -> list[tuple[int, str, str]]:
    """The bundled migrations, (version, name, sql), in order."""
    found = []
    for entry in resources.files("adiuva_server.db.migrations").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


def split_statements(sql: str) -> list[str]:
    statements, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlean.complete_statement(buf):
            if buf.strip().rstrip(";").strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip():
        raise RuntimeError(f"incomplete SQL statement in migration: {buf[:80]!r}")
    return statements


class Database:
    """Open with `await Database.open(path)`; close with `await db.close()`."""

    def __init__(self, path: Path, synchronous: str, readers: int) -> None:
        self.path = Path(path)
        self._synchronous = synchronous
        self._n_readers = readers
        self._writer: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()
        self._readers: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        self._all_readers: list[aiosqlite.Connection] = []
        self._loop_conn: Any = None
        self._wal_index: WalIndexHeader | None = None
        self._wal_header: Callable[[], bytes] | None = None  # its read(), when usable
        self._sync_readers: asyncio.Queue[Any] = asyncio.Queue()
        self._all_sync_readers: list[Any] = []
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    async def open(cls, path: str | Path, *, synchronous: str = "full", readers: int = 2, migrate: bool = True,
                   watch_commits: bool = False) -> Database:
        """`migrate=False` for tools that inspect a database (doctor, backup snapshots): they
        must not change the schema under a server of another version. `watch_commits=True`
        (the server) maps the WAL-index so `commit_marker()` is a memory read; see
        WalIndexHeader for the rule that then holds in this process."""
        db = cls(Path(path), synchronous, readers)
        try:
            db._writer = await aiosqlite.Connection(lambda: connect(db.path, synchronous=synchronous), 64)
            if migrate:
                await db.migrate()
            for _ in range(readers):
                conn = await aiosqlite.Connection(
                    lambda: connect(db.path, synchronous=synchronous, readonly=True), 64
                )
                db._all_readers.append(conn)
                db._readers.put_nowait(conn)
            db._loop_conn = connect(db.path, synchronous=synchronous, readonly=True)
            if watch_commits:
                db._wal_index = _open_wal_index(db._loop_conn, db.path)
            if db._wal_index is not None and db._wal_index.usable:
                db._wal_header = db._wal_index.read
            db._executor = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="adiuva-read")
            for _ in range(readers):
                conn = connect(db.path, synchronous=synchronous, readonly=True)
                db._all_sync_readers.append(conn)
                db._sync_readers.put_nowait(conn)
        except BaseException:
            await db.close()
            raise
        return db

    async def close(self) -> None:
        if self._executor is not None:  # let running `run_read` calls finish first
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None
        for conn in self._all_sync_readers:
            conn.close()
        self._all_sync_readers.clear()
        for conn in self._all_readers:
            await conn.close()
        self._all_readers.clear()
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None
        if self._writer is not None:
            # A clean close checkpoints the WAL into the main file.
            await self._writer.close()
            self._writer = None
        self._wal_header = None
        if self._wal_index is not None:  # only now: see WalIndexHeader
            self._wal_index.release()
            self._wal_index = None

    # -- reads ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def reader(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._readers.get()
        try:
            yield conn
        finally:
            if conn.in_transaction:  # a reader left mid-transaction would pin an old snapshot
                await conn.rollback()
            self._readers.put_nowait(conn)

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Row]:
        async with self.reader() as conn:
            return list(await conn.execute_fetchall(sql, params))

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Row | None:
        async with self.reader() as conn:
            async with conn.execute(sql, params) as cur:
                return await cur.fetchone()

    async def run_read(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` on a pooled read-only connection in a worker thread. `fn` may open
        a transaction (BEGIN) to read several statements from one snapshot; whatever it leaves
        open is rolled back before the connection goes back to the pool."""
        assert self._executor is not None, "database is closed"
        conn = await self._sync_readers.get()
        fut = asyncio.get_running_loop().run_in_executor(self._executor, _call_read, conn, fn, args)

        def release(f: asyncio.Future[Any]) -> None:
            if not f.cancelled():
                f.exception()  # retrieved: an abandoned call's error is not "never retrieved"
            self._sync_readers.put_nowait(conn)

        # The connection goes back only when the thread is done with it, even if we are cancelled.
        fut.add_done_callback(release)
        return await asyncio.shield(fut)

    def lookup(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """Synchronous indexed single-row read on the event loop (see module docstring). Its
        cursor is dropped at once: a cursor kept open here would pin an old snapshot."""
        return self._loop_conn.execute(sql, params).fetchone()

    def commit_marker(self) -> object:
        """A value that changes whenever anyone (our writer, the CLI, another process) commits:
        equal markers mean nothing was committed in between, so reads cached under the first are
        still exact. Read from the mapped WAL-index header (a memory read); PRAGMA data_version
        tells the same but takes two fcntl() lock calls, ~10 us a request under load."""
        if self._wal_header is not None:
            return self._wal_header()
        return self.data_version()

    def data_version(self) -> int:
        """Changes whenever any other connection (our writer, the CLI, another process) has
        committed since the last call (as long as no read transaction is left open on this
        connection, which would freeze it)."""
        conn = self._loop_conn
        if conn.in_transaction:
            conn.rollback()
        return conn.execute("PRAGMA data_version").fetchone()[0]

    # -- writes -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction: BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        assert self._writer is not None, "database is closed"
        async with self._write_lock:
            conn = self._writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.rollback()
                raise
            else:
                await conn.commit()

    async def execute_write(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        """One statement in its own transaction; returns the number of rows changed."""
        async with self.write() as conn:
            cur = await conn.execute(sql, params)
            return cur.rowcount

    async def executemany_write(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self.write() as conn:
            await conn.executemany(sql, rows)

    async def checkpoint_truncate(self) -> bool:
        """Copy the WAL into the database file and truncate the WAL to zero bytes, so page
        images of deleted rows do not linger in it. Waits (busy_timeout) for readers of older
        snapshots; False when some were still reading and the WAL could not be emptied."""
        assert self._writer is not None, "database is closed"
        async with self._write_lock:
            async with self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                busy, _log_frames, _copied = await cur.fetchone()
        return busy == 0

    # -- schema -----------------------------------------------------------------------------

    async def migrate(self) -> int:
        """Apply bundled migrations newer than `PRAGMA user_version`, each in its own
        transaction; safe when two processes start at once (re-checked under the lock)."""
        bundled = migrations()
        latest = bundled[-1][0] if bundled else 0
        for version, name, sql in bundled:
            async with self.write() as conn:
                async with conn.execute("PRAGMA user_version") as cur:
                    (current,) = await cur.fetchone()
                if current > latest:
                    raise RuntimeError(
                        f"database schema version {current} is newer than this server "
                        f"({latest}); upgrade adiuva"
                    )
                if current >= version:
                    continue
                log.info("applying migration %s", name)
                for statement in split_statements(sql):
                    await conn.execute(statement)
                await conn.execute(f"PRAGMA user_version = {version}")
        return latest
