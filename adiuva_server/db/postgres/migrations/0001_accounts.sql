-- Accounts and sessions on PostgreSQL (adiuva_server/auth/postgres.py), the twin of the SQLite
-- layout of db/migrations/0001 and 0008. Tables and columns are named as SQLite's (a
-- table-by-table copy, ops/tablecopy.py, maps them 1:1); types are PostgreSQL's own: 0/1 flags
-- are `boolean`, BLOBs `bytea`, Unix seconds `bigint`. Times are Unix seconds unless named
-- *_at (created_at is ISO 8601 text, as on SQLite).
--
-- Emails are stored as the service normalises them (lower-cased) and compared exactly, as on
-- SQLite (a plain UNIQUE on text, deterministic collation): the store never folds case itself.

CREATE TABLE users (
    id                  text PRIMARY KEY,               -- UUID
    email               text NOT NULL UNIQUE,
    password_hash       text NOT NULL,                  -- argon2id PHC string
    tier                text NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'pro', 'power', 'team')),
    is_admin            boolean NOT NULL DEFAULT false,
    disabled            boolean NOT NULL DEFAULT false,
    -- Bumped on password change and disable: access tokens carry the version they were
    -- issued under and stop working when it moves on.
    session_version     bigint NOT NULL DEFAULT 0,
    created_at          text NOT NULL,
    -- Bumped by `adiuva user unlock`, a new password and enabling: login throttles are keyed
    -- by it, so a change made on any node lifts a back-off at once on all.
    throttle_generation bigint NOT NULL DEFAULT 0
);

-- The active admins, found (and row-locked) by the last-admin check without a scan.
CREATE INDEX users_active_admins ON users (id) WHERE is_admin AND NOT disabled;

-- Refresh tokens: only their SHA-256 is stored. Each login starts a family; each refresh uses
-- one token and issues the next in the same family; a used token presented again (after the
-- grace for a retried request) revokes the family.
CREATE TABLE refresh_tokens (
    token_hash bytea PRIMARY KEY,
    family_id  text NOT NULL,
    user_id    text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    issued_at  bigint NOT NULL,
    expires_at bigint NOT NULL,
    used_at    bigint,
    revoked    boolean NOT NULL DEFAULT false
);

CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);
CREATE INDEX refresh_tokens_expiry ON refresh_tokens (expires_at);

-- Bytes each user stores, per kind, updated in the same transaction as the rows that cause it.
CREATE TABLE storage_usage (
    user_id text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    kind    text NOT NULL CHECK (kind IN ('cloud', 'backup')),
    bytes   bigint NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    PRIMARY KEY (user_id, kind)
);

-- Addresses that have signed in to an account with its password, as a keyed hash of the
-- address (never the address): each gets a throttle pool of its own.
CREATE TABLE login_addresses (
    user_id     text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    address_tag bytea NOT NULL,
    known_until bigint NOT NULL,
    PRIMARY KEY (user_id, address_tag)
);

CREATE INDEX login_addresses_expiry ON login_addresses (known_until);

-- Refresh families revoked by a reused token, kept while an access token of theirs could
-- still be alive (`until`): the per-request check refuses access tokens of these families.
CREATE TABLE revoked_families (
    family_id text PRIMARY KEY,
    user_id   text NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    until     bigint NOT NULL
);

CREATE INDEX revoked_families_user ON revoked_families (user_id);
CREATE INDEX revoked_families_expiry ON revoked_families (until);
