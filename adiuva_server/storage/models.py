"""Request and response models of the storage routes (they also generate the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from adiuva_server.storage.service import CHECKSUM, INLINE_DATA_BYTES, INLINE_PAGE_BYTES, TABLE_NAME
from adiuva_server.storage.store import Backup, Record

MAX_PAGE_SIZE = 1000
MAX_PAGE = 10**7
# Cursors are SQLite INTEGERs (signed 64-bit): a larger value must be a 422, not an
# OverflowError on the way into the database.
MAX_CURSOR = 2**63 - 1
# Sync in bulk: records and bytes of one batch request. The byte limit is on the body as read
# (the JSON, after any Content-Encoding is decoded), enforced while it is read; base64 makes the
# records' own bytes about three quarters of it.
MAX_BATCH_RECORDS = 1000
MAX_BATCH_BODY_BYTES = 16 * 1024 * 1024
MAX_ID_LENGTH = 64
MAX_IF_MATCH_LENGTH = 1024


class RecordCreateQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table: str = Field(pattern=TABLE_NAME, description="the client's table name")


class RecordListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table: str | None = Field(default=None, pattern=TABLE_NAME)
    page: int = Field(default=1, ge=1, le=MAX_PAGE)
    limit: int = Field(default=100, ge=1, le=MAX_PAGE_SIZE)


class ChangesQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: int = Field(default=0, ge=0, le=MAX_CURSOR, description="the cursor from the previous answer; 0 for everything")
    limit: int = Field(default=100, ge=1, le=MAX_PAGE_SIZE)
    include_data: bool = Field(
        default=False,
        description=f"inline each live record's bytes (base64, `data`) when it is at most {INLINE_DATA_BYTES} bytes; "
                    f"a page then ends early rather than inline more than {INLINE_PAGE_BYTES} bytes",
    )


class RecordBatchItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    table: str = Field(pattern=TABLE_NAME, description="the client's table name (ignored when replacing)")
    data: str = Field(description="base64 (standard alphabet, padded) of the encrypted bytes")
    checksum: str = Field(pattern=CHECKSUM.pattern, description="SHA-256 of the decoded bytes, hex")
    id: str | None = Field(default=None, max_length=MAX_ID_LENGTH,
                           description="replace this record of the caller's (404 if there is none)")
    if_match: str | None = Field(
        default=None, max_length=MAX_IF_MATCH_LENGTH,
        description="with `id`: the record's ETag exactly as GET sent it (quoted); 412 if it has changed since",
    )

class RecordBatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[RecordBatchItem] = Field(
        min_length=1, max_length=MAX_BATCH_RECORDS,
        description=f"at most {MAX_BATCH_RECORDS} records and a body of at most {MAX_BATCH_BODY_BYTES} bytes; "
                    "all are stored or none",
    )


class RecordMeta(BaseModel):
    id: str
    table: str
    checksum: str = Field(description="SHA-256 of the encrypted bytes, hex")
    size_bytes: int
    created_at: str = Field(description="ISO 8601, UTC")
    updated_at: str = Field(description="ISO 8601, UTC")

    @classmethod
    def of(cls, r: Record) -> RecordMeta:
        assert r.checksum is not None
        return cls(id=r.id, table=r.table, checksum=r.checksum, size_bytes=r.size_bytes,
                   created_at=r.created_at, updated_at=r.updated_at)


class RecordBatchResult(BaseModel):
    items: list[RecordMeta] = Field(description="one per record sent, in the same order")


class RecordPage(BaseModel):
    items: list[RecordMeta]
    page: int
    limit: int
    total: int


class Change(BaseModel):
    cursor: int = Field(description="position of this change in the feed")
    op: Literal["upsert", "delete"]
    id: str
    table: str
    checksum: str | None = Field(description="null for a deletion")
    size_bytes: int
    created_at: str
    updated_at: str
    deleted_at: str | None
    data: str | None = Field(
        default=None,
        description="with include_data=true: base64 of the record's bytes. null for a deletion, without "
                    f"include_data, and for a record larger than {INLINE_DATA_BYTES} bytes (size_bytes) or "
                    "changed again meanwhile: an upsert without data is fetched with GET /storage/records/{id}",
    )

    @classmethod
    def of(cls, r: Record, data: str | None = None) -> Change:
        return cls(cursor=r.seq, op="upsert" if r.checksum else "delete", id=r.id, table=r.table,
                   checksum=r.checksum, size_bytes=r.size_bytes, created_at=r.created_at,
                   updated_at=r.updated_at, deleted_at=r.deleted_at, data=data)


class ChangesPage(BaseModel):
    changes: list[Change] = Field(description="each record's latest state, in the order of its last change")
    next_cursor: int = Field(description="pass as `since` to get what changed after this page")
    has_more: bool


class BackupMeta(BaseModel):
    id: str
    version: str
    timestamp: str = Field(description="X-Backup-Timestamp as sent (ISO 8601)")
    checksum: str
    size_bytes: int
    created_at: str = Field(description="when the server received it, ISO 8601 UTC")

    @classmethod
    def of(cls, b: Backup) -> BackupMeta:
        return cls(id=b.id, version=b.version, timestamp=b.timestamp, checksum=b.checksum,
                   size_bytes=b.size_bytes, created_at=b.created_at)


class BackupHistory(BaseModel):
    items: list[BackupMeta] = Field(description="newest first")
