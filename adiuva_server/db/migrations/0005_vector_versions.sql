-- Vector collection versions (the in-memory search mirror, adiuva_server/vectors/mirror.py).
--
-- A process may keep a copy of a large collection's embeddings in memory for exact numpy
-- search. It may use that copy only while the collection's `version` equals the version the
-- copy was read at; every search reads the version (a primary-key read) in the same read
-- transaction that fetches the payloads.
--
-- The triggers below bump the version in the same transaction as every change to
-- vector_items, whoever makes it (the server, the CLI, another process): every embedding
-- change in vec_f32_<dimension> goes with an insert, update or delete here. Versions come from
-- one counter that never goes back, so a collection id reused after a collection was dropped
-- can never match a copy of the old one.
CREATE TABLE vector_version_counter (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO vector_version_counter (id, value) VALUES (1, 0);

ALTER TABLE vector_collections ADD COLUMN version INTEGER NOT NULL DEFAULT 0;

CREATE TRIGGER vector_items_version_insert AFTER INSERT ON vector_items
BEGIN
    UPDATE vector_version_counter SET value = value + 1 WHERE id = 1;
    UPDATE vector_collections SET version = (SELECT value FROM vector_version_counter WHERE id = 1)
    WHERE id = new.collection_id;
END;

CREATE TRIGGER vector_items_version_update AFTER UPDATE ON vector_items
BEGIN
    UPDATE vector_version_counter SET value = value + 1 WHERE id = 1;
    UPDATE vector_collections SET version = (SELECT value FROM vector_version_counter WHERE id = 1)
    WHERE id IN (old.collection_id, new.collection_id);
END;

CREATE TRIGGER vector_items_version_delete AFTER DELETE ON vector_items
BEGIN
    UPDATE vector_version_counter SET value = value + 1 WHERE id = 1;
    UPDATE vector_collections SET version = (SELECT value FROM vector_version_counter WHERE id = 1)
    WHERE id = old.collection_id;
END;
