"""An in-memory mirror of large collections for exact k-NN with numpy (BLAS).

Why: the sqlite-vec 0.1.9 wheel is built without SIMD, and its KNN copies every chunk of a
partition out of SQLite's pages on each query: a 100k x 384 search costs ~40 ms here where a
BLAS matrix-vector product over the same float32 data costs ~7 ms (bench/bench_vectors.py).
A SIMD build would not close the gap: the per-query copy of the chunks alone costs about as
much as the whole numpy search.

What is kept: for each mirrored collection, keyed by (user id, collection id), its embeddings
as one float32 matrix exactly as sqlite-vec stores them (unit vectors for cosine), their
squared norms, their rowids, and the collection's `version` read in the same transaction.

Why it cannot serve stale or foreign data (by construction):
- the key holds the user id and the collection id, and the caller reads the collection's
  version with `WHERE id = ? AND user_id = ?` inside the read transaction that then fetches
  the payloads; an entry is used only when its version equals that version;
- the version is bumped by triggers in the same transaction as every insert, update or delete
  of vector_items (db/migrations/0005_vector_versions.sql), from one counter that never goes
  back, so an entry can never match a later state, nor a collection id reused later;
- payloads are fetched `WHERE collection_id = ? AND vec_rowid IN (...)`.

Exact, not approximate: the matrix-vector product ranks by |x|^2 - 2 x.q, whose float32
rounding error is bounded (see `top_k`); every row that could be among the k nearest under
that bound is re-scored directly in float64, and those scores decide the order.

Memory is bounded: entries are evicted least recently used first so that their total size
stays under `max_bytes`; a collection larger than that is never mirrored (sqlite-vec serves it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

Key = tuple[str, int]  # (user id, collection id)

# Unit roundoff of float32.
_U32 = 2.0**-24


@dataclass(frozen=True, slots=True, eq=False)
class MirrorEntry:
    """Immutable once built: a search holding it is never disturbed by eviction or reload."""

    version: int
    rowids: np.ndarray  # int64 (n,)
    x: np.ndarray  # float32 (n, d), C-contiguous
    sq: np.ndarray  # float32 (n,): |x|^2
    norm: np.ndarray  # float32 (n,): |x|

    @classmethod
    def build(cls, version: int, rowids: np.ndarray, x: np.ndarray) -> MirrorEntry:
        x = np.ascontiguousarray(x, dtype=np.float32)
        sq = np.einsum("ij,ij->i", x, x)
        return cls(version, np.asarray(rowids, dtype=np.int64), x, sq, np.sqrt(sq))

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.sq.nbytes + self.norm.nbytes + self.rowids.nbytes

    def top_k(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The rowids of the k nearest rows to q (float32, (d,)) by L2, nearest first, and
        their squared L2 distances (float64)."""
        n, d = self.x.shape
        k = min(k, n)
        if k <= 0:
            return np.empty(0, np.int64), np.empty(0, np.float64)
        q = np.ascontiguousarray(q, dtype=np.float32)
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


class VectorMirror:
    """A thread-safe LRU of MirrorEntry by bytes. Searches run on reader threads."""

    def __init__(self, max_bytes: int, min_vectors: int) -> None:
        self.max_bytes = max_bytes
        self.min_vectors = min_vectors
        self._entries: OrderedDict[Key, MirrorEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # (key, version) pairs found too large to mirror: not retried until the version moves.
        self._too_big: dict[Key, int] = {}

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def wants(self, count: int) -> bool:
        return self.enabled and count >= self.min_vectors

    @staticmethod
    def estimate_bytes(count: int, dimension: int) -> int:
        return count * (4 * dimension + 4 + 4 + 8)

    def fits(self, key: Key, version: int, count: int, dimension: int) -> bool:
        with self._lock:
            if self._too_big.get(key) == version:
                return False
        if self.estimate_bytes(count, dimension) > self.max_bytes:
            with self._lock:
                self._too_big[key] = version
            return False
        return True

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

    def put(self, key: Key, entry: MirrorEntry) -> bool:
        size = entry.nbytes
        with self._lock:
            if size > self.max_bytes:
                self._too_big[key] = entry.version
                return False
            old = self._entries.get(key)
            if old is not None and old.version > entry.version:
                return False  # a newer copy is already there
            if old is not None:
                self._drop(key)
            while self._entries and self._bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = entry
            self._bytes += size
            return True

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
