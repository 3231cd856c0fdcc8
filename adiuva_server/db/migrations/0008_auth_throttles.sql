-- Login throttles and token families (adiuva_server/auth/throttle.py, auth/service.py).

-- Bumped by `adiuva user unlock` and by a new password: the server keys an account's login
-- throttles by it, so a change made by the CLI in another process lifts a back-off at once.
ALTER TABLE users ADD COLUMN throttle_generation INTEGER NOT NULL DEFAULT 0;

-- Addresses that have signed in to an account with its password, as a keyed hash of the address
-- (never the address): each gets a throttle pool of its own, so strangers cannot lock them out.
CREATE TABLE login_addresses (
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    address_tag BLOB NOT NULL,
    known_until INTEGER NOT NULL,
    PRIMARY KEY (user_id, address_tag)
) WITHOUT ROWID;

CREATE INDEX login_addresses_expiry ON login_addresses (known_until);

-- Refresh families revoked by a reused token, kept while an access token of theirs could still
-- be alive (`until`): the per-request check refuses access tokens of these families.
CREATE TABLE revoked_families (
    family_id TEXT PRIMARY KEY,
    user_id   TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    until     INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX revoked_families_user ON revoked_families (user_id);
CREATE INDEX revoked_families_expiry ON revoked_families (until);
