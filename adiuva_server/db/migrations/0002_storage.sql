-- End-to-end encrypted storage: metadata of records and backups. The bytes live in the blob
-- store, named by their SHA-256 (the `checksum` columns); a row is only written once its
-- object is durable. Rows are ordered by rowid (insertion order).

-- One row per record, kept after deletion as a tombstone (checksum NULL, deleted_at set) so
-- the change feed can tell other devices. `seq` is the record's position in its owner's feed: it
-- takes the next value of that user's own counter (storage_record_counts.last_seq) on every
-- create, replace and delete, so a user's cursors reveal nothing about other users' activity.
CREATE TABLE storage_records (
    id          TEXT PRIMARY KEY,               -- UUID
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    table_name  TEXT NOT NULL,
    checksum    TEXT CHECK (checksum IS NULL OR length(checksum) = 64),
    size_bytes  INTEGER NOT NULL DEFAULT 0 CHECK (size_bytes >= 0),
    seq         INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    deleted_at  TEXT,
    CHECK ((checksum IS NULL) = (deleted_at IS NOT NULL))
);

CREATE INDEX storage_records_live ON storage_records (user_id) WHERE checksum IS NOT NULL;
CREATE INDEX storage_records_live_table ON storage_records (user_id, table_name) WHERE checksum IS NOT NULL;
CREATE UNIQUE INDEX storage_records_feed ON storage_records (user_id, seq);
CREATE INDEX storage_records_checksum ON storage_records (checksum) WHERE checksum IS NOT NULL;

-- Live records per user, kept in the same transaction as the rows (a COUNT(*) per insert would
-- grow with the user's data on the single writer), and the last change-feed cursor given out
-- to that user (never reused, never decreasing).
CREATE TABLE storage_record_counts (
    user_id  TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    records  INTEGER NOT NULL DEFAULT 0 CHECK (records >= 0),
    last_seq INTEGER NOT NULL DEFAULT 0 CHECK (last_seq >= 0)
) WITHOUT ROWID;

CREATE TABLE storage_backups (
    id               TEXT PRIMARY KEY,          -- UUID
    user_id          TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    version          TEXT NOT NULL,             -- X-Backup-Version, as sent
    backup_timestamp TEXT NOT NULL,             -- X-Backup-Timestamp (ISO 8601), as sent
    checksum         TEXT NOT NULL CHECK (length(checksum) = 64),
    size_bytes       INTEGER NOT NULL CHECK (size_bytes >= 0),
    created_at       TEXT NOT NULL,             -- when the server received it, ISO 8601 UTC
    created_unix     INTEGER NOT NULL           -- the same, Unix seconds (Last-Modified)
);

CREATE INDEX storage_backups_user ON storage_backups (user_id);
CREATE INDEX storage_backups_checksum ON storage_backups (checksum);
