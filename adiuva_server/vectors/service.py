"""What the vector routes do: validate a batch completely (nothing is written unless every
vector is good), then hand it to the store. Only the caller's own collections are reachable:
every store call is keyed by the authenticated user's id."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
from array import array
from collections.abc import Sequence

import numpy as np

from adiuva_server import errors
from adiuva_server.config import Settings
from adiuva_server.vectors.models import VectorIn
from adiuva_server.vectors.store import MAX_DIMENSION, Match, NewVector, UpsertResult, VectorStore


def _invalid(detail: str, loc: list[str | int]) -> errors.InvalidVector:
    return errors.InvalidVector(detail, extra={"errors": [{"loc": ["body", *loc], "msg": detail}]})


# Bounds that keep every float32 sum of squares (4096 of them at most) a finite, normal number.
MAX_ABS_VALUE = 1e15
MIN_COSINE_PEAK = 1e-15


def to_float32(values: Sequence[float] | None, loc: list[str | int], metric: str | None,
               values_b64: str | None = None) -> bytes:
    """float32 bytes (native order) of `values`, or of `values_b64` (base64 of little-endian
    float32); 400 when not base64, empty, too long, not finite in float32, outside +-1e15, or a
    zero vector under cosine (it has no direction)."""
    if values_b64 is not None:
        try:
            raw = base64.b64decode(values_b64, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid("values_b64 is not valid base64", loc) from None
        if len(raw) % 4:
            raise _invalid(f"values_b64 must decode to 4 bytes a value, got {len(raw)} bytes", loc)
        vec = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    else:
        assert values is not None  # the models require exactly one of them
        # values beyond float32's range become inf here and fail below
        vec = np.frombuffer(array("f", values).tobytes(), dtype=np.float32)
    n = len(vec)
    if not 1 <= n <= MAX_DIMENSION:
        raise _invalid(f"a vector needs 1 to {MAX_DIMENSION} values, got {n}", loc)
    if not np.isfinite(vec).all():
        raise _invalid("values must be finite float32 numbers (no NaN, no Infinity, |x| < 3.4e38)", loc)
    peak = float(np.abs(vec).max())
    if peak > MAX_ABS_VALUE:  # distances are summed in float32: squares of more overflow
        raise _invalid(f"values must lie within +-{MAX_ABS_VALUE:g}", loc)
    if metric == "cosine" and peak < MIN_COSINE_PEAK:  # its float32 norm would underflow to 0
        raise _invalid(f"a cosine vector needs a value of magnitude {MIN_COSINE_PEAK:g} or more (a zero vector has no direction)", loc)
    return vec.tobytes()


OFFLOAD_BATCH = 32


class VectorService:
    def __init__(self, settings: Settings, store: VectorStore) -> None:
        self.settings = settings
        self.store = store

    async def upsert(self, user_id: str, tier: str, collection: str, metric: str | None, vectors: Sequence[VectorIn]) -> UpsertResult:
        s = self.settings
        if not vectors:
            raise _invalid("the batch is empty", ["vectors"])
        if len(vectors) > s.vector_max_batch:
            raise _invalid(f"at most {s.vector_max_batch} vectors per upsert, got {len(vectors)}", ["vectors"])
        existing = await self.store.get_collection(user_id, collection)
        dimension = existing.dimension if existing else None
        effective_metric = existing.metric if existing else (metric or "cosine")
        args = (vectors, dimension, effective_metric, collection, existing is not None)
        # Decoding, float conversion and hashing cost ~10 us a vector: off the event loop
        # when the batch is big enough to stall other requests.
        if len(vectors) > OFFLOAD_BATCH:
            batch = await asyncio.to_thread(self._prepare, *args)
        else:
            batch = self._prepare(*args)
        dimension = len(batch[0].embedding) // 4
        return await self.store.upsert(user_id, tier, collection, metric, dimension, batch)

    def _prepare(self, vectors: Sequence[VectorIn], dimension: int | None, effective_metric: str, collection: str,
                 existing: bool) -> list[NewVector]:
        """Validate a whole batch before anything is written (all or nothing)."""
        s = self.settings
        seen: set[str] = set()
        batch = []
        for i, v in enumerate(vectors):
            loc: list[str | int] = ["vectors", i]
            if v.id in seen:
                raise _invalid(f"id {v.id!r} appears twice in the batch", [*loc, "id"])
            seen.add(v.id)
            field = "values" if v.values_b64 is None else "values_b64"
            embedding = to_float32(v.values, [*loc, field], effective_metric, v.values_b64)
            n = len(embedding) // 4
            if dimension is None:
                dimension = n
            if n != dimension:
                where = f"collection {collection!r} holds" if existing else "this batch starts with"
                raise errors.DimensionMismatch(
                    f"vectors[{i}] has {n} values; {where} vectors of dimension {dimension}",
                    extra={"errors": [{"loc": ["body", *loc, field], "msg": "dimension mismatch"}], "dimension": dimension},
                )
            try:
                payload = base64.b64decode(v.payload, validate=True)
            except (binascii.Error, ValueError):
                raise _invalid(f"vectors[{i}].payload is not valid base64", [*loc, "payload"]) from None
            if len(payload) > s.vector_max_payload_bytes:
                raise errors.PayloadTooLarge(
                    f"vectors[{i}].payload is {len(payload)} bytes; the limit is {s.vector_max_payload_bytes}"
                )
            # Constant-time comparison of the hex digests (principle 3 of DESIGN.md).
            checksum = v.checksum.lower()
            if not hmac.compare_digest(hashlib.sha256(payload).hexdigest(), checksum):
                raise errors.ChecksumMismatch(
                    f"vectors[{i}].checksum is not the SHA-256 of its payload; nothing was stored",
                    extra={"errors": [{"loc": ["body", *loc, "checksum"], "msg": "checksum mismatch"}]},
                )
            batch.append(NewVector(v.id, embedding, payload, checksum))
        return batch

    async def search(self, user_id: str, collection: str, values: Sequence[float] | None, top_k: int,
                     values_b64: str | None = None) -> list[Match]:
        bound = self.settings.vector_max_top_k
        if not 1 <= top_k <= bound:
            raise _invalid(f"top_k must be between 1 and {bound}, got {top_k}", ["top_k"])
        coll = await self.store.get_collection(user_id, collection)
        query = to_float32(values, ["values" if values_b64 is None else "values_b64"], coll.metric if coll else None,
                           values_b64)
        if coll is None:
            return []  # nothing stored (yet) under this name
        if len(query) // 4 != coll.dimension:
            raise errors.DimensionMismatch(
                f"the query has {len(query) // 4} values; collection {collection!r} holds vectors of dimension {coll.dimension}",
                extra={"dimension": coll.dimension},
            )
        return await self.store.search(coll, query, top_k)

    async def delete(self, user_id: str, tier: str, collection: str, ids: Sequence[str]) -> int:
        if len(ids) > self.settings.vector_max_batch:
            raise _invalid(f"at most {self.settings.vector_max_batch} ids per delete, got {len(ids)}", ["ids"])
        return await self.store.delete(user_id, tier, collection, list(dict.fromkeys(ids)))
