-- Accounts and sessions. Times are Unix seconds (INTEGER) unless named *_at_iso.

CREATE TABLE users (
    id              TEXT PRIMARY KEY,               -- UUID
    email           TEXT NOT NULL UNIQUE,           -- normalised (lower-cased) by the service
    password_hash   TEXT NOT NULL,                  -- argon2id PHC string
    tier            TEXT NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'pro', 'power', 'team')),
    is_admin        INTEGER NOT NULL DEFAULT 0 CHECK (is_admin IN (0, 1)),
    disabled        INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    -- Bumped on password change, disable and admin revocation: access tokens carry the
    -- version they were issued under and stop working when it moves on.
    session_version INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL
);

-- Refresh tokens are opaque random strings; only their SHA-256 is stored. Each login starts a
-- family; each refresh uses one token and issues the next in the same family. Presenting a
-- used token again means it was stolen (or replayed): the whole family is revoked.
CREATE TABLE refresh_tokens (
    token_hash  BLOB PRIMARY KEY,
    family_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    revoked     INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
) WITHOUT ROWID;

CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);
CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expires_at);

-- Bytes each user stores, per kind ('cloud': records and vector payloads; 'backup'), updated in
-- the same transaction as the rows that cause it (see adiuva_server/quota.py).
CREATE TABLE storage_usage (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind    TEXT NOT NULL CHECK (kind IN ('cloud', 'backup')),
    bytes   INTEGER NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    PRIMARY KEY (user_id, kind)
) WITHOUT ROWID;
