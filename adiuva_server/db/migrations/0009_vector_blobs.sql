-- Vectors at every size (issue 15): embeddings move out of sqlite-vec's vec0 tables into
-- vector_items itself, as float32 blobs (native byte order; unit vectors for cosine).
--
-- vec0 allocated a whole chunk for every collection (a user with 3 vectors of 384 paid ~50 KB)
-- and its 0.1.9 wheel scans without SIMD; searches now run over in-memory copies with numpy
-- (adiuva_server/vectors/mirror.py), so the database only has to hold the rows compactly.
--
-- The data step cannot be written in SQL (the vec0 tables, `vec_f32_<dimension>`, are named at
-- run time): adiuva_server/vectors/store.py `upgrade_legacy_layout` copies each table's
-- embeddings into this column and drops the table and its cleanup trigger, one transaction per
-- table, before the server serves. Until then the old triggers keep both layouts consistent
-- (a user deleted by the CLI meanwhile loses their embeddings in vec0 as before).
ALTER TABLE vector_items ADD COLUMN embedding BLOB;

-- A collection's rows in rowid order (loading a copy, scanning): every index ends with the
-- rowid, so this is the collection id alone.
CREATE INDEX vector_items_collection_rowid ON vector_items (collection_id, vec_rowid);
