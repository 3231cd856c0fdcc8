-- The plugin marketplace (adiuva_server/marketplace). Counters (installs, ratings) are kept by
-- triggers in the same transaction as the row that changes them, so no code path (a cascade
-- from a deleted user included) can make them drift from the rows they count.

-- One row per plugin id. The catalog columns (name ... permissions) are those of the approved
-- version (`version`), or of the first submission while none is approved (status 'unlisted').
CREATE TABLE plugins (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    name_key      TEXT NOT NULL,  -- lower(name): one plugin per name
    owner_id      TEXT REFERENCES users(id) ON DELETE SET NULL,  -- its developer; NULL: bundled or the admin's
    status        TEXT NOT NULL CHECK (status IN ('unlisted', 'approved', 'revoked')),
    version       TEXT,
    description   TEXT NOT NULL,
    author        TEXT NOT NULL,
    category      TEXT NOT NULL,
    price_cents   INTEGER NOT NULL CHECK (price_cents >= 0),
    currency      TEXT NOT NULL,
    permissions   TEXT NOT NULL,  -- JSON list
    bundled       INTEGER NOT NULL DEFAULT 0,
    install_count INTEGER NOT NULL DEFAULT 0 CHECK (install_count >= 0),
    rating_count  INTEGER NOT NULL DEFAULT 0 CHECK (rating_count >= 0),
    rating_sum    INTEGER NOT NULL DEFAULT 0 CHECK (rating_sum >= 0),
    created_at    TEXT NOT NULL,
    listed_at     TEXT  -- first approval ("newest" sorts by it)
);
CREATE UNIQUE INDEX plugins_name ON plugins (name_key);
CREATE INDEX plugins_listed ON plugins (status, category);
-- One index per sort order of the catalog (sqlite.py's ORDER BY expressions, exactly): a page
-- reads its 20 rows in order instead of sorting every listed plugin.
CREATE INDEX plugins_by_rating ON plugins (status, rating_count = 0, CAST(rating_sum AS REAL) / MAX(rating_count, 1) DESC,
                                           rating_count DESC, name_key, id);
CREATE INDEX plugins_by_installs ON plugins (status, install_count DESC, name_key, id);
CREATE INDEX plugins_by_newest ON plugins (status, listed_at DESC, id);

-- Every submitted version with its review. `package` is the .tar.gz exactly as submitted (small:
-- ADIUVA_PLUGIN_MAX_PACKAGE_BYTES); `signature` is set at approval (signing.py says over what).
CREATE TABLE plugin_versions (
    id           TEXT PRIMARY KEY,  -- the submission id
    plugin_id    TEXT NOT NULL REFERENCES plugins(id),
    version      TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending_review', 'approved', 'rejected')),
    manifest     TEXT NOT NULL,  -- JSON
    package      BLOB NOT NULL,
    checksum     TEXT NOT NULL,  -- SHA-256 hex of package
    size_bytes   INTEGER NOT NULL,
    signature    TEXT,
    key_id       TEXT,
    submitted_by TEXT NOT NULL,  -- a user id, 'cli' or 'bundled'
    submitted_at TEXT NOT NULL,
    reviewer     TEXT,
    notes        TEXT,
    reviewed_at  TEXT
);
-- A version number is never reused once pending or approved; one pending review per plugin.
CREATE UNIQUE INDEX plugin_versions_version ON plugin_versions (plugin_id, version) WHERE status != 'rejected';
CREATE UNIQUE INDEX plugin_versions_one_pending ON plugin_versions (plugin_id) WHERE status = 'pending_review';

-- Every decision, in order: approved, rejected, revoked.
CREATE TABLE plugin_reviews (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    plugin_id  TEXT NOT NULL REFERENCES plugins(id),
    version    TEXT,
    decision   TEXT NOT NULL CHECK (decision IN ('approved', 'rejected', 'revoked')),
    reviewer   TEXT NOT NULL,
    notes      TEXT NOT NULL DEFAULT '',
    decided_at TEXT NOT NULL
);
CREATE INDEX plugin_reviews_plugin ON plugin_reviews (plugin_id, seq);

-- One row per (user, plugin) ever installed: uninstalling keeps it ('uninstalled'), so the price
-- paid (a snapshot, never the current price) and the payment state survive a reinstall. The paid
-- part adds 'awaiting_payment' rows (not counted) and moves payment_state and payment_ref.
CREATE TABLE plugin_installs (
    user_id            TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    plugin_id          TEXT NOT NULL REFERENCES plugins(id),
    state              TEXT NOT NULL CHECK (state IN ('installed', 'uninstalled', 'awaiting_payment')),
    price_cents        INTEGER NOT NULL CHECK (price_cents >= 0),
    currency           TEXT NOT NULL,
    payment_state      TEXT NOT NULL CHECK (payment_state IN ('free', 'pending', 'paid', 'refunded')),
    payment_ref        TEXT,
    first_installed_at TEXT NOT NULL,
    installed_at       TEXT NOT NULL,
    uninstalled_at     TEXT,
    PRIMARY KEY (user_id, plugin_id)
) WITHOUT ROWID;
CREATE INDEX plugin_installs_plugin ON plugin_installs (plugin_id);

CREATE TRIGGER plugin_installs_count_insert AFTER INSERT ON plugin_installs WHEN NEW.state = 'installed'
BEGIN
    UPDATE plugins SET install_count = install_count + 1 WHERE id = NEW.plugin_id;
END;
CREATE TRIGGER plugin_installs_count_update AFTER UPDATE OF state ON plugin_installs WHEN OLD.state != NEW.state
BEGIN
    UPDATE plugins SET install_count = install_count + (NEW.state = 'installed') - (OLD.state = 'installed')
     WHERE id = NEW.plugin_id;
END;
CREATE TRIGGER plugin_installs_count_delete AFTER DELETE ON plugin_installs WHEN OLD.state = 'installed'
BEGIN
    UPDATE plugins SET install_count = install_count - 1 WHERE id = OLD.plugin_id;
END;

CREATE TABLE plugin_ratings (
    plugin_id TEXT NOT NULL REFERENCES plugins(id),
    user_id   TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    stars     INTEGER NOT NULL CHECK (stars BETWEEN 1 AND 5),
    rated_at  TEXT NOT NULL,
    PRIMARY KEY (plugin_id, user_id)
) WITHOUT ROWID;
CREATE INDEX plugin_ratings_user ON plugin_ratings (user_id);

CREATE TRIGGER plugin_ratings_insert AFTER INSERT ON plugin_ratings
BEGIN
    UPDATE plugins SET rating_count = rating_count + 1, rating_sum = rating_sum + NEW.stars WHERE id = NEW.plugin_id;
END;
CREATE TRIGGER plugin_ratings_update AFTER UPDATE OF stars ON plugin_ratings
BEGIN
    UPDATE plugins SET rating_sum = rating_sum + NEW.stars - OLD.stars WHERE id = NEW.plugin_id;
END;
CREATE TRIGGER plugin_ratings_delete AFTER DELETE ON plugin_ratings
BEGIN
    UPDATE plugins SET rating_count = rating_count - 1, rating_sum = rating_sum - OLD.stars WHERE id = OLD.plugin_id;
END;

-- The server's Ed25519 package-signing key (one; created on first use). In the database, not a
-- file: every node of a cluster signs with it, and a server backup carries it, so a restored
-- server keeps the key the desktop apps trust (see README, "Plugins").
CREATE TABLE plugin_signing_key (
    singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
    key_id      TEXT NOT NULL,
    private_key BLOB NOT NULL,  -- the 32 raw bytes
    public_key  BLOB NOT NULL,  -- the 32 raw bytes
    created_at  TEXT NOT NULL
);
