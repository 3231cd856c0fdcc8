-- Stripe billing (adiuva_server/billing). Times are Unix seconds.

-- One Stripe customer per account, created once and reused: both columns unique, so two
-- concurrent checkouts of one account can never record two customers.
CREATE TABLE billing_customers (
    user_id     TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    customer_id TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- Each subscription as last applied. `observed_at` is the time of the state applied (the
-- event's `created`, or when we fetched it from Stripe): an older state never overwrites it.
-- `past_due_since` starts the grace of a past_due subscription.
CREATE TABLE billing_subscriptions (
    subscription_id      TEXT PRIMARY KEY,
    user_id              TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    customer_id          TEXT NOT NULL,
    status               TEXT NOT NULL,
    price_id             TEXT,
    current_period_end   INTEGER,
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0 CHECK (cancel_at_period_end IN (0, 1)),
    past_due_since       INTEGER,
    observed_at          INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX billing_subscriptions_user ON billing_subscriptions (user_id);
CREATE INDEX billing_subscriptions_past_due ON billing_subscriptions (past_due_since) WHERE past_due_since IS NOT NULL;

-- Every event id applied, written in the same transaction as its effects: a replay (or a
-- concurrent duplicate delivery) finds its id here and changes nothing.
CREATE TABLE billing_events (
    event_id     TEXT PRIMARY KEY,
    type         TEXT NOT NULL,
    created      INTEGER NOT NULL,
    processed_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Each signed delivery as received, written before it is processed, then its outcome
-- (dj-stripe's webhook log): payment code that can be audited after the fact.
CREATE TABLE billing_webhook_log (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    event_id    TEXT,
    event_type  TEXT,
    headers     TEXT NOT NULL,
    body        BLOB NOT NULL,
    outcome     TEXT NOT NULL DEFAULT 'received',
    detail      TEXT NOT NULL DEFAULT ''
);

CREATE INDEX billing_webhook_log_received ON billing_webhook_log (received_at);
CREATE INDEX billing_webhook_log_event ON billing_webhook_log (event_id);

-- Background jobs that must run once per period across every server process on this database.
CREATE TABLE billing_job_runs (
    name         TEXT PRIMARY KEY,
    last_started INTEGER NOT NULL
) WITHOUT ROWID;
