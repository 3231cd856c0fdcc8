"""Vector storage on PostgreSQL with pgvector (DATABASE_URL=postgresql://...): the same
`VectorStore` interface, results and limits as `SQLiteVectorStore` (vectors/store.py), for
several nodes on one database. Layout: db/postgres/migrations/0003_vectors.sql.

Search, exact either way (results equal a float64 brute force over the stored float32 vectors):
- a node's in-memory copy of the collection (vectors/mirror.py: BLAS or quantized candidates,
  re-scored in float64), used only at exactly the collection's current version. The version is
  read per request (by `get_collection`, the service's first call), and the payloads are read in
  one statement that also checks that version, so a write made on any node counts on the very
  next search on every node: the copy is then not current and the search takes the next path;
- otherwise pgvector's exact scan of the collection (`ORDER BY embedding <-> q`, no ANN index),
  whose float32 distances are re-scored in float64: the first K candidates are fetched with
  their embeddings, and the answer is kept only when a bound on pgvector's float32 rounding
  shows no row left out can be nearer than the k-th (otherwise K grows).
A search never waits for a copy: one that is missing is loaded in the background, one at a
time, from one snapshot (the version and the rows in one statement); one made stale by another
node's writes catches up there by reading only the rows written since its version (and the ids
of all: those missing were deleted). Writes of this node move its copy forward, as on SQLite.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adiuva_server import errors, quota
from adiuva_server.vectors.mirror import Key, MirrorEntry, VectorMirror
from adiuva_server.vectors.store import (
    OFFLOAD_VALUES,
    Collection,
    Match,
    NewVector,
    UpsertResult,
    stored_bytes,
    unit_rows,
)

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">HH")  # pgvector's binary form: dimension, unused, then big-endian float32
_U32 = 2.0**-24  # unit roundoff of float32
# Rows fetched per step when a copy is loaded (bounds the bytes asyncpg holds at once).
LOAD_BLOCK = 4096
# A copy searched on the event loop up to this many values (~1 ms); larger ones in a thread.
INLINE_VALUES = 1 << 22


def encode_vector(value: Any) -> bytes:
    """asyncpg encoder of `vector`: bytes already in pgvector's binary form (see `wire_rows`),
    or a sequence of floats."""
    if isinstance(value, bytes):
        return value
    a = np.asarray(value, dtype=">f4").reshape(-1)
    return _HEADER.pack(len(a), 0) + a.tobytes()


def decode_vector(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=">f4", offset=_HEADER.size).astype(np.float32)


def wire_rows(x: np.ndarray) -> list[bytes]:
    """pgvector's binary form of each row of a float32 (n, d) matrix, built in one buffer."""
    n, d = x.shape
    width = _HEADER.size + 4 * d
    buf = np.empty((n, width), dtype=np.uint8)
    buf[:, :_HEADER.size] = np.frombuffer(_HEADER.pack(d, 0), dtype=np.uint8)
    buf[:, _HEADER.size:] = x.astype(">f4").view(np.uint8).reshape(n, 4 * d)
    raw = buf.tobytes()
    return [raw[i * width:(i + 1) * width] for i in range(n)]


def _from_wire(blobs: list[bytes], d: int) -> np.ndarray:
    """float32 (n, d) from `vector_send` bytes (pgvector's binary form), in bulk."""
    raw = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), _HEADER.size + 4 * d)
    return np.ascontiguousarray(raw[:, _HEADER.size:]).view(">f4").astype(np.float32)


@dataclass(frozen=True, slots=True)
class PgCollection(Collection):
    """A collection with the version read with it (a search uses it to pick the copy)."""

    version: int


_COLUMNS = "id, name, dimension, metric, count, user_id, version"


async def charge(conn: Any, user_id: str, tier: str, delta: int) -> None:
    """Inside a write transaction: record `delta` cloud bytes (negative to release) and refuse
    growth past the tier's quota. One atomic upsert of the usage row, which it keeps locked
    until commit, so concurrent writers of one user cannot both pass the check."""
    if delta == 0:
        return
    used = await conn.fetchval(
        "INSERT INTO storage_usage (user_id, kind, bytes) VALUES ($1, 'cloud', greatest($2::bigint, 0)) "
        "ON CONFLICT (user_id, kind) DO UPDATE SET bytes = greatest(storage_usage.bytes + $2::bigint, 0) "
        "RETURNING bytes",
        user_id, delta,
    )
    if delta > 0:
        quota.check(tier, "cloud", used - delta, delta)  # raises: the transaction rolls back


class PostgresVectorStore:
    # The first scan fetches this many candidates beyond k (pgvector's float32 rounding is
    # ~1e-5 relative at worst: more than a few are rarely needed).
    scan_slack = 16
    # After a catch-up (or reload) that took t seconds, the same collection is not loaded again
    # for this many t: a collection that other nodes write all the time costs this node at most
    # ~1/4 of a core in loads (its searches meanwhile scan, exact and slower).
    reload_backoff = 4.0

    def __init__(self, db: Any, mirror: VectorMirror | None = None) -> None:
        self.db = db
        self.mirror = mirror if mirror is not None and mirror.enabled else None
        self._loading: dict[Key, asyncio.Task[bool]] = {}
        self._next_load: dict[Key, float] = {}  # monotonic time before which a key is not reloaded
        self._load_slot: asyncio.Semaphore | None = None  # one load at a time (made in the loop)
        self._warming: asyncio.Task[int] | None = None
        self._coarse: asyncio.Future[bool] | None = None
        self.scans = self.scans_grown = 0  # exact scans, and the rounds of more candidates they needed
        self.loads = {"full": 0, "delta": 0}  # copies read whole, and moved forward by what changed

    async def get_collection(self, user_id: str, name: str) -> PgCollection | None:
        row = await self.db.fetchrow(
            f"SELECT {_COLUMNS} FROM vector_collections WHERE user_id = $1 AND name = $2", user_id, name
        )
        return None if row is None else PgCollection(*row)

    # -- writes -----------------------------------------------------------------------------

    async def upsert(
        self, user_id: str, tier: str, name: str, metric: str | None, dimension: int, vectors: Sequence[NewVector]
    ) -> UpsertResult:
        x = np.frombuffer(b"".join(v.embedding for v in vectors), dtype=np.float32).reshape(len(vectors), dimension)
        big = x.size > OFFLOAD_VALUES
        ids = [v.id for v in vectors]

        async def write(conn: Any) -> tuple[PgCollection, int | None, int, np.ndarray, int, np.ndarray]:
            coll, before = await self._collection_for_write(conn, user_id, name, metric, dimension)
            # Scaled for the collection's metric and encoded in pgvector's binary form (~2 ms a
            # 500 x 384 batch; off the event loop when larger).
            rows, blobs = await asyncio.to_thread(self._encode, x, coll.metric) if big else self._encode(x, coll.metric)
            held = {r[0]: (r[1], r[2]) for r in await conn.fetch(
                "SELECT item_id, vec_rowid, length(payload) FROM vector_items WHERE collection_id = $1 AND item_id = ANY($2::text[])",
                coll.id, ids,
            )}
            delta = sum(stored_bytes(len(v.payload), dimension) for v in vectors)
            delta -= sum(stored_bytes(size, dimension) for _, size in held.values())
            await charge(conn, user_id, tier, delta)
            rowids = np.empty(len(vectors), dtype=np.int64)
            new = [i for i, v in enumerate(vectors) if v.id not in held]
            old = [i for i, v in enumerate(vectors) if v.id in held]
            # The new version first: the rows written carry it (other nodes catch up by it).
            after = await conn.fetchval(
                "UPDATE vector_collections SET count = count + $2, version = nextval('vector_versions') "
                "WHERE id = $1 RETURNING version",
                coll.id, len(new),
            )
            if new:
                # Row ids drawn here, under the collection's row lock: they grow with commits.
                got = await conn.fetch(
                    "INSERT INTO vector_items (collection_id, vec_rowid, item_id, dimension, payload, checksum, embedding, written) "
                    "SELECT $1, nextval('vector_item_ids'), r.item_id, $7, r.payload, r.checksum, r.embedding, $6 "
                    "FROM unnest($2::text[], $3::bytea[], $4::text[], $5::vector[]) AS r(item_id, payload, checksum, embedding) "
                    "RETURNING item_id, vec_rowid",
                    coll.id, [ids[i] for i in new], [vectors[i].payload for i in new],
                    [vectors[i].checksum for i in new], [blobs[i] for i in new], after, dimension,
                )
                fresh = {r[0]: r[1] for r in got}
                for i in new:
                    rowids[i] = fresh[ids[i]]
            if old:
                for i in old:
                    rowids[i] = held[ids[i]][0]
                await conn.execute(
                    "UPDATE vector_items i SET payload = r.payload, checksum = r.checksum, embedding = r.embedding, "
                    "written = $6 FROM unnest($2::bigint[], $3::bytea[], $4::text[], $5::vector[]) "
                    "AS r(id, payload, checksum, embedding) WHERE i.collection_id = $1 AND i.vec_rowid = r.id",
                    coll.id, rowids[old].tolist(), [vectors[i].payload for i in old],
                    [vectors[i].checksum for i in old], [blobs[i] for i in old], after,
                )
            return coll, before, after, rowids, len(new), rows

        coll, before, after, rowids, inserted, rows = await self.db.transaction(write)
        # Committed: move this node's copy forward (versions make a lost race harmless).
        if self.mirror is not None and before is not None:
            order = np.argsort(rowids, kind="stable")
            args = ((user_id, coll.id), before, after, rowids[order], rows[order])
            if big:
                await asyncio.to_thread(self.mirror.advance, *args)
            else:
                self.mirror.advance(*args)
        done = PgCollection(coll.id, coll.name, coll.dimension, coll.metric, coll.count + inserted, user_id, after)
        return UpsertResult(done, inserted, len(vectors) - inserted)

    @staticmethod
    def _encode(x: np.ndarray, metric: str) -> tuple[np.ndarray, list[bytes]]:
        rows = unit_rows(x) if metric == "cosine" else x
        return rows, wire_rows(rows)

    async def _collection_for_write(
        self, conn: Any, user_id: str, name: str, metric: str | None, dimension: int
    ) -> tuple[PgCollection, int | None]:
        """The collection, locked until commit (created if needed), and its version before
        this write (None: created by it)."""
        for _ in range(3):
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM vector_collections WHERE user_id = $1 AND name = $2 FOR UPDATE", user_id, name
            )
            if row is not None:
                coll = PgCollection(*row)
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
                return coll, coll.version
            row = await conn.fetchrow(
                f"INSERT INTO vector_collections (user_id, name, dimension, metric) VALUES ($1, $2, $3, $4) "
                f"ON CONFLICT (user_id, name) DO NOTHING RETURNING {_COLUMNS}",
                user_id, name, dimension, metric or "cosine",
            )
            if row is not None:
                return PgCollection(*row), None
            # Another upsert created it meanwhile (we waited for its commit): take that one.
        raise errors.DatabaseUnavailable("The collection is changing too fast; nothing was changed. Try again.",
                                         retry_after=1)

    async def delete(self, user_id: str, tier: str, name: str, ids: Sequence[str]) -> int:
        async def write(conn: Any) -> tuple[int, int, int, int, int, list[int]] | None:
            row = await conn.fetchrow(
                "SELECT id, dimension, version FROM vector_collections WHERE user_id = $1 AND name = $2 FOR UPDATE",
                user_id, name,
            )
            if row is None:
                return None
            coll_id, dimension, before = row
            gone = await conn.fetch(
                "DELETE FROM vector_items WHERE collection_id = $1 AND item_id = ANY($2::text[]) "
                "RETURNING vec_rowid, length(payload)",
                coll_id, list(ids),
            )
            if not gone:
                return None
            await charge(conn, user_id, tier, -sum(stored_bytes(r[1], dimension) for r in gone))
            after, left = await conn.fetchrow(
                "UPDATE vector_collections SET count = count - $2, version = nextval('vector_versions') "
                "WHERE id = $1 RETURNING version, count",
                coll_id, len(gone),
            )
            # An empty collection is dropped: its name is free again for any dimension.
            if left == 0:
                await conn.execute("DELETE FROM vector_collections WHERE id = $1", coll_id)
            return coll_id, dimension, before, after, left, [r[0] for r in gone]

        done = await self.db.transaction(write)
        if done is None:
            return 0
        coll_id, dimension, before, after, left, removed = done
        if self.mirror is not None:
            key = (user_id, coll_id)
            if left == 0:
                self.mirror.discard(key)
            else:
                empty = np.empty((0, dimension), dtype=np.float32)
                self.mirror.advance(key, before, after, np.empty(0, np.int64), empty, removed)
        return len(removed)

    # -- search -----------------------------------------------------------------------------

    async def search(self, collection: Collection, query: bytes, k: int) -> list[Match]:
        q = np.frombuffer(query, dtype=np.float32)
        if collection.metric == "cosine":
            q = unit_rows(q)
        if self.mirror is not None:
            version = getattr(collection, "version", None)
            if version is None:  # not read with the collection: read it now (for this user)
                version = await self.db.fetchval(
                    "SELECT version FROM vector_collections WHERE id = $1 AND user_id = $2",
                    collection.id, collection.user_id,
                )
                if version is None:
                    return []
            key = (collection.user_id, collection.id)
            entry = self._current(key, version)
            if entry is not None:
                if entry.n * entry.dimension > INLINE_VALUES:
                    rowids, d2 = await asyncio.to_thread(entry.top_k, q, k)
                else:
                    rowids, d2 = entry.top_k(q, k)
                matches = await self._payloads(collection, version, rowids, d2)
                if matches is not None:
                    return matches
                # The collection moved on since `version` was read: the database answers.
            else:
                self._load_later(key, collection.count, collection.dimension)
        return await self._scan(collection, q, k)

    def _current(self, key: Key, version: int) -> MirrorEntry | None:
        """The copy at exactly `version`, or None. An older copy stays until the background
        load replaces it: that load only reads what changed since."""
        assert self.mirror is not None
        entry = self.mirror.peek(key)
        if entry is None or entry.version != version:
            return None
        return self.mirror.get(key, version)

    async def _payloads(self, coll: Collection, version: int, rowids: np.ndarray, d2: np.ndarray) -> list[Match] | None:
        """The matches for rows of the copy at `version`; None when the collection is no longer
        at that version (or no longer this user's): the check and the rows are one snapshot."""
        rows = await self.db.fetch(
            "SELECT i.vec_rowid, i.item_id, i.payload, i.checksum FROM vector_items i "
            "WHERE i.collection_id = $1 AND i.vec_rowid = ANY($2::bigint[]) AND EXISTS ("
            " SELECT 1 FROM vector_collections c WHERE c.id = $1 AND c.user_id = $3 AND c.version = $4)",
            coll.id, rowids.tolist(), coll.user_id, version,
        )
        if len(rows) != len(rowids) or not len(rowids):
            return None
        found = {r[0]: r for r in rows}
        cosine = coll.metric == "cosine"
        out = []
        for rowid, dist2 in zip(rowids.tolist(), d2.tolist(), strict=True):
            r = found[rowid]
            # cosine: |a - b|^2 / 2 = 1 - cos between unit vectors
            out.append(Match(r[1], dist2 / 2.0 if cosine else math.sqrt(dist2), r[2], r[3]))
        return out

    async def _scan(self, coll: Collection, q: np.ndarray, k: int) -> list[Match]:
        """pgvector's exact scan of the collection, re-scored in float64.

        The bound: pgvector sums the squared differences in float32 (any order, vectorised or
        fused), so its D~^2 is within gamma = (d + 2) u / (1 - (d + 2) u) of D^2 relatively,
        plus d squares that may underflow (2^-149 each, counted twice over). A row it did not
        return has D~ >= D~_K of the K-th returned row (ordered by D~), so its exact distance
        is at least sqrt((D~_K^2 - d 2^-148) / (1 + gamma)). When the k-th exact distance among
        the K candidates lies strictly below that, no row left out can be in the answer."""
        d = coll.dimension
        gamma = (d + 2) * _U32 / (1.0 - (d + 2) * _U32)
        floor = d * 2.0**-148
        q64 = q.astype(np.float64)
        size = k + self.scan_slack
        self.scans += 1
        while True:
            rows = await self.db.fetch(
                "SELECT i.vec_rowid, i.item_id, i.payload, i.checksum, i.embedding, i.embedding <-> $3 AS approx "
                "FROM vector_items i WHERE i.collection_id = $1 AND EXISTS ("
                " SELECT 1 FROM vector_collections c WHERE c.id = $1 AND c.user_id = $2) "
                "ORDER BY approx, i.vec_rowid LIMIT $4",
                coll.id, coll.user_id, q, size,
            )
            if not rows:
                return []
            x = np.stack([r[4] for r in rows]).astype(np.float64)
            diff = x - q64
            d2 = np.einsum("ij,ij->i", diff, diff)
            rowids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            order = np.lexsort((rowids, d2))[:k]
            if len(rows) < size:
                break  # every row of the collection was scored
            last = float(rows[-1][5])
            left_out = math.sqrt(max(last * last * (1 - 1e-12) - floor, 0.0) / (1.0 + gamma))
            if len(order) == k and math.sqrt(d2[order[-1]]) * (1 + 1e-12) < left_out:
                break
            size *= 4
            self.scans_grown += 1
        cosine = coll.metric == "cosine"
        return [Match(rows[i][1], d2[i] / 2.0 if cosine else math.sqrt(d2[i]), rows[i][2], rows[i][3])
                for i in order.tolist()]

    # -- in-memory copies -------------------------------------------------------------------

    def _load_later(self, key: Key, count: int, dimension: int) -> None:
        """Load the copy of `key` in the background (one load at a time; searches meanwhile scan)."""
        mirror = self.mirror
        if mirror is None or key in self._loading or not mirror.wants(count) or not mirror.fits(count, dimension):
            return
        now = time.monotonic()
        if self._next_load.get(key, 0.0) > now:
            return
        self._next_load.pop(key, None)
        if len(self._next_load) > 4096:  # forget back-offs that are over
            self._next_load = {k: t for k, t in self._next_load.items() if t > now}
        self._track(key, evict=True)

    def _track(self, key: Key, evict: bool) -> asyncio.Task[bool]:
        """The load of `key` as a task that searches can see (so they do not queue another)."""
        task = asyncio.create_task(self._load(key, evict))
        self._loading[key] = task
        task.add_done_callback(lambda _t, key=key: self._loading.pop(key, None))
        return task

    async def _load(self, key: Key, evict: bool) -> bool:
        """Bring the collection's copy to its current state (caught up, or read whole) from one
        snapshot. True when a current copy is in memory afterwards."""
        if self.mirror is None:
            return False
        if self._load_slot is None:
            self._load_slot = asyncio.Semaphore(1)
        try:
            async with self._load_slot:
                started, had_copy = time.monotonic(), self.mirror.peek(key) is not None
                entry = await self.db.transaction(lambda conn: self._read_entry(conn, key, evict), readonly=True)
                if had_copy:  # a catch-up (or a reload): the first load of a copy sets no back-off
                    self._next_load[key] = time.monotonic() + self.reload_backoff * (time.monotonic() - started)
                if entry is None:
                    return False
                if not self.mirror.put(key, entry, evict=evict):
                    held = self.mirror.peek(key)
                    return held is not None and held.version >= entry.version
                if entry.wants_coarse:
                    self._coarse = asyncio.ensure_future(asyncio.to_thread(entry.attach_coarse))
                    await asyncio.shield(self._coarse)
                return True
        except (errors.ServiceUnavailable, OSError):
            log.warning("could not load vector collection %s into memory: database unavailable", key[1])
            return False

    async def _read_entry(self, conn: Any, key: Key, evict: bool) -> MirrorEntry | None:
        mirror = self.mirror
        assert mirror is not None
        user_id, coll_id = key
        held = mirror.peek(key)
        if held is not None:
            entry = await self._catch_up(conn, key, held)
            if entry is not None:
                self.loads["delta"] += entry is not held
                return entry
        self.loads["full"] += 1
        # One statement, so the version and the rows are one snapshot (a cursor keeps its own).
        cursor = await conn.cursor(
            "SELECT c.version, c.count, c.dimension, i.vec_rowid, vector_send(i.embedding) FROM vector_collections c "
            "JOIN vector_items i ON i.collection_id = c.id WHERE c.id = $1 AND c.user_id = $2 ORDER BY i.vec_rowid",
            coll_id, user_id,
        )
        rows = await cursor.fetch(LOAD_BLOCK)
        if not rows:
            mirror.discard(key)
            return None
        version, count, dimension = rows[0][0], rows[0][1], rows[0][2]
        held = mirror.peek(key)
        if held is not None and held.version >= version:
            return held
        if not mirror.wants(count) or not mirror.fits(count, dimension):
            return None
        if not evict and mirror.estimate_bytes(count, dimension) > mirror.room():
            return None
        x = np.empty((count, dimension), dtype=np.float32)
        rowids = np.empty(count, dtype=np.int64)
        at = 0
        while rows:
            if at + len(rows) > count:  # cannot happen in one snapshot (count is kept with the rows)
                raise RuntimeError(f"vector collection {coll_id} holds more rows than counted")
            block = await asyncio.to_thread(_from_wire, [r[4] for r in rows], dimension)
            x[at:at + len(rows)] = block
            rowids[at:at + len(rows)] = [r[3] for r in rows]
            at += len(rows)
            rows = await cursor.fetch(LOAD_BLOCK)
        return await asyncio.to_thread(MirrorEntry.wrap, version, rowids[:at], x[:at])

    async def _catch_up(self, conn: Any, key: Key, held: MirrorEntry) -> MirrorEntry | None:
        """`held` moved forward to the collection's current state, reading only the rows written
        after its version and the ids of all (those missing were deleted); None when that does
        not fit (the rows are then read whole). One statement: one snapshot."""
        user_id, coll_id = key
        rows = await conn.fetch(
            "SELECT c.version, c.dimension, i.vec_rowid, CASE WHEN i.written > $3 THEN vector_send(i.embedding) END "
            "FROM vector_collections c JOIN vector_items i ON i.collection_id = c.id "
            "WHERE c.id = $1 AND c.user_id = $2 ORDER BY i.vec_rowid",
            coll_id, user_id, held.version,
        )
        if not rows or rows[0][1] != held.dimension:
            return None
        version = rows[0][0]
        if version <= held.version:
            return held

        def apply() -> MirrorEntry | None:
            ids = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))
            written = [r for r in rows if r[3] is not None]
            up_ids = np.fromiter((r[2] for r in written), dtype=np.int64, count=len(written))
            up_x = _from_wire([r[3] for r in written], held.dimension) if written else \
                np.empty((0, held.dimension), dtype=np.float32)
            removed = np.setdiff1d(held.rowids, ids, assume_unique=True)
            entry = held.changed(version, up_ids, up_x, removed.tolist())
            return entry if entry is not None and entry.n == len(ids) else None

        return await asyncio.to_thread(apply)

    async def warm(self, collection: Collection) -> bool:
        """Load the in-memory copy of `collection` now, with its quantized copy when it gets
        one (benchmarks, tests). True when a current copy is in memory afterwards."""
        return await self._load((collection.user_id, collection.id), True)

    def start_warm_up(self) -> asyncio.Task[int]:
        """Load the largest collections into the free part of the budget, one at a time, in
        the background (after a restart the cache is empty; searches meanwhile scan)."""
        self._warming = asyncio.create_task(self._warm_up())
        return self._warming

    async def _warm_up(self) -> int:
        mirror = self.mirror
        if mirror is None:
            return 0
        loaded, budget = 0, mirror.max_bytes
        try:
            rows = await self.db.fetch(
                "SELECT user_id, id, count, dimension FROM vector_collections WHERE count >= $1 ORDER BY count DESC, id",
                mirror.min_vectors,
            )
        except errors.ServiceUnavailable:
            log.warning("vector warm-up skipped: database unavailable")
            return 0
        for user_id, coll_id, count, dimension in rows:
            size = mirror.estimate_bytes(count, dimension)
            if size > budget:
                continue  # another, smaller one may still fit
            budget -= size
            key = (user_id, coll_id)
            try:
                if await (self._loading.get(key) or self._track(key, evict=False)):
                    loaded += 1
            except Exception:
                log.exception("could not load vector collection %s into memory", coll_id)
        log.info("vector warm-up: %d collections in memory (%d MB)", loaded, mirror.nbytes // 2**20)
        return loaded

    async def close(self) -> None:
        """Stop the warm-up and the loads (each holds a database connection while it reads)."""
        for task in (self._warming, self._coarse, *self._loading.values()):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._warming = self._coarse = None
        self._loading.clear()
