-- Tombstones (deleted records) are forgotten after ADIUVA_TOMBSTONE_RETENTION. `purged_seq` is
-- the highest change-feed position forgotten so far for that user: a device whose cursor is
-- older than it may have missed deletions and must start again from 0.
ALTER TABLE storage_record_counts ADD COLUMN purged_seq INTEGER NOT NULL DEFAULT 0 CHECK (purged_seq >= 0);

CREATE INDEX storage_records_tombstones ON storage_records (deleted_at) WHERE checksum IS NULL;
