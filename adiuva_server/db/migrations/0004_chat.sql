-- Plan runs ("batches"): metadata only, never the plan's variables or results (user content).
-- A running row counts against the tier's active-batch cap.

CREATE TABLE chat_batches (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    plan_id     TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'cancelled', 'interrupted')),
    started_at  INTEGER NOT NULL,
    finished_at INTEGER
);

CREATE INDEX chat_batches_user ON chat_batches (user_id, started_at);
CREATE INDEX chat_batches_running ON chat_batches (user_id) WHERE status = 'running';
