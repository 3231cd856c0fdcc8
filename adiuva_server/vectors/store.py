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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from adiuva_server import errors, quota
from adiuva_server.db import Database

MAX_DIMENSION = 4096
# Slots per chunk. Each partition (collection) allocates at least one chunk of
# CHUNK_SIZE * dimension * 4 bytes: 32 keeps a 3-vector collection of dim 384 at ~50 KB on
# disk (1024, sqlite-vec's default, costs 1.5 MB). Measured at 100k x 384 (mmap on): chunks of
# 8 / 16 / 32 / 64 / 1024 slots search in 52 / 47 / 41 / 39 / 37 ms; 4096 slots upsert 20x slower.
CHUNK_SIZE = 32
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


class SQLiteVectorStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get_collection(self, user_id: str, name: str) -> Collection | None:
        # An indexed single-row read: cheaper on the event loop than a thread hand-off.
        row = self.db.lookup(
            "SELECT id, name, dimension, metric, count FROM vector_collections WHERE user_id = ? AND name = ?",
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
        coll = Collection(coll.id, coll.name, coll.dimension, coll.metric, coll.count + inserted)
        return UpsertResult(coll, inserted, len(existing))

    async def _collection_for_write(self, conn: Any, user_id: str, name: str, metric: str | None, dimension: int) -> Collection:
        async with conn.execute(
            "SELECT id, name, dimension, metric, count FROM vector_collections WHERE user_id = ? AND name = ?",
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
        return Collection(coll_id, name, dimension, metric, 0)

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
        table = _table(collection.dimension)
        cosine = collection.metric == "cosine"
        sql = (
            "SELECT i.item_id, v.distance, i.payload, i.checksum FROM ("
            f"  SELECT rowid, distance FROM {table}"
            f"  WHERE embedding MATCH {'vec_normalize(vec_f32(?))' if cosine else 'vec_f32(?)'}"
            "   AND k = ? AND collection_id = ?"
            ") v JOIN vector_items i ON i.vec_rowid = v.rowid AND i.collection_id = ? "
            "ORDER BY v.distance"
        )
        # On a pooled reader connection (its own thread): a large search never blocks the loop.
        rows = await self.db.fetchall(sql, (query, k, collection.id, collection.id))
        if cosine:  # L2 between unit vectors -> cosine distance
            return [Match(r[0], r[1] * r[1] / 2.0, r[2], r[3]) for r in rows]
        return [Match(*r) for r in rows]

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
