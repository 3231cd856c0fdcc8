-- Admin console sessions (adiuva_server/console). The cookie holds a random id; only its SHA-256
-- is stored, so a copy of the database (a server backup) signs no one in. A session counts only
-- while its user is an enabled admin at the same session_version (a password change or disabling
-- bumps it), checked on every console request.
CREATE TABLE console_sessions (
    id_hash         BLOB PRIMARY KEY,
    user_id         TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    session_version INTEGER NOT NULL,
    csrf_token      TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX console_sessions_user ON console_sessions (user_id);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
