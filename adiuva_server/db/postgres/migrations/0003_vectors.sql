-- Vector store on PostgreSQL (adiuva_server/vectors/postgres.py), the twin of the SQLite
-- layout of db/migrations/0003, 0005 and 0009: one row per vector with its float32 embedding
-- (pgvector's `vector`, no fixed dimension: collections of any dimension share the table; unit
-- vectors for cosine), the client's id, the encrypted payload and its checksum.
--
-- No ANN index (HNSW, IVFFlat): they are approximate, and searches must equal a float64 brute
-- force. A search is an exact scan of one collection (`ORDER BY embedding <-> q` over the rows
-- of the primary key's collection prefix) re-scored in float64, or a node's in-memory copy
-- (vectors/mirror.py) used only at exactly the collection's current `version`.
CREATE EXTENSION IF NOT EXISTS vector;

-- Collection versions and vector row ids: each from one counter that never goes back, so a
-- copy can never match a later state, nor a collection created later under a reused name.
-- Both are drawn while the writer holds the collection's row lock, so within a collection they
-- grow in commit order (an in-memory copy appends new rows instead of re-sorting).
CREATE SEQUENCE vector_versions;
CREATE SEQUENCE vector_item_ids;

-- A user's named set of vectors of one dimension and one metric; it exists while it holds
-- vectors (dropped with its last one, freeing the name for another dimension).
CREATE TABLE vector_collections (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id   text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name      text NOT NULL,
    dimension integer NOT NULL CHECK (dimension BETWEEN 1 AND 4096),
    metric    text NOT NULL CHECK (metric IN ('l2', 'cosine')),
    count     integer NOT NULL DEFAULT 0 CHECK (count >= 0),
    -- Moved on by every write to the collection's vectors, in the same transaction.
    version   bigint NOT NULL DEFAULT nextval('vector_versions'),
    UNIQUE (user_id, name)
);

CREATE TABLE vector_items (
    collection_id bigint NOT NULL REFERENCES vector_collections(id) ON DELETE CASCADE,
    id            bigint NOT NULL,               -- from vector_item_ids; kept when replaced
    item_id       text NOT NULL,                 -- the client's id
    payload       bytea NOT NULL,                -- encrypted by the client, returned verbatim
    checksum      text NOT NULL,                 -- SHA-256 hex of payload, verified on upsert
    embedding     vector NOT NULL,
    -- The collection version of the write that last wrote this row: a node whose copy is at
    -- version v catches up by reading the rows written after v and the ids of all (the ids
    -- missing from its copy's were deleted), instead of the whole collection.
    written       bigint NOT NULL,
    -- A collection's rows in id order: scans, loads and payload look-ups use this prefix.
    PRIMARY KEY (collection_id, id),
    UNIQUE (collection_id, item_id)
);
