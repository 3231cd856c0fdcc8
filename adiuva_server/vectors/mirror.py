"""In-memory float32 copies of searched collections for exact k-NN with numpy (BLAS).

Why: a BLAS matrix-vector product over a collection's float32 matrix is the fastest exact
search here (100k x 384: ~7 ms); reading the same vectors out of SQLite's pages costs ~20x more
(bench/bench_vectors.py). The database stays the source of truth; a copy is only a cache.

What is kept: for each copied collection, keyed by (user id, collection id), its embeddings as
one float32 matrix exactly as stored (unit vectors for cosine), their squared norms and norms,
their rowids in ascending order, and the collection's `version` read in the same transaction.

Why it cannot serve stale or foreign data (by construction):
- the key holds the user id and the collection id, and the caller reads the collection's
  version with `WHERE id = ? AND user_id = ?` inside the read transaction that then fetches
  the payloads; an entry is used only when its version equals that version;
- the version is bumped by triggers in the same transaction as every insert, update or delete
  of vector_items (db/migrations/0005_vector_versions.sql), from one counter that never goes
  back, so an entry can never match a later state, nor a collection id reused later;
- a write made by this process moves a copy forward (`VectorMirror.advance`) only from exactly
  the version the write transaction started from, to the version it committed;
- payloads are fetched `WHERE collection_id = ? AND vec_rowid IN (...)`.

Exact, not approximate: the matrix-vector product ranks by |x|^2 - 2 x.q, whose float32
rounding error is bounded (see `top_k`); every row that could be among the k nearest under
that bound is re-scored directly in float64, and those scores decide the order.

Faster for large collections: the BLAS product reads all 4 bytes of every value (150 MB a
query at 100k x 384) and is bound by memory. An entry of `COARSE_MIN_ROWS` rows or more gets,
from a background thread, an 8-bit scalar-quantized copy (faiss, 1 byte a value, SIMD) that only
names candidates: it is searched for K of them, those are re-scored in float64, and the answer is
kept only if no row left out can be nearer, by a proven bound on the quantization error
(`Coarse`); otherwise K grows, and past a quarter of the rows the BLAS path answers.

Memory is bounded: entries are evicted least recently used first so that their total size
stays under `max_bytes`; a collection larger than that is never copied (it is scanned from
the database block by block instead).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np

Key = tuple[str, int]  # (user id, collection id)

# Unit roundoff of float32.
_U32 = 2.0**-24
# Python and numpy objects of one entry, counted against the budget so that many tiny
# collections cannot exceed it.
ENTRY_OVERHEAD = 1024
# Spare rows allocated when a copy grows by appends (the sync path appends batch after batch).
GROWTH = 1.25


# Entries this large get a quantized copy for candidate search (below, BLAS takes < 1 ms).
COARSE_MIN_ROWS = 8192
# The first candidate set a quantized search asks for (then 4x as many while unproven).
CANDIDATES_PER_K = 16
MIN_CANDIDATES = 128
# Rows coded at a time (their float64 copy is the build's working memory).
_CODE_BLOCK = 8192

_faiss_module: Any = None
_faiss_found: bool | None = None
# One quantized copy built at a time: builds are CPU-heavy and the searches need the cores.
_build_lock = threading.Lock()


def faiss_found() -> bool:
    """Whether faiss is installed, without importing it (~0.3 s: never in a search's path)."""
    global _faiss_found
    if _faiss_found is None:
        import importlib.util

        _faiss_found = importlib.util.find_spec("faiss") is not None
    return _faiss_found


def faiss_module() -> Any:
    """faiss, imported on first use (it is optional: without it every search takes the BLAS path)."""
    global _faiss_module
    if _faiss_module is None:
        try:
            import faiss

            # Searches already run on several reader threads, and one query is not split over
            # threads anyway (2 threads measured 12 ms against 2.2 ms for 100k x 384, 2 cores).
            faiss.omp_set_num_threads(1)
            _faiss_module = faiss
        except ImportError:
            _faiss_module = False
    return _faiss_module or None


def row_bytes(dimension: int) -> int:
    return 4 * dimension + 4 + 4 + 8  # x, sq, norm, rowid


def coarse_bytes(n: int, dimension: int) -> int:
    return n * dimension if n >= COARSE_MIN_ROWS and faiss_found() else 0


class Coarse:
    """8-bit codes of an entry's rows that only name candidates, scanned by faiss
    (IndexScalarQuantizer, QT_8bit_direct_signed: a code is an integer m in [-127, 127],
    decoded as exactly m; ~40% faster here than a trained range, 1 byte a value, SIMD).

    Codes: one centre c and one step s for the whole collection (s = (max - min) / 254), so
    that with T_i = (x_i - c) / s (exact) every m_i = rint(T_i) is within half a step of it; the
    largest |T_i - m_i| over the rows, r, is measured when the codes are made (in float64, with
    a margin: ~0.6 of the worst case sqrt(d) / 2 on real data, which bounds it anyway).
    A query is coded as q' = fl32(T_q), and eq = |q' - T_q| is measured likewise. faiss computes
    D'_i = |q' - m_i|^2 in float32 (any order, FMA or not: within a factor 1 +- delta of the exact
    value, delta = 4 (d + 2) u, as every term is >= 0), and a row it did not return has D'_i >=
    the K-th returned D'_K. So for every row left out
        |q - x_i| = s |T_q - T_i| >= s (|q' - m_i| - eq - r) >= s (sqrt(D'_K / (1 + delta)) - eq - r).
    An infinite or NaN D'_K (a query far outside the collection's range) proves nothing."""

    __slots__ = ("index", "centre", "step", "err", "delta")

    def __init__(self, index: Any, centre: float, step: float, err: float, delta: float) -> None:
        self.index, self.centre, self.step, self.err, self.delta = index, centre, step, err, delta

    @classmethod
    def build(cls, x: np.ndarray) -> Coarse | None:
        faiss = faiss_module()
        n, d = x.shape
        qtype = getattr(faiss.ScalarQuantizer, "QT_8bit_direct_signed", None) if faiss is not None else None
        if qtype is None or n == 0:
            return None  # no faiss, or one older than 1.8: the BLAS path answers
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return None
        centre = (lo + hi) / 2.0
        step = (hi - lo) / 254.0 or 1.0
        index = faiss.IndexScalarQuantizer(d, qtype, faiss.METRIC_L2)
        r2 = 0.0
        for start in range(0, n, _CODE_BLOCK):  # float64 blocks: bounded memory
            t = (x[start:start + _CODE_BLOCK].astype(np.float64) - centre) / step
            m = np.clip(np.rint(t), -127.0, 127.0)
            t -= m
            r2 = max(r2, float(np.einsum("ij,ij->i", t, t).max()))
            if start == 0:
                # The codec this bound assumes: integers in, the same integers out.
                probe = m[:64].astype(np.float32)
                if not np.array_equal(index.sa_decode(index.sa_encode(probe)), probe):
                    return None
            index.add(m.astype(np.float32))
        # t carries float64 rounding of (x - c) / s: relative 2^-52 of values up to 127.
        err = math.sqrt(r2) * (1 + 1e-9) + 1e-9 * math.sqrt(d)
        return cls(index, centre, step, err, 4.0 * (d + 2) * _U32)

    def candidates(self, q: np.ndarray, k: int, n: int):
        """Growing candidate sets: (row positions, the bound every row left out satisfies)."""
        t = (q.astype(np.float64) - self.centre) / self.step
        coded = t.astype(np.float32)
        eq = float(np.linalg.norm(coded.astype(np.float64) - t)) * (1 + 1e-9) + 1e-9 * float(np.linalg.norm(t))
        coded = coded.reshape(1, -1)
        size = max(CANDIDATES_PER_K * k, MIN_CANDIDATES)
        while size <= n // 4:
            dist, pos = self.index.search(coded, size)
            dist, pos = dist[0], pos[0]
            pos = pos[pos >= 0]
            kth = float(dist[-1])
            if not math.isfinite(kth):
                return
            left_out = self.step * (math.sqrt(max(kth, 0.0) / (1.0 + self.delta)) - eq - self.err)
            yield pos, left_out
            size *= 4


class _Rows:
    """Preallocated arrays shared by the successive entries of one collection: an entry sees
    rows [:n]; appends write past the newest entry's n, which no older entry can see."""

    def __init__(self, capacity: int, dimension: int) -> None:
        self.x = np.empty((capacity, dimension), dtype=np.float32)
        self.sq = np.empty(capacity, dtype=np.float32)
        self.norm = np.empty(capacity, dtype=np.float32)
        self.rowids = np.empty(capacity, dtype=np.int64)
        self.used = 0
        self.lock = threading.Lock()

    @classmethod
    def wrap(cls, rowids: np.ndarray, x: np.ndarray) -> _Rows:
        """Rows around an existing (e.g. memory-mapped, read-only) matrix, without copying it;
        full, so that an append copies instead of writing into it."""
        rows = cls.__new__(cls)
        rows.x = np.asarray(x)  # a plain ndarray view of the map (faiss, BLAS)
        sq = np.einsum("ij,ij->i", x, x)
        rows.sq = sq.astype(np.float32, copy=False)
        rows.norm = np.sqrt(rows.sq)
        rows.rowids = np.array(rowids, dtype=np.int64)
        rows.used = len(rows.rowids)
        rows.lock = threading.Lock()
        return rows

    @property
    def capacity(self) -> int:
        return len(self.rowids)

    def write(self, at: int, rowids: np.ndarray, x: np.ndarray) -> None:
        end = at + len(rowids)
        self.x[at:end] = x
        sq = np.einsum("ij,ij->i", self.x[at:end], self.x[at:end])
        self.sq[at:end] = sq
        self.norm[at:end] = np.sqrt(sq)
        self.rowids[at:end] = rowids


class MirrorEntry:
    """Immutable once built: a search holding it is never disturbed by eviction, appends or
    reloads."""

    __slots__ = ("version", "n", "_rows", "x", "sq", "norm", "rowids", "coarse", "_coarse_tried")

    def __init__(self, version: int, rows: _Rows, n: int) -> None:
        self.version = version
        self.n = n
        self._rows = rows
        # Set once, later, by a background thread (`attach_coarse`): None until then.
        self.coarse: Coarse | None = None
        self._coarse_tried = False
        self.x = rows.x[:n]
        self.sq = rows.sq[:n]
        self.norm = rows.norm[:n]
        self.rowids = rows.rowids[:n]

    @classmethod
    def build(cls, version: int, rowids: np.ndarray, x: np.ndarray, capacity: int | None = None) -> MirrorEntry:
        """rowids in ascending order, x float32 (n, d)."""
        rowids = np.asarray(rowids, dtype=np.int64)
        n = len(rowids)
        rows = _Rows(max(n, capacity or 0), x.shape[1])
        rows.write(0, rowids, x)
        rows.used = n
        return cls(version, rows, n)

    @classmethod
    def wrap(cls, version: int, rowids: np.ndarray, x: np.ndarray) -> MirrorEntry:
        """An entry over `x` as it is (a memory-mapped snapshot: vectors/snapshots.py)."""
        rows = _Rows.wrap(rowids, x)
        return cls(version, rows, rows.used)

    @classmethod
    def from_blocks(cls, version: int, count: int, dimension: int, blocks: Iterable[tuple[np.ndarray, np.ndarray]]) -> MirrorEntry:
        """Built from (rowids, x) blocks in ascending rowid order, each copied once into place
        (a second copy of a large collection costs as much as reading it)."""
        rows = _Rows(count, dimension)
        n = 0
        for ids, x in blocks:
            if n + len(ids) > rows.capacity:  # more rows than counted: grow (cannot happen in one snapshot)
                bigger = _Rows(n + len(ids), dimension)
                bigger.write(0, rows.rowids[:n], rows.x[:n])
                rows = bigger
            rows.write(n, ids, x)
            n += len(ids)
        rows.used = n
        return cls(version, rows, n)

    @property
    def dimension(self) -> int:
        return self.x.shape[1]

    @property
    def nbytes(self) -> int:
        """Counted from the start for the quantized copy it may get, so that attaching it never
        exceeds the budget."""
        return self._rows.capacity * row_bytes(self.dimension) + coarse_bytes(self.n, self.dimension) + ENTRY_OVERHEAD

    @property
    def wants_coarse(self) -> bool:
        return not self._coarse_tried and coarse_bytes(self.n, self.dimension) > 0

    def attach_coarse(self) -> bool:
        """Build the quantized copy of exactly these rows (slow: call off the event loop)."""
        with _build_lock:
            if not self._coarse_tried:
                self.coarse = Coarse.build(self.x)
                self._coarse_tried = True
        return self.coarse is not None

    def changed(self, version: int, rowids: np.ndarray, x: np.ndarray, removed: Iterable[int]) -> MirrorEntry | None:
        """The entry after a write: rows `rowids` (ascending) set to `x` (replaced where they
        exist, appended otherwise, new ones above every rowid held), rows `removed` gone.
        None when the write does not fit what is held (the copy is then dropped)."""
        rowids = np.asarray(rowids, dtype=np.int64)
        removed = np.fromiter(removed, dtype=np.int64)
        pos = np.searchsorted(self.rowids, rowids)
        held = pos < self.n
        held[held] = self.rowids[pos[held]] == rowids[held]
        new = ~held
        if new.any() and self.n and rowids[new].min() <= self.rowids[-1]:
            return None  # an insert below a held rowid: not the layout this copy assumes
        rpos = np.searchsorted(self.rowids, removed)
        if len(removed) and (np.any(rpos >= self.n) or np.any(self.rowids[np.minimum(rpos, self.n - 1)] != removed)):
            return None
        add_ids, add_x = rowids[new], x[new]
        if not held.any() and not len(removed):  # appends only: share the arrays when we can
            rows = self._rows
            with rows.lock:
                if rows.used == self.n and self.n + len(add_ids) <= rows.capacity:
                    rows.write(self.n, add_ids, add_x)
                    rows.used = self.n + len(add_ids)
                    return MirrorEntry(version, rows, rows.used)
            n = self.n + len(add_ids)
            out = MirrorEntry.build(version, np.concatenate([self.rowids, add_ids]),
                                    np.concatenate([self.x, add_x]), capacity=int(n * GROWTH) + 16)
            return out
        keep = np.ones(self.n, dtype=bool)
        keep[rpos] = False
        xs = self.x.copy()
        xs[pos[held]] = x[held]
        ids = np.concatenate([self.rowids[keep], add_ids])
        return MirrorEntry.build(version, ids, np.concatenate([xs[keep], add_x]))

    def top_k(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The rowids of the k nearest rows to q (float32, (d,)) by L2, nearest first (ties by
        rowid), and their squared L2 distances (float64)."""
        n, d = self.x.shape
        k = min(k, n)
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        q = np.ascontiguousarray(q, dtype=np.float32)
        coarse = self.coarse
        if coarse is not None:
            q64 = q.astype(np.float64)
            for pos, left_out in coarse.candidates(q, k, n):
                diff = self.x[pos].astype(np.float64) - q64
                d2 = np.einsum("ij,ij->i", diff, diff)
                order = np.lexsort((self.rowids[pos], d2))[:k]
                # Exact when every row left out is strictly farther than the k-th found.
                if len(order) == k and left_out > np.sqrt(d2[order[-1]]) * (1 + 1e-12):
                    return self.rowids[pos[order]], d2[order]
        # approx_i = |x_i|^2 - 2 x_i.q (the |q|^2 term is common to all rows). Each float32 dot
        # product of length d, in any summation order, is within gamma_d * sum|a_j b_j| of the
        # exact value (gamma_d = d u / (1 - d u)), and sum|a_j b_j| <= |a| |b|; |x|^2 likewise.
        # With the subtraction and a factor 2 of margin: |approx_i - exact_i| <= err_i.
        approx = self.sq - 2.0 * (self.x @ q)
        gamma = 2.0 * (d + 2) * _U32 / (1.0 - (d + 2) * _U32)
        err = (gamma * self.sq + (2.0 * gamma * float(np.linalg.norm(q))) * self.norm).astype(np.float32)
        err += np.float32(1e-30)
        upper = approx + err
        # The k-th smallest upper bound: no row whose lower bound exceeds it can be in the top k.
        threshold = np.partition(upper, k - 1)[k - 1] if k < n else upper.max()
        cand = np.flatnonzero(approx - err <= threshold)
        diff = self.x[cand].astype(np.float64) - q.astype(np.float64)
        d2 = np.einsum("ij,ij->i", diff, diff)
        order = np.lexsort((self.rowids[cand], d2))[:k]
        return self.rowids[cand[order]], d2[order]


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of several exact partial top-k results (rowids, float64 d2), same order rule."""
    rowids = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
    d2 = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.float64)
    order = np.lexsort((rowids, d2))[:k]
    return rowids[order], d2[order]


class VectorMirror:
    """A thread-safe LRU of MirrorEntry by bytes. Searches run on reader threads."""

    def __init__(self, max_bytes: int, min_vectors: int = 1) -> None:
        self.max_bytes = max_bytes
        self.min_vectors = min_vectors
        self._entries: OrderedDict[Key, MirrorEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def wants(self, count: int) -> bool:
        return self.enabled and count >= self.min_vectors

    @staticmethod
    def estimate_bytes(count: int, dimension: int) -> int:
        return count * row_bytes(dimension) + coarse_bytes(count, dimension) + ENTRY_OVERHEAD

    def fits(self, count: int, dimension: int) -> bool:
        return self.estimate_bytes(count, dimension) <= self.max_bytes

    def room(self) -> int:
        """Bytes free without evicting anything."""
        with self._lock:
            return self.max_bytes - self._bytes

    def get(self, key: Key, version: int) -> MirrorEntry | None:
        """The entry for key if it was read at exactly `version`; a stale entry is dropped."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.version != version:
                self._drop(key)
                return None
            self._entries.move_to_end(key)
            return entry

    def peek(self, key: Key) -> MirrorEntry | None:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: Key, entry: MirrorEntry, evict: bool = True) -> bool:
        """Keep `entry` unless a newer copy is held; `evict=False` (background warm-up) only
        takes free room and never pushes out what searches use."""
        size = entry.nbytes
        with self._lock:
            if size > self.max_bytes:
                return False
            old = self._entries.get(key)
            if old is not None and old.version > entry.version:
                return False  # a newer copy is already there
            free = self.max_bytes - self._bytes + (old.nbytes if old is not None else 0)
            if not evict and size > free:
                return False
            if old is not None:
                self._drop(key)
            while self._entries and self._bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = entry
            self._bytes += size
            return True

    def advance(self, key: Key, from_version: int, to_version: int, rowids: np.ndarray, x: np.ndarray,
                removed: Iterable[int] = ()) -> bool:
        """After a committed write of this process: move the copy held at exactly
        `from_version` to `to_version`. Any other copy of the key is dropped."""
        entry = self.peek(key)
        if entry is None:
            return False
        new = entry.changed(to_version, rowids, x, removed) if entry.version == from_version else None
        if new is None:
            with self._lock:
                if self._entries.get(key) is entry:
                    self._drop(key)
            return False
        return self.put(key, new)

    def discard(self, key: Key) -> None:
        with self._lock:
            if key in self._entries:
                self._drop(key)

    def _drop(self, key: Key) -> None:
        self._bytes -= self._entries.pop(key).nbytes

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._entries)
