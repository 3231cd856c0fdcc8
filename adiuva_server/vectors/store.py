"""Vector storage: `VectorStore` is the interface the service uses; `SQLiteVectorStore` keeps
embeddings in sqlite-vec inside the server's SQLite file. No SQL about vectors lives elsewhere.

Layout (see db/migrations/0003_vectors.sql):
- one `vec0` table per dimension, `vec_f32_<dimension>`, created on demand, partitioned by
  collection id. A search names its partition, so it reads only that collection's chunks:
  isolation by construction, and its cost does not grow with other users' data.
- `vector_items` holds the client's id, the encrypted payload and its checksum, keyed by the
  embedding's rowid; `vector_collections` maps (user, name) to a partition, its dimension and
  its metric.

sqlite-vec 0.1.9 traps handled here (DESIGN.md):
- a partition allocates a whole chunk of `CHUNK_SIZE` slots (default 1024): with per-collection
  partitions that is what most users pay, so the chunk is small (see CHUNK_SIZE);
- the chunk lookup by partition scans the whole `_chunks` shadow table (no index), so every
  insert and search would cost more as other users' data grows: we index it;
- `INSERT OR REPLACE` is broken: a replaced vector is deleted, then inserted again;
- `k` is capped at 4096 (the service bounds top_k below it);
- cosine runs as L2 over unit vectors, sqlite-vec's fastest path: the distance returned is
  1 - cos = L2^2 / 2, exact up to float32 rounding.

Large collections (`VectorMirror.min_vectors` and up) are searched from an in-memory float32
copy with numpy when one is current (vectors/mirror.py says why and how it stays exact and
isolated); otherwise, and while a copy is being read, sqlite-vec serves the search.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from adiuva_server import errors, quota
from adiuva_server.db import Database
from adiuva_server.vectors.mirror import Key, MirrorEntry, VectorMirror

log = logging.getLogger(__name__)

MAX_DIMENSION = 4096
# Slots per chunk. Each partition (collection) allocates at least one chunk of
# CHUNK_SIZE * dimension * 4 bytes: 32 keeps a 3-vector collection of dim 384 at ~50 KB on
# disk (1024, sqlite-vec's default, costs 1.5 MB). Measured at 100k x 384 (mmap on): chunks of
# 8 / 16 / 32 / 64 / 1024 slots search in 52 / 47 / 41 / 39 / 37 ms; 4096 slots upsert 20x slower.
CHUNK_SIZE = 32
# Seconds between two loads of one collection into the in-memory mirror.
RELOAD_INTERVAL = 10.0
METRICS = ("l2", "cosine")


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
        """The k nearest vectors of `collection` to `query` (float32 bytes), nearest first."""

    async def delete(self, user_id: str, tier: str, name: str, ids: Sequence[str]) -> int:
        """Delete these ids (unknown ones are ignored); returns how many were deleted."""


def _table(dimension: int) -> str:
    if not 1 <= dimension <= MAX_DIMENSION:  # the name is built into SQL: never trust it
        raise ValueError(f"dimension {dimension} out of range")
    return f"vec_f32_{dimension}"


def _knn_sql(table: str, cosine: bool) -> str:
    return (
        "SELECT i.item_id, v.distance, i.payload, i.checksum FROM ("
        f"  SELECT rowid, distance FROM {table}"
        f"  WHERE embedding MATCH {'vec_normalize(vec_f32(?))' if cosine else 'vec_f32(?)'}"
        "   AND k = ? AND collection_id = ?"
        ") v JOIN vector_items i ON i.vec_rowid = v.rowid AND i.collection_id = ? "
        "ORDER BY v.distance"
    )


def _knn_rows_to_matches(rows: Sequence[Any], cosine: bool) -> list[Match]:
    # A NULL distance (a vector float32 cannot measure; writes refuse them now) is no match.
    if cosine:  # L2 between unit vectors -> cosine distance
        return [Match(r[0], r[1] * r[1] / 2.0, r[2], r[3]) for r in rows if r[1] is not None]
    return [Match(*r) for r in rows if r[1] is not None]


class SQLiteVectorStore:
    def __init__(self, db: Database, mirror: VectorMirror | None = None) -> None:
        self.db = db
        self.mirror = mirror
        self._loading: dict[Key, asyncio.Task[None]] = {}
        self._last_load: dict[Key, float] = {}

    async def get_collection(self, user_id: str, name: str) -> Collection | None:
        # An indexed single-row read: cheaper on the event loop than a thread hand-off.
        row = self.db.lookup(
            "SELECT id, name, dimension, metric, count, user_id FROM vector_collections WHERE user_id = ? AND name = ?",
            (user_id, name),
        )
        return None if row is None else Collection(*row)

    async def upsert(
        self, user_id: str, tier: str, name: str, metric: str | None, dimension: int, vectors: Sequence[NewVector]
    ) -> UpsertResult:
        table = _table(dimension)
        ids = json.dumps([v.id for v in vectors])
        async with self.db.write() as conn:
            coll = await self._collection_for_write(conn, user_id, name, metric, dimension)
            async with conn.execute(
                "SELECT vec_rowid, length(payload) FROM vector_items "
                "WHERE collection_id = ? AND item_id IN (SELECT value FROM json_each(?))",
                (coll.id, ids),
            ) as cur:
                existing = await cur.fetchall()
            delta = sum(stored_bytes(len(v.payload), dimension) for v in vectors)
            delta -= sum(stored_bytes(size, dimension) for _, size in existing)
            await quota.apply(conn, user_id, tier, "cloud", delta)
            # INSERT OR REPLACE is broken in sqlite-vec 0.1.9: drop the old embedding first.
            await conn.executemany(f"DELETE FROM {table} WHERE rowid = ?", [(r,) for r, _ in existing])
            await conn.executemany(
                "INSERT INTO vector_items (collection_id, item_id, dimension, payload, checksum) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection_id, item_id) "
                "DO UPDATE SET payload = excluded.payload, checksum = excluded.checksum",
                [(coll.id, v.id, dimension, v.payload, v.checksum) for v in vectors],
            )
            embed = "vec_normalize(vec_f32(?))" if coll.metric == "cosine" else "vec_f32(?)"
            await conn.executemany(
                f"INSERT INTO {table} (rowid, collection_id, embedding) VALUES ("
                "(SELECT vec_rowid FROM vector_items WHERE collection_id = ? AND item_id = ?), ?, "
                f"{embed})",
                [(coll.id, v.id, coll.id, v.embedding) for v in vectors],
            )
            inserted = len(vectors) - len(existing)
            await conn.execute("UPDATE vector_collections SET count = count + ? WHERE id = ?", (inserted, coll.id))
        coll = Collection(coll.id, coll.name, coll.dimension, coll.metric, coll.count + inserted, user_id)
        return UpsertResult(coll, inserted, len(existing))

    async def _collection_for_write(self, conn: Any, user_id: str, name: str, metric: str | None, dimension: int) -> Collection:
        async with conn.execute(
            "SELECT id, name, dimension, metric, count, user_id FROM vector_collections WHERE user_id = ? AND name = ?",
            (user_id, name),
        ) as cur:
            row = await cur.fetchone()
        if row is not None:
            coll = Collection(*row)
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
            return coll
        await self._ensure_table(conn, dimension)
        metric = metric or "cosine"
        async with conn.execute(
            "INSERT INTO vector_collections (user_id, name, dimension, metric) VALUES (?, ?, ?, ?) RETURNING id",
            (user_id, name, dimension, metric),
        ) as cur:
            (coll_id,) = await cur.fetchone()
        return Collection(coll_id, name, dimension, metric, 0, user_id)

    async def _ensure_table(self, conn: Any, dimension: int) -> None:
        table = _table(dimension)
        async with conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)) as cur:
            if await cur.fetchone() is not None:
                return
        await conn.execute(
            f"CREATE VIRTUAL TABLE {table} USING vec0("
            f"collection_id integer partition key, embedding float[{dimension}], chunk_size={CHUNK_SIZE})"
        )
        # sqlite-vec finds a partition's chunks with `WHERE partition00 = ?` and has no index.
        await conn.execute(f"CREATE INDEX {table}_chunks_partition ON {table}_chunks (partition00)")
        await conn.execute(
            f"CREATE TRIGGER {table}_cleanup AFTER DELETE ON vector_items WHEN old.dimension = {dimension} "
            f"BEGIN DELETE FROM {table} WHERE rowid = old.vec_rowid; END"
        )

    async def search(self, collection: Collection, query: bytes, k: int) -> list[Match]:
        mirror = self.mirror
        if mirror is not None and mirror.wants(collection.count):
            matches, stale_version = await self.db.run_read(self._search_mirrored, collection, query, k)
            if stale_version is not None:
                self._schedule_load(collection, stale_version)
            return matches
        table = _table(collection.dimension)
        cosine = collection.metric == "cosine"
        # On a pooled reader connection (its own thread): a large search never blocks the loop.
        rows = await self.db.fetchall(_knn_sql(table, cosine), (query, k, collection.id, collection.id))
        return _knn_rows_to_matches(rows, cosine)

    def _search_mirrored(self, conn: Any, coll: Collection, query: bytes, k: int) -> tuple[list[Match], int | None]:
        """On a reader thread, in one read transaction: the collection's version (for this user),
        then either numpy over a current in-memory copy or sqlite-vec, and the payloads.
        Returns the matches and, when no current copy was there, the version to load."""
        assert self.mirror is not None
        cosine = coll.metric == "cosine"
        conn.execute("BEGIN")
        row = conn.execute(
            "SELECT version, count FROM vector_collections WHERE id = ? AND user_id = ?", (coll.id, coll.user_id)
        ).fetchone()
        if row is None:  # deleted since the caller looked it up
            return [], None
        version, count = row
        key = (coll.user_id, coll.id)
        entry = self.mirror.get(key, version)
        if entry is None:
            rows = conn.execute(_knn_sql(_table(coll.dimension), cosine), (query, k, coll.id, coll.id)).fetchall()
            wanted = self.mirror.wants(count) and self.mirror.fits(key, version, count, coll.dimension)
            return _knn_rows_to_matches(rows, cosine), version if wanted else None
        if cosine:  # normalised exactly as the stored embeddings were (vec_normalize)
            query = conn.execute("SELECT vec_normalize(vec_f32(?))", (query,)).fetchone()[0]
        q = np.frombuffer(query, dtype=np.float32)
        rowids, d2 = entry.top_k(q, k)
        found = {
            r[0]: r[1:]
            for r in conn.execute(
                # Primary-key lookups; `+` keeps the planner off the (collection_id, item_id)
                # index, which would scan the whole collection.
                "SELECT vec_rowid, item_id, payload, checksum FROM vector_items "
                "WHERE vec_rowid IN (SELECT value FROM json_each(?)) AND +collection_id = ?",
                (json.dumps(rowids.tolist()), coll.id),
            )
        }
        if len(found) != len(rowids):  # cannot happen while versions are bumped by the triggers
            raise RuntimeError(f"vector mirror of collection {coll.id} disagrees with the database")
        out = []
        for rowid, dist2 in zip(rowids.tolist(), d2.tolist(), strict=True):
            item_id, payload, checksum = found[rowid]
            out.append(Match(item_id, dist2 / 2.0 if cosine else math.sqrt(dist2), payload, checksum))
        return out, None

    def _schedule_load(self, coll: Collection, version: int) -> None:
        key = (coll.user_id, coll.id)
        if key in self._loading:
            return  # one load per collection at a time; the next search retries if it went stale
        # A collection written between searches goes stale at once: reloading it for every
        # search would keep a reader thread busy for nothing. sqlite-vec answers meanwhile.
        now = time.monotonic()
        if now - self._last_load.get(key, -RELOAD_INTERVAL) < RELOAD_INTERVAL:
            return
        if len(self._last_load) > 10_000:
            self._last_load = {k: t for k, t in self._last_load.items() if now - t < RELOAD_INTERVAL}
        self._last_load[key] = now
        task = asyncio.create_task(self._load(coll))
        self._loading[key] = task
        task.add_done_callback(lambda _t: self._loading.pop(key, None))

    async def _load(self, coll: Collection) -> None:
        try:
            await self.db.run_read(self._load_sync, coll)
        except Exception:
            log.exception("could not load the vector mirror of collection %s", coll.id)

    def _load_sync(self, conn: Any, coll: Collection) -> bool:
        """Read a collection's embeddings and version from one snapshot into the mirror."""
        assert self.mirror is not None
        key = (coll.user_id, coll.id)
        conn.execute("BEGIN")
        row = conn.execute(
            "SELECT version, count, dimension FROM vector_collections WHERE id = ? AND user_id = ?",
            (coll.id, coll.user_id),
        ).fetchone()
        if row is None:
            self.mirror.discard(key)
            return False
        version, count, dimension = row
        if not (self.mirror.wants(count) and self.mirror.fits(key, version, count, dimension)):
            return False
        if self.mirror.get(key, version) is not None:
            return True
        rows = conn.execute(
            f"SELECT i.vec_rowid, v.embedding FROM vector_items i JOIN {_table(dimension)} v ON v.rowid = i.vec_rowid "
            "WHERE i.collection_id = ?",
            (coll.id,),
        ).fetchall()
        rowids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dimension)
        del rows
        return self.mirror.put(key, MirrorEntry.build(version, rowids, x))

    async def warm(self, collection: Collection) -> bool:
        """Load the in-memory copy of `collection` now (benchmarks, tests, start-up warming).
        True when a current copy is in memory afterwards."""
        if self.mirror is None or not self.mirror.wants(collection.count):
            return False
        pending = self._loading.get((collection.user_id, collection.id))
        if pending is not None:
            await asyncio.shield(pending)
        return await self.db.run_read(self._load_sync, collection)

    async def close(self) -> None:
        """Wait for loads under way (they hold a database connection)."""
        pending = list(self._loading.values())
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def delete(self, user_id: str, tier: str, name: str, ids: Sequence[str]) -> int:
        async with self.db.write() as conn:
            async with conn.execute(
                "SELECT id, dimension FROM vector_collections WHERE user_id = ? AND name = ?", (user_id, name)
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return 0
            coll_id, dimension = row
            # The trigger of the dimension's vec0 table deletes the embeddings.
            async with conn.execute(
                "DELETE FROM vector_items WHERE collection_id = ? AND item_id IN (SELECT value FROM json_each(?)) "
                "RETURNING length(payload)",
                (coll_id, json.dumps(list(ids))),
            ) as cur:
                sizes = [r[0] for r in await cur.fetchall()]
            if not sizes:
                return 0
            await quota.apply(conn, user_id, tier, "cloud", -sum(stored_bytes(s, dimension) for s in sizes))
            await conn.execute("UPDATE vector_collections SET count = count - ? WHERE id = ?", (len(sizes), coll_id))
            # An empty collection is dropped: its name is free again for any dimension.
            await conn.execute("DELETE FROM vector_collections WHERE id = ? AND count = 0", (coll_id,))
            return len(sizes)
