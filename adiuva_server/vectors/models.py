"""Request and response models of the vector routes (they also generate the OpenAPI document).

Shapes are checked here (422 validation_error), including that a vector comes as exactly one
of `values` (JSON numbers) or `values_b64` (base64 of little-endian float32, ~4x smaller and
much cheaper to parse); what needs the collection or the settings (dimension, finiteness, batch
size, top_k bound, base64, checksum) is checked by the service and answered with a 400 naming
the vector at fault.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator

Metric = Literal["l2", "cosine"]
CollectionName = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
          description="A collection: a set of vectors of one dimension and one metric (default: 'default')"),
]
VectorId = Annotated[str, Field(min_length=1, max_length=256)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$", description="SHA-256 hex of the payload bytes")]
Values = Annotated[
    list[StrictFloat] | None,
    Field(description="1 to 4096 finite float32 values as JSON numbers; the collection fixes the length. "
                      "Give this or values_b64"),
]
ValuesB64 = Annotated[
    str | None,
    Field(description="The same values as base64 (standard alphabet, padded) of little-endian float32, "
                      "4 bytes a value. Give this or values"),
]


class _OneEncoding(BaseModel):
    values: Values = None
    values_b64: ValuesB64 = None

    @model_validator(mode="after")
    def _exactly_one(self):
        if (self.values is None) == (self.values_b64 is None):
            raise ValueError("give exactly one of values or values_b64")
        return self


class VectorIn(_OneEncoding):
    model_config = ConfigDict(extra="forbid")
    id: VectorId
    payload: str = Field(description="base64 (standard alphabet, padded) of the encrypted payload")
    checksum: Sha256Hex


class UpsertRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collection: CollectionName = "default"
    metric: Metric | None = Field(
        None, description="Set when the collection is created (default cosine); must match it afterwards"
    )
    vectors: list[VectorIn]


class UpsertResponse(BaseModel):
    collection: str
    dimension: int
    metric: Metric
    inserted: int
    replaced: int
    count: int = Field(description="vectors in the collection after this upsert")


class SearchRequest(_OneEncoding):
    model_config = ConfigDict(extra="forbid")
    collection: CollectionName = "default"
    top_k: StrictInt = Field(10, ge=1, description="1 to the server's bound (ADIUVA_VECTOR_MAX_TOP_K, default 100)")


class MatchOut(BaseModel):
    id: str
    distance: float = Field(description="l2: Euclidean distance; cosine: 1 - cosine similarity")
    payload: str = Field(description="base64 of the payload, exactly as uploaded")
    checksum: str


class SearchResponse(BaseModel):
    matches: list[MatchOut] = Field(description="nearest first")


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    collection: CollectionName = "default"
    ids: list[VectorId] = Field(min_length=1)


class DeleteResponse(BaseModel):
    deleted: int
