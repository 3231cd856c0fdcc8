"""Vector storage: `VectorStore` is the async interface the service uses (`PostgresVectorStore`
in vectors/postgres.py implements the same four methods on pgvector); `SQLiteVectorStore` keeps
embeddings in the server's SQLite file. No SQL about vectors lives elsewhere.

Layout (db/migrations/0003, 0005, 0009): one table, `vector_items`, holds each vector's client
id, encrypted payload, checksum and embedding (float32 blob, native byte order; unit vectors for
cosine) keyed by `vec_rowid`; `vector_collections` maps (user, name) to a collection id, its
dimension, metric, count and version. A small collection costs its rows and nothing more:
sqlite-vec's vec0 tables, used before, allocated a whole chunk per collection (16.9 KB a vector
for 1,000 users x 3 vectors of 384), and its 0.1.9 wheel has no SIMD.

Search: every searched collection gets an in-memory float32 copy within the cache budget
(vectors/mirror.py: exact numpy search, versioned, keyed by user and collection). Without a
current copy the search reads the collection's rows in its own read transaction: a small
collection's rows become its copy; a large one (`stream_min_rows`) is answered from its rows as
they are read, a piece at a time, and its copy loads in the background; a collection larger
than the whole budget is always scanned that way. Writes of this process move a copy forward
instead of dropping it. After a restart the largest collections are loaded in the background
(`warm_up`); a search never waits for that. Copies of large
collections are persisted as snapshot files (vectors/snapshots.py) after they change, off the
event loop and debounced; a load memory-maps the snapshot of exactly the database's state when
there is one, and reads the rows otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from adiuva_server import errors
from adiuva_server.db import Database
from adiuva_server.storage.store import charge
from adiuva_server.vectors import snapshots
from adiuva_server.vectors.mirror import Key, MirrorEntry, VectorMirror, merge_top_k

log = logging.getLogger(__name__)

MAX_DIMENSION = 4096
METRICS = ("l2", "cosine")
# Vectors x dimensions above which normalising a batch leaves the event loop.
OFFLOAD_VALUES = 65536


@dataclass(frozen=True, slots=True)
class NewVector:
    id: str
    embedding: bytes  # float32, native byte order, `dimension` values
    payload: bytes
    checksum: str


@dataclass(frozen=True, slots=True)
class Match:
    id: str
    distance: float
    payload: bytes
    checksum: str


@dataclass(frozen=True, slots=True)
class Collection:
    id: int
    name: str
    dimension: int
    metric: str
    count: int
    user_id: str


@dataclass(frozen=True, slots=True)
class UpsertResult:
    collection: Collection
    inserted: int
    replaced: int


def stored_bytes(payload_bytes: int, dimension: int) -> int:
    """What one vector counts against the cloud-storage quota: its payload and its embedding."""
    return payload_bytes + 4 * dimension


class VectorStore(Protocol):
    async def get_collection(self, user_id: str, name: str) -> Collection | None: ...

    async def upsert(
        self, user_id: str, tier: str, name: str, metric: str | None, dimension: int, vectors: Sequence[NewVector]
    ) -> UpsertResult:
        """All or nothing, in one transaction: creates the collection (dimension, metric) if
        needed, replaces vectors with the same id, charges the quota. Raises DimensionMismatch,
        MetricMismatch, QuotaExceeded."""

    async def search(self, collection: Collection, query: bytes, k: int) -> list[Match]:
        """The k nearest vectors of `collection` to `query` (float32 bytes), nearest first;
        exact (equal to a float64 brute force over the stored float32 vectors)."""

    async def delete(self, user_id: str, tier: str, name: str, ids: Sequence[str]) -> int:
        """Delete these ids (unknown ones are ignored); returns how many were deleted."""


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, computed in float64 and rounded once to float32: how cosine
    vectors (stored and queried alike) are kept."""
    x64 = x.astype(np.float64)
    return (x64 / np.linalg.norm(x64, axis=-1, keepdims=True)).astype(np.float32)


def _matches(conn: Any, coll: Collection, rowids: np.ndarray, d2: np.ndarray) -> list[Match]:
    cosine = coll.metric == "cosine"
    found = {
        r[0]: r[1:]
        for r in conn.execute(
            # Primary-key lookups; `+` keeps the planner off the collection indexes, which would
            # scan the whole collection.
            "SELECT vec_rowid, item_id, payload, checksum FROM vector_items "
            "WHERE vec_rowid IN (SELECT value FROM json_each(?)) AND +collection_id = ?",
            (json.dumps(rowids.tolist()), coll.id),
        )
    }
    if len(found) != len(rowids):  # cannot happen: rows and version come from one snapshot
        raise RuntimeError(f"vector copy of collection {coll.id} disagrees with the database")
    out = []
    for rowid, dist2 in zip(rowids.tolist(), d2.tolist(), strict=True):
        item_id, payload, checksum = found[rowid]
        # cosine: |a - b|^2 / 2 = 1 - cos between unit vectors
        out.append(Match(item_id, dist2 / 2.0 if cosine else math.sqrt(dist2), payload, checksum))
    return out


# Rows of a collection one aggregate query returns: its 1.5 MB (at 384 dimensions) stay in
# the CPU cache through SQLite's and Python's copies (16,384 rows at a time: 2.5x slower).
PIECE_ROWS = 1024
_PIECE_SQL = (
    # Both aggregates consume the same rows in the same order, so the rowids and the
    # concatenated embeddings always line up (ascending is checked, not assumed). In a UTF-8
    # database group_concat copies a blob's bytes unchanged; CAST makes the text a blob again.
    "SELECT group_concat(r), CAST(group_concat(e, '') AS BLOB), count(*), max(r), sum(length(e)) FROM ("
    "SELECT vec_rowid AS r, embedding AS e FROM vector_items WHERE {where} AND embedding IS NOT NULL "
    "ORDER BY vec_rowid LIMIT ?)"
)
_PIECE_RANGE = _PIECE_SQL.format(where="vec_rowid > ? AND vec_rowid <= ? AND +collection_id = ?")
_PIECE_INDEX = _PIECE_SQL.format(where="collection_id = ? AND vec_rowid > ?")


def _read_pieces(conn: Any, coll_id: int, dimension: int, count: int):
    """The collection's (rowids, float32 matrix) in ascending rowid order, up to PIECE_ROWS
    rows at a time, each piece one query: 100k x 384 in ~100 ms where fetching a row at a time
    took ~240 ms (a tuple and a bytes object a row, then a copy each)."""
    cur = conn.cursor()
    cur.row_factory = None
    if cur.execute("PRAGMA encoding").fetchone()[0] != "UTF-8":
        raise RuntimeError("the database is not UTF-8: vectors cannot be read in bulk")
    lo, hi = cur.execute(
        "SELECT min(vec_rowid), max(vec_rowid) FROM vector_items WHERE collection_id = ?", (coll_id,)
    ).fetchone()
    if lo is None:
        return
    # Mostly this collection's rows (written together): reading the table in rowid order is
    # ~2x faster than one index lookup per row.
    by_range = hi - lo < 2 * count
    after, size = lo - 1, 4 * dimension
    while True:
        args = (after, hi, coll_id, PIECE_ROWS) if by_range else (coll_id, after, PIECE_ROWS)
        ids, blob, n, top, total = cur.execute(_PIECE_RANGE if by_range else _PIECE_INDEX, args).fetchone()
        if not n:
            return
        if total != n * size or len(blob) != total:
            raise RuntimeError(f"vector collection {coll_id} holds embeddings of another dimension than {dimension}")
        rowids = np.array(ids.split(","), dtype=np.int64)
        x = np.frombuffer(blob, dtype=np.float32).reshape(n, dimension)
        if n > 1 and not np.all(rowids[1:] > rowids[:-1]):  # not seen: SQLite reads them in order
            order = np.argsort(rowids)
            rowids, x = rowids[order], x[order]
        yield rowids, x
        after = top


def _scan(conn: Any, coll_id: int, dimension: int, count: int, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact k nearest over the rows as they are read, a piece at a time (memory: one
    piece): for a collection with no copy in memory, or too large for one."""
    best = (np.empty(0, np.int64), np.empty(0, np.float64))
    for ids, x in _read_pieces(conn, coll_id, dimension, count):
        best = merge_top_k([best, MirrorEntry.wrap(0, ids, x).top_k(q, k)], k)
    return best


def _read_entry(conn: Any, coll_id: int, dimension: int, count: int, version: int) -> MirrorEntry:
    return MirrorEntry.from_blocks(version, count, dimension, _read_pieces(conn, coll_id, dimension, count))


class SQLiteVectorStore:
    """`snapshot_dir`: where copies are persisted (None: never)."""

    # Seconds without a change to a copy before its snapshot is written (a sync of many batches
    # writes the file once, not once a batch).
    snapshot_quiet = 2.0
    snapshot_min_rows = snapshots.MIN_ROWS
    # A collection this large with no current copy (and no snapshot of its state) is searched
    # straight from its rows, a piece at a time, while its copy loads in the background:
    # building a copy of 100k x 384 on the request path added 20-330 ms of page faults on fresh
    # memory here to the ~120 ms of reading.
    stream_min_rows = 8192

    def __init__(self, db: Database, mirror: VectorMirror | None = None, snapshot_dir: Path | None = None) -> None:
        self.db = db
        self.mirror = mirror if mirror is not None and mirror.enabled else None
        self.snapshot_dir = snapshot_dir if self.mirror is not None else None
        self._on_disk: dict[Key, int] = {}  # the version of each key's snapshot file
        self._dirty: set[Key] = set()
        self._changed_at = 0.0
        self._snapshotter: asyncio.Task[None] | None = None
        self._warming: asyncio.Task[int] | None = None
        self._coarse: asyncio.Future[bool] | None = None  # one quantized copy built at a time
        # Collections whose rows a search is reading now: the warm-up leaves them to it (two
        # threads reading the same rows would slow that search for nothing).
        self._reading: set[Key] = set()
        # Large collections a search is scanning now (no copy yet): the warm-up lets the first
        # such search finish before it loads the same rows (not longer: searches may keep coming).
        self._scanning: set[Key] = set()
        self._loading: dict[Key, asyncio.Task[bool]] = {}  # one background load of a key at a time
        self._closing = False
        self._writing: asyncio.Future[int] | None = None  # the snapshot file being written

    async def get_collection(self, user_id: str, name: str) -> Collection | None:
        # An indexed single-row read: cheaper on the event loop than a thread hand-off.
        row = self.db.lookup(
            "SELECT id, name, dimension, metric, count, user_id FROM vector_collections WHERE user_id = ? AND name = ?",
            (user_id, name),
        )
        return None if row is None else Collection(*row)

    # -- writes -----------------------------------------------------------------------------

    async def upsert(
        self, user_id: str, tier: str, name: str, metric: str | None, dimension: int, vectors: Sequence[NewVector]
    ) -> UpsertResult:
        x = np.frombuffer(b"".join(v.embedding for v in vectors), dtype=np.float32).reshape(len(vectors), dimension)
        async with self.db.write() as conn:
            coll, before = await self._collection_for_write(conn, user_id, name, metric, dimension)
            if coll.metric == "cosine":
                x = await asyncio.to_thread(unit_rows, x) if x.size > OFFLOAD_VALUES else unit_rows(x)
            async with conn.execute(
                "SELECT item_id, vec_rowid, length(payload) FROM vector_items "
                "WHERE collection_id = ? AND item_id IN (SELECT value FROM json_each(?))",
                (coll.id, json.dumps([v.id for v in vectors])),
            ) as cur:
                existing = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
            delta = sum(stored_bytes(len(v.payload), dimension) for v in vectors)
            delta -= sum(stored_bytes(size, dimension) for _, size in existing.values())
            await charge(conn, user_id, tier, "cloud", delta)
            # New rows get rowids above every rowid in the table, so a collection's rowids grow
            # with its inserts (the in-memory copy appends instead of re-sorting).
            async with conn.execute("SELECT coalesce(max(vec_rowid), 0) FROM vector_items") as cur:
                (top,) = await cur.fetchone()
            rowids = np.empty(len(vectors), dtype=np.int64)
            updates, inserts = [], []
            for i, v in enumerate(vectors):
                emb = x[i].tobytes()
                if v.id in existing:
                    rowids[i] = existing[v.id][0]
                    updates.append((v.payload, v.checksum, emb, int(rowids[i])))
                else:
                    top += 1
                    rowids[i] = top
                    inserts.append((top, coll.id, v.id, dimension, v.payload, v.checksum, emb))
            if updates:
                await conn.executemany(
                    "UPDATE vector_items SET payload = ?, checksum = ?, embedding = ? WHERE vec_rowid = ?", updates
                )
            if inserts:
                await conn.executemany(
                    "INSERT INTO vector_items (vec_rowid, collection_id, item_id, dimension, payload, checksum, embedding) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    inserts,
                )
            async with conn.execute(
                "UPDATE vector_collections SET count = count + ? WHERE id = ? RETURNING version", (len(inserts), coll.id)
            ) as cur:
                (after,) = await cur.fetchone()
        # Committed: move this process's copy forward (versions make a lost race harmless).
        if self.mirror is not None and before is not None:
            order = np.argsort(rowids, kind="stable")
            args = ((user_id, coll.id), before, after, rowids[order], x[order])
            if x.size > OFFLOAD_VALUES:
                await asyncio.to_thread(self.mirror.advance, *args)
            else:
                self.mirror.advance(*args)
            self._snapshot_later((user_id, coll.id))
        coll = Collection(coll.id, coll.name, coll.dimension, coll.metric, coll.count + len(inserts), user_id)
        return UpsertResult(coll, len(inserts), len(updates))

    async def _collection_for_write(
        self, conn: Any, user_id: str, name: str, metric: str | None, dimension: int
    ) -> tuple[Collection, int | None]:
        """The collection (created if needed) and its version before this write (None: new)."""
        async with conn.execute(
            "SELECT id, name, dimension, metric, count, user_id, version FROM vector_collections "
            "WHERE user_id = ? AND name = ?",
            (user_id, name),
        ) as cur:
            row = await cur.fetchone()
        if row is not None:
            coll = Collection(*row[:6])
            if coll.dimension != dimension:
                raise errors.DimensionMismatch(
                    f"collection {name!r} holds vectors of dimension {coll.dimension}; got {dimension}",
                    extra={"collection": name, "dimension": coll.dimension},
                )
            if metric is not None and metric != coll.metric:
                raise errors.MetricMismatch(
                    f"collection {name!r} uses the {coll.metric} metric; got {metric}",
                    extra={"collection": name, "metric": coll.metric},
                )
            return coll, row[6]
        metric = metric or "cosine"
        async with conn.execute(
            "INSERT INTO vector_collections (user_id, name, dimension, metric) VALUES (?, ?, ?, ?) RETURNING id",
            (user_id, name, dimension, metric),
        ) as cur:
            (coll_id,) = await cur.fetchone()
        return Collection(coll_id, name, dimension, metric, 0, user_id), None

    async def delete(self, user_id: str, tier: str, name: str, ids: Sequence[str]) -> int:
        async with self.db.write() as conn:
            async with conn.execute(
                "SELECT id, dimension, version FROM vector_collections WHERE user_id = ? AND name = ?", (user_id, name)
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return 0
            coll_id, dimension, before = row
            async with conn.execute(
                "DELETE FROM vector_items WHERE collection_id = ? AND item_id IN (SELECT value FROM json_each(?)) "
                "RETURNING vec_rowid, length(payload)",
                (coll_id, json.dumps(list(ids))),
            ) as cur:
                gone = await cur.fetchall()
            if not gone:
                return 0
            await charge(conn, user_id, tier, "cloud", -sum(stored_bytes(r[1], dimension) for r in gone))
            async with conn.execute(
                "UPDATE vector_collections SET count = count - ? WHERE id = ? RETURNING version, count",
                (len(gone), coll_id),
            ) as cur:
                after, left = await cur.fetchone()
            # An empty collection is dropped: its name is free again for any dimension.
            if left == 0:
                await conn.execute("DELETE FROM vector_collections WHERE id = ?", (coll_id,))
        if self.mirror is not None:
            key = (user_id, coll_id)
            if left == 0:
                self.mirror.discard(key)
                if self.snapshot_dir is not None:
                    await asyncio.to_thread(snapshots.delete, self.snapshot_dir, user_id, coll_id)
            else:
                empty = np.empty((0, dimension), dtype=np.float32)
                self.mirror.advance(key, before, after, np.empty(0, np.int64), empty, [r[0] for r in gone])
                self._snapshot_later(key)
        return len(gone)

    # -- search -----------------------------------------------------------------------------

    async def search(self, collection: Collection, query: bytes, k: int) -> list[Match]:
        # On a pooled reader connection (its own thread): a large search never blocks the loop.
        matches, entry, load = await self.db.run_read(self._search_sync, collection, query, k)
        key = (collection.user_id, collection.id)
        if entry is not None:
            if entry.wants_coarse:
                self._attach_coarse(entry)
            self._snapshot_later(key)
        elif load:
            self._load_in_background(key, True)
        return matches

    # -- snapshots ----------------------------------------------------------------------------

    def _snapshot_later(self, key: Key) -> None:
        """Have the current copy of `key` written to disk once it stops changing."""
        if self.snapshot_dir is None or self.mirror is None:
            return
        entry = self.mirror.peek(key)
        if entry is None or entry.n < self.snapshot_min_rows or self._on_disk.get(key) == entry.version:
            return
        self._dirty.add(key)
        self._changed_at = time.monotonic()
        if not self._closing and (self._snapshotter is None or self._snapshotter.done()):
            self._snapshotter = asyncio.create_task(self._snapshot_soon())

    async def _snapshot_soon(self) -> None:
        while (wait := self._changed_at + self.snapshot_quiet - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        await self.write_snapshots()

    async def write_snapshots(self) -> int:
        """Write the snapshots of changed copies now (one at a time, in a thread), then keep
        the files within the cache budget. Returns how many were written."""
        written = 0
        while self._dirty and self.mirror is not None and self.snapshot_dir is not None:
            key = self._dirty.pop()
            entry = self.mirror.peek(key)
            if entry is None or self._on_disk.get(key) == entry.version:
                continue
            # A write under way is not abandoned when its caller is cancelled (close awaits it):
            # a half-written file would be the only copy on disk.
            self._writing = asyncio.ensure_future(asyncio.to_thread(
                snapshots.write, self.snapshot_dir, key[0], key[1], entry.version, entry.rowids, entry.x,
                lambda e=entry, k=key: self.mirror.peek(k) is e))
            try:
                if await asyncio.shield(self._writing):
                    self._on_disk[key] = entry.version
                    written += 1
            except OSError as e:  # a full disk, say: the copy in memory still serves
                log.warning("could not write a vector snapshot: %s", e)
        if written and self.mirror is not None and self.snapshot_dir is not None:
            keep = {snapshots.stem(u, c) for u, c in self.mirror.keys()}
            await asyncio.to_thread(snapshots.prune, self.snapshot_dir, self.mirror.max_bytes, keep)
        return written

    def _attach_coarse(self, entry: MirrorEntry) -> None:
        """Build the quantized copy of a large entry in the background (searches meanwhile take
        the BLAS path; an entry replaced in the meantime just loses it)."""
        if self._coarse is None or self._coarse.done():
            self._coarse = asyncio.ensure_future(asyncio.to_thread(entry.attach_coarse))

    def _search_sync(self, conn: Any, coll: Collection, query: bytes, k: int) -> tuple[list[Match], MirrorEntry | None, bool]:
        """In one read transaction: the collection's version (for this user), then numpy over
        the current in-memory copy, or over the rows read now, and the payloads. Also says
        whether the copy should be loaded in the background (a large collection was scanned)."""
        conn.execute("BEGIN")
        row = conn.execute(
            "SELECT version, count FROM vector_collections WHERE id = ? AND user_id = ?", (coll.id, coll.user_id)
        ).fetchone()
        if row is None:  # deleted since the caller looked it up
            return [], None, False
        version, count = row
        q = np.frombuffer(query, dtype=np.float32)
        if coll.metric == "cosine":
            q = unit_rows(q)
        key = (coll.user_id, coll.id)
        mirror = self.mirror
        entry = mirror.get(key, version) if mirror is not None else None
        load = False
        if entry is None and mirror is not None and mirror.wants(count) and mirror.fits(count, coll.dimension):
            inline = count < self.stream_min_rows
            watch = self._reading if inline else self._scanning
            watch.add(key)
            try:
                entry = self._new_entry(conn, key, coll.dimension, count, version, inline)
                if entry is None:
                    load = True
                    rowids, d2 = _scan(conn, coll.id, coll.dimension, count, q, k)
            finally:
                watch.discard(key)
            if entry is not None:
                mirror.put(key, entry)
        if entry is not None:
            rowids, d2 = entry.top_k(q, k)
        elif not load:  # no copy wanted or possible: exact over the rows, one piece in memory at a time
            rowids, d2 = _scan(conn, coll.id, coll.dimension, count, q, k)
        return _matches(conn, coll, rowids, d2), entry, load

    # -- in-memory copies -------------------------------------------------------------------

    def _load_sync(self, conn: Any, key: Key, evict: bool) -> bool:
        """Read a collection's rows and version from one snapshot into the mirror."""
        assert self.mirror is not None
        user_id, coll_id = key
        conn.execute("BEGIN")
        row = conn.execute(
            "SELECT version, count, dimension FROM vector_collections WHERE id = ? AND user_id = ?", (coll_id, user_id)
        ).fetchone()
        if row is None:
            self.mirror.discard(key)
            return False
        version, count, dimension = row
        if self.mirror.peek(key) is not None and self.mirror.peek(key).version == version:
            return True
        if not self.mirror.wants(count) or not self.mirror.fits(count, dimension):
            return False
        if not evict and (key in self._reading or self.mirror.estimate_bytes(count, dimension) > self.mirror.room()):
            return False
        entry = self._new_entry(conn, key, dimension, count, version)
        return entry is not None and self.mirror.put(key, entry, evict=evict)

    def _new_entry(self, conn: Any, key: Key, dimension: int, count: int, version: int,
                   read_rows: bool = True) -> MirrorEntry | None:
        """The copy at `version` (read in `conn`'s transaction): its snapshot memory-mapped when
        one of exactly this state is on disk, else the rows (None without `read_rows`)."""
        user_id, coll_id = key
        if self.snapshot_dir is not None and count >= self.snapshot_min_rows:
            found = snapshots.load(self.snapshot_dir, conn, user_id, coll_id, version, count, dimension)
            if found is not None:
                self._on_disk[key] = version
                return MirrorEntry.wrap(version, *found)
            self._on_disk.pop(key, None)  # whatever is on disk is not this state: written anew
        return _read_entry(conn, coll_id, dimension, count, version) if read_rows else None

    async def warm(self, collection: Collection) -> bool:
        """Load the in-memory copy of `collection` now, with its quantized copy when it gets
        one (benchmarks, tests). True when a current copy is in memory afterwards."""
        return await self._load((collection.user_id, collection.id), True)

    def _load_in_background(self, key: Key, evict: bool) -> asyncio.Task[bool]:
        """The one load of `key` in flight, started if there is none (a search that scanned the
        rows for want of a copy, or the warm-up, asks for it)."""
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load_logged(key, evict))
            self._loading[key] = task
            task.add_done_callback(lambda t: self._loading.pop(key) if self._loading.get(key) is t else None)
        return task

    async def _load_logged(self, key: Key, evict: bool) -> bool:
        try:
            return await self._load(key, evict)
        except Exception:
            log.exception("could not load vector collection %s into memory", key[1])
            return False

    async def _load(self, key: Key, evict: bool) -> bool:
        if self.mirror is None or not await self.db.run_read(self._load_sync, key, evict):
            return False
        self._snapshot_later(key)
        entry = self.mirror.peek(key)
        if entry is not None and entry.wants_coarse and not self._closing:
            await asyncio.to_thread(entry.attach_coarse)
        return True

    def start_warm_up(self) -> asyncio.Task[int]:
        """Load the largest collections into the free part of the budget, one at a time, in
        the background (after a restart the cache is empty; small collections load on their
        first search in well under a millisecond, large ones are what a restart would cost)."""
        self._warming = asyncio.create_task(self._warm_up())
        return self._warming

    async def _warm_up(self) -> int:
        mirror = self.mirror
        if mirror is None:
            return 0
        loaded, budget = 0, mirror.max_bytes
        if self.snapshot_dir is not None and self.snapshot_dir.exists():
            # Files of collections or users deleted while no server ran (by the CLI, say).
            known = {snapshots.stem(u, c) for u, c in await self.db.fetchall(
                "SELECT user_id, id FROM vector_collections WHERE count >= ?", (self.snapshot_min_rows,))}
            await asyncio.to_thread(snapshots.prune, self.snapshot_dir, mirror.max_bytes, set(), known)
        rows = await self.db.fetchall(
            "SELECT user_id, id, count, dimension FROM vector_collections WHERE count >= ? ORDER BY count DESC, id",
            (mirror.min_vectors,),
        )
        for user_id, coll_id, count, dimension in rows:
            size = mirror.estimate_bytes(count, dimension)
            if size > budget:
                continue  # another, smaller one may still fit
            budget -= size
            key = (user_id, coll_id)
            until = time.monotonic() + 0.5
            while key in self._scanning and time.monotonic() < until:  # after it, not beside it
                await asyncio.sleep(0.005)
            if await asyncio.shield(self._load_in_background(key, False)):
                loaded += 1
        log.info("vector warm-up: %d collections in memory (%d MB)", loaded, mirror.nbytes // 2**20)
        return loaded

    async def close(self) -> None:
        """Stop the warm-up (it holds a database connection while it reads), let the loads under
        way finish (a read runs to its end in its thread anyway) and write the snapshots still
        pending (the next start loads them instead of the rows)."""
        self._closing = True
        for task in (self._warming, self._coarse, self._snapshotter):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*self._loading.values(), return_exceptions=True)
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        self._warming = self._coarse = self._snapshotter = None
        await self.write_snapshots()


async def upgrade_legacy_layout(db: Database) -> int:
    """Data step of migration 0009: embeddings kept in sqlite-vec vec0 tables (one per
    dimension, `vec_f32_<d>`, before 0009) move into vector_items.embedding, and those tables
    and their cleanup triggers are dropped. One transaction per table; idempotent; runs before
    the server serves (SQL alone cannot name tables found at run time). Returns the vectors moved."""
    moved = 0
    rows = await db.fetchall(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name GLOB 'vec_f32_[0-9]*' "
        "AND sql LIKE 'CREATE VIRTUAL TABLE%'"
    )
    for (table,) in rows:
        dimension = int(table.removeprefix("vec_f32_"))
        if f"vec_f32_{dimension}" != table or not 1 <= dimension <= MAX_DIMENSION:
            continue  # not one of ours: its name is built into SQL below
        async with db.write() as conn:
            cur = await conn.execute(
                f"UPDATE vector_items SET embedding = (SELECT v.embedding FROM {table} v WHERE v.rowid = vector_items.vec_rowid) "
                "WHERE dimension = ? AND embedding IS NULL",
                (dimension,),
            )
            moved += cur.rowcount
            await conn.execute(f"DROP TRIGGER IF EXISTS {table}_cleanup")
            await conn.execute(f"DROP TABLE {table}")
        log.info("vectors: moved the embeddings of %s into vector_items", table)
    missing = await db.fetchone("SELECT count(*) FROM vector_items WHERE embedding IS NULL")
    if missing and missing[0]:
        log.error("vectors: %d vectors have no embedding (skipped by searches)", missing[0])
    return moved
