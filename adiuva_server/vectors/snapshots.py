"""On-disk snapshots of the in-memory vector copies, so that the first search after a restart
answers from a memory-mapped file instead of reading every row out of SQLite.

A snapshot is derived data, like the copy it persists: the database stays the only source of
truth, the server backup leaves snapshots out, and a snapshot that is missing, stale, truncated
or unreadable is simply ignored (the rows are read as before).

Files, in `<data dir>/vector-snapshots/`, named by hashes (never an email nor an id in clear):
- `<U>-<C>.<version>.x.npy`: the float32 (n, d) matrix exactly as stored, immutable once written;
- `<U>-<C>.meta.npy`: int64 [MAGIC, version, n, d, collection id, rowids...] naming the matrix of
  its version; replaced last, so it never names a matrix that is not complete on disk.
U hashes the user id (a user's files are found, and deleted, by it alone), C the user and
collection id. Every file is written to a temporary name, fsynced, then renamed.

Why a snapshot cannot answer for another state (checked in `load`): it is used only when its
version equals the version the search read from the database, in the same read transaction,
`WHERE id = ? AND user_id = ?` (versions come from one counter that never goes back and is bumped
with every change of vector_items, by whoever makes it: the server, the CLI, another process);
its n, d and collection id must match the database's, and a sample of its rows (the first, the
last and some between) must equal the database's rows byte for byte. A restore replaces the
whole data dir, snapshots included.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DIRNAME = "vector-snapshots"
MAGIC = 0x4144_5653_4E41_5031  # "ADVSNAP1"
# Collections smaller than this load from SQLite in a few milliseconds: no file for them.
MIN_ROWS = 4096
# Rows compared with the database when a snapshot is loaded.
SAMPLE_ROWS = 16

# Held while a file is written or a user's files deleted: a deletion never races a write.
_lock = threading.Lock()


def user_part(user_id: str) -> str:
    return hashlib.sha256(b"adiuva-vector-snapshot-user\0" + user_id.encode()).hexdigest()[:24]


def stem(user_id: str, coll_id: int) -> str:
    c = hashlib.sha256(f"adiuva-vector-snapshot\0{user_id}\0{coll_id}".encode()).hexdigest()[:24]
    return f"{user_part(user_id)}-{c}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write(directory: Path, user_id: str, coll_id: int, version: int, rowids: np.ndarray, x: np.ndarray,
          still_wanted=lambda: True) -> int:
    """Persist one copy (slow: off the event loop). `still_wanted` is asked under the lock
    (a user deleted meanwhile gets no file). Returns the bytes written (0: skipped)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    name = stem(user_id, coll_id)
    meta = np.concatenate([np.array([MAGIC, version, len(rowids), x.shape[1], coll_id], dtype=np.int64),
                           np.asarray(rowids, dtype=np.int64)])
    matrix = directory / f"{name}.{version}.x.npy"
    with _lock:
        if not still_wanted():
            return 0
        _write_npy(matrix, np.ascontiguousarray(x, dtype=np.float32))
        _write_npy(directory / f"{name}.meta.npy", meta)
        _fsync_dir(directory)
        for old in directory.glob(f"{name}.*.x.npy"):
            if old != matrix:
                old.unlink(missing_ok=True)
    return matrix.stat().st_size + meta.nbytes


def load(directory: Path, conn, user_id: str, coll_id: int, version: int, count: int,
         dimension: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(rowids, memory-mapped float32 matrix) of the snapshot of exactly this state, or None.
    `conn` is inside the read transaction the version was read in."""
    name = stem(user_id, coll_id)
    path = directory / f"{name}.meta.npy"
    try:
        meta = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated, garbled: ignored, the rows are read instead
        log.warning("vector snapshot %s is unreadable (%s); reading the rows instead", path.name, e)
        return None
    if (meta.dtype != np.int64 or meta.ndim != 1 or len(meta) < 5 or meta[0] != MAGIC
            or len(meta) != 5 + meta[2]):
        log.warning("vector snapshot %s is not a snapshot; reading the rows instead", path.name)
        return None
    if (int(meta[1]), int(meta[2]), int(meta[3]), int(meta[4])) != (version, count, dimension, coll_id):
        return None  # another state of the collection: stale
    rowids = meta[5:]
    try:
        x = np.load(directory / f"{name}.{version}.x.npy", mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception as e:
        log.warning("vector snapshot of %s is unreadable (%s); reading the rows instead", path.name, e)
        return None
    if x.dtype != np.float32 or x.shape != (count, dimension) or not x.flags.c_contiguous:
        log.warning("vector snapshot of %s does not match its index; reading the rows instead", path.name)
        return None
    if count and not _sample_matches(conn, coll_id, rowids, x):
        log.warning("vector snapshot of %s disagrees with the database; reading the rows instead", path.name)
        return None
    return rowids, x


def _sample_matches(conn, coll_id: int, rowids: np.ndarray, x: np.ndarray) -> bool:
    if len(rowids) > 1 and not bool(np.all(rowids[1:] > rowids[:-1])):
        return False
    at = np.unique(np.linspace(0, len(rowids) - 1, SAMPLE_ROWS).astype(np.int64))
    found = dict(conn.execute(
        "SELECT vec_rowid, embedding FROM vector_items WHERE vec_rowid IN (%s) AND +collection_id = ?"
        % ",".join("?" * len(at)), (*(int(rowids[i]) for i in at), coll_id)).fetchall())
    return all(found.get(int(rowids[i])) == x[i].tobytes() for i in at)


def delete(directory: Path, user_id: str, coll_id: int) -> None:
    with _lock:
        for p in directory.glob(f"{stem(user_id, coll_id)}.*"):
            p.unlink(missing_ok=True)


def delete_user(directory: Path, user_id: str) -> int:
    """Remove every snapshot of this user at once; returns how many files went."""
    n = 0
    with _lock:
        for p in directory.glob(f"{user_part(user_id)}-*"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def prune(directory: Path, max_bytes: int, keep: set[str] = frozenset(), known: set[str] | None = None) -> int:
    """Delete snapshots of unknown collections (`known`: stems of every collection, when given),
    then the oldest until the total is within `max_bytes` (never those in `keep`, unless alone
    they exceed it). Returns the bytes left."""
    with _lock:
        groups: dict[str, list[Path]] = {}
        try:
            entries = list(directory.iterdir())
        except FileNotFoundError:
            return 0
        for p in entries:
            groups.setdefault(p.name.split(".", 1)[0], []).append(p)
        sized = []
        for s, paths in groups.items():
            if known is not None and s not in known:
                for p in paths:
                    p.unlink(missing_ok=True)
                continue
            try:
                stats = [p.stat() for p in paths]
            except FileNotFoundError:
                continue
            sized.append((s in keep, max(st.st_mtime for st in stats), sum(st.st_size for st in stats), s))
        total = sum(t[2] for t in sized)
        for _, _, size, s in sorted(sized):  # not kept first, oldest first
            if total <= max_bytes:
                break
            for p in groups[s]:
                p.unlink(missing_ok=True)
            total -= size
        return total
