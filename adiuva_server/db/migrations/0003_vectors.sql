-- Vector store (issue 4). Embeddings live in sqlite-vec `vec0` tables, one per dimension,
-- created on demand by adiuva_server/vectors/store.py (`vec_f32_<dimension>`, partitioned by
-- collection id); the encrypted payloads and the client's ids live here.

-- A user's named set of vectors of one dimension and one metric. A collection exists while it
-- holds vectors: its dimension and metric are set by the upsert that creates it, and it is
-- removed (freeing the name for another dimension) when its last vector is deleted.
CREATE TABLE vector_collections (
    id          INTEGER PRIMARY KEY,            -- the partition key in vec_f32_<dimension>
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    dimension   INTEGER NOT NULL CHECK (dimension BETWEEN 1 AND 4096),
    metric      TEXT NOT NULL CHECK (metric IN ('l2', 'cosine')),
    count       INTEGER NOT NULL DEFAULT 0 CHECK (count >= 0),
    UNIQUE (user_id, name)
);

-- vec0 tables cannot carry foreign keys: a trigger per dimension table (created with it)
-- deletes the embedding whenever a row here goes, including through the ON DELETE CASCADE
-- from users, so deleting a user deletes their vectors.
CREATE TABLE vector_items (
    vec_rowid     INTEGER PRIMARY KEY,          -- the rowid of the embedding in vec_f32_<dimension>
    collection_id INTEGER NOT NULL REFERENCES vector_collections(id) ON DELETE CASCADE,
    item_id       TEXT NOT NULL,                -- the client's id
    dimension     INTEGER NOT NULL,
    payload       BLOB NOT NULL,                -- encrypted by the client, returned verbatim
    checksum      TEXT NOT NULL,                -- SHA-256 hex of payload, verified on upsert
    UNIQUE (collection_id, item_id)
);
