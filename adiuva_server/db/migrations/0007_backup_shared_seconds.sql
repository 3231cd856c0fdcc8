-- Last-Modified has whole seconds. A backup that arrived in the same second as an earlier one of
-- the same user cannot be told apart from it by date, so its date is no validator (no 304 on
-- If-Modified-Since, no If-Range by date): ETags still are.
ALTER TABLE storage_backups ADD COLUMN shares_second INTEGER NOT NULL DEFAULT 0 CHECK (shares_second IN (0, 1));
