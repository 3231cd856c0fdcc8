-- Paid plugins (licensed mode; adiuva_server/marketplace, README "Plugins: revenue"): developers
-- and their Stripe connected accounts, purchases, and the revenue ledger. Money is integer cents
-- of the purchase's currency; times are ISO 8601 text as in 0012.

-- A developer is an account with a Stripe connected account: the destination of its plugins'
-- 70 % share. Removing the account removes the row; the ledger keeps what was paid.
CREATE TABLE plugin_developers (
    user_id        TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    stripe_account TEXT NOT NULL UNIQUE,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);

-- One row per attempt to buy a plugin. Written before Stripe is called: its id is the
-- idempotency key of the checkout, and the unique index below lets one user hold at most one
-- open (pending) or paid purchase of a plugin, so a second or concurrent install, or a retry,
-- finds this row and charges nothing more. The split is fixed when the row is written.
CREATE TABLE plugin_purchases (
    id               TEXT PRIMARY KEY,
    user_id          TEXT REFERENCES users(id) ON DELETE SET NULL,  -- the buyer; kept for the books
    plugin_id        TEXT NOT NULL REFERENCES plugins(id),
    state            TEXT NOT NULL CHECK (state IN ('pending', 'paid', 'refunded', 'expired')),
    price_cents      INTEGER NOT NULL CHECK (price_cents > 0),
    currency         TEXT NOT NULL,
    fee_cents        INTEGER NOT NULL CHECK (fee_cents >= 0),  -- the platform's 30 %, rounded half up
    developer_cents  INTEGER NOT NULL CHECK (developer_cents >= 0),  -- price - fee
    developer_id     TEXT,  -- NULL: the operator's own plugin (bundled or the admin's): no transfer
    destination      TEXT,  -- the developer's connected account when the row was written
    checkout_session TEXT UNIQUE,
    checkout_url     TEXT,
    payment_intent   TEXT UNIQUE,
    created_at       TEXT NOT NULL,
    created_unix     INTEGER NOT NULL,
    paid_at          TEXT,
    refunded_at      TEXT,
    CHECK (fee_cents + developer_cents = price_cents)
);
CREATE UNIQUE INDEX plugin_purchases_open ON plugin_purchases (user_id, plugin_id) WHERE state IN ('pending', 'paid');
CREATE INDEX plugin_purchases_plugin ON plugin_purchases (plugin_id);

-- The revenue ledger: one 'sale' when a purchase is paid, one 'refund' (negative amounts) when
-- it is refunded; never updated. Earnings reports sum it.
CREATE TABLE plugin_ledger (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    purchase_id     TEXT NOT NULL REFERENCES plugin_purchases(id),
    kind            TEXT NOT NULL CHECK (kind IN ('sale', 'refund')),
    plugin_id       TEXT NOT NULL,
    developer_id    TEXT,
    destination     TEXT,
    currency        TEXT NOT NULL,
    gross_cents     INTEGER NOT NULL,
    fee_cents       INTEGER NOT NULL,
    developer_cents INTEGER NOT NULL,
    stripe_ref      TEXT,  -- the payment intent of a sale, the refund of a refund
    at              TEXT NOT NULL,
    UNIQUE (purchase_id, kind)
);
CREATE INDEX plugin_ledger_developer ON plugin_ledger (developer_id, at);
