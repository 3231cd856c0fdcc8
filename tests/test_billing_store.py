"""The billing store's contract, on both backends: a real SQLite file and a real PostgreSQL 18
(tests/servers_postgres.py). The invariants under concurrent writers: one customer per account,
an event applied exactly once, an older state never replacing a newer one, one job run per
period."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest

from adiuva_server.billing.policy import Policy, SubscriptionState
from adiuva_server.billing.store import EventEffects, Outcome
from adiuva_server.db import Database

POLICY = Policy({"pro": "price_pro", "power": "price_power", "team": "price_team"}, past_due_grace=3600)


class Backend:
    """A store plus the few direct reads and writes the tests need (users are another feature's)."""

    def __init__(self, kind: str, store, db) -> None:
        self.kind, self.store, self.db = kind, store, db

    async def add_user(self, email: str, tier: str = "free") -> str:
        user_id = str(uuid.uuid4())
        if self.kind == "sqlite":
            await self.db.execute_write("INSERT INTO users (id, email, password_hash, tier, created_at) VALUES (?, ?, 'x', ?, '2026-01-01')",
                                        (user_id, email, tier))
        else:
            await self.db.execute("INSERT INTO users (id, email, password_hash, tier, created_at) VALUES ($1, $2, 'x', $3, '2026-01-01')",
                                  user_id, email, tier)
        return user_id

    async def value(self, sql: str, *args):
        if self.kind == "sqlite":
            row = await self.db.fetchone(sql, args)
            return row[0] if row else None
        return await self.db.fetchval(re.sub(r"\?", lambda m, c=iter(range(1, 99)): f"${next(c)}", sql), *args)

    async def tier(self, user_id: str) -> str:
        return await self.value("SELECT tier FROM users WHERE id = ?", user_id)

    async def count(self, table: str) -> int:
        return await self.value(f"SELECT count(*) FROM {table}")


# Until the PostgreSQL accounts schema (migration 0001) is on this branch, the users table the
# billing schema refers to is made here, with SQLite's columns.
PG_USERS = """CREATE TABLE IF NOT EXISTS users (
    id text PRIMARY KEY, email text NOT NULL UNIQUE, password_hash text NOT NULL,
    tier text NOT NULL DEFAULT 'free', is_admin bigint NOT NULL DEFAULT 0, disabled bigint NOT NULL DEFAULT 0,
    session_version bigint NOT NULL DEFAULT 0, created_at text NOT NULL)"""


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_kind(request) -> tuple[str, str | None]:
    """(kind, PostgreSQL URL): pg_url is a synchronous fixture, so it is asked for here."""
    return request.param, request.getfixturevalue("pg_url") if request.param == "postgresql" else None


@pytest.fixture
async def backend(backend_kind, tmp_path):
    kind, url = backend_kind
    if kind == "sqlite":
        from adiuva_server.billing.sqlite import SQLiteBillingStore

        db = await Database.open(tmp_path / "adiuva.db")
        yield Backend("sqlite", SQLiteBillingStore(db, POLICY), db)
        await db.close()
        return
    import asyncpg

    from adiuva_server.billing.postgres import PostgresBillingStore
    from adiuva_server.db.postgres import PgDatabase
    from adiuva_server.db.postgres.database import migrations

    if not any(re.search(r"CREATE TABLE (IF NOT EXISTS )?users\b", sql) for _, _, sql in migrations()):
        conn = await asyncpg.connect(url)
        await conn.execute(PG_USERS)
        await conn.close()
    db = await PgDatabase.open(url)
    yield Backend("postgresql", PostgresBillingStore(db, POLICY), db)
    await db.close()


def state(sub_id="sub_1", customer="cus_1", status="active", price="price_pro", hint=None) -> SubscriptionState:
    return SubscriptionState(sub_id, customer, status, price, 2_000_000_000, False, hint)


async def event(b: Backend, event_id: str, st: SubscriptionState | None, at: int, now: int = 1000, **kw):
    log_id = await b.store.log_delivery(now, event_id, "customer.subscription.updated", {"Stripe-Signature": "t=1"}, b"{}")
    return await b.store.apply_event(log_id, event_id, "customer.subscription.updated", at, now,
                                     EventEffects(state=st, observed_at=at, **kw))


async def test_one_customer_per_account_first_wins(backend):
    ada, bob = await backend.add_user("ada@example.org"), await backend.add_user("bob@example.org")
    got = await asyncio.gather(*(backend.store.save_customer(ada, f"cus_{i}", 1) for i in range(10)))
    assert len(set(got)) == 1 and await backend.store.customer_of(ada) == got[0]
    assert await backend.count("billing_customers") == 1
    with pytest.raises(LookupError):  # a customer id is one account's only
        await backend.store.save_customer(bob, got[0], 1)
    assert await backend.store.customer_of(bob) is None


async def test_an_event_applies_exactly_once_under_concurrent_deliveries(backend):
    ada = await backend.add_user("ada@example.org")
    await backend.store.save_customer(ada, "cus_1", 1)
    results = await asyncio.gather(*(event(backend, "evt_same", state(price="price_team"), 100) for _ in range(20)))
    assert sorted(r.outcome for r in results) == [Outcome.APPLIED] + [Outcome.DUPLICATE] * 19
    (applied,) = [r for r in results if r.outcome is Outcome.APPLIED]
    assert [(c.old, c.new) for c in applied.changes] == [("free", "team")]
    assert await backend.count("billing_events") == 1
    assert await backend.value("SELECT count(*) FROM billing_webhook_log WHERE outcome = 'duplicate'") == 19
    assert await backend.tier(ada) == "team"


async def test_an_older_state_never_replaces_a_newer_one(backend):
    ada = await backend.add_user("ada@example.org")
    await backend.store.save_customer(ada, "cus_1", 1)
    assert (await event(backend, "e1", state(price="price_power"), 100)).outcome is Outcome.APPLIED
    assert (await event(backend, "e2", state(price="price_pro"), 50)).outcome is Outcome.STALE
    assert (await event(backend, "e3", state(status="incomplete"), 100)).outcome is Outcome.STALE  # same second
    assert await backend.tier(ada) == "power"
    assert (await event(backend, "e4", state(status="canceled"), 150)).outcome is Outcome.APPLIED
    assert await backend.tier(ada) == "free"
    assert (await event(backend, "e5", state(status="active"), 149)).outcome is Outcome.STALE
    assert await backend.tier(ada) == "free"


async def test_concurrent_events_of_one_subscription_end_at_the_newest(backend):
    ada = await backend.add_user("ada@example.org")
    await backend.store.save_customer(ada, "cus_1", 1)
    prices = ["price_pro", "price_power", "price_team"]
    times = list(range(100, 140))
    # Delivered all at once in a shuffled order; the newest (t=139) must be what remains.
    order = times[1::2] + times[::2]
    await asyncio.gather(*(event(backend, f"e{t}", state(price=prices[t % 3]), t) for t in order))
    assert await backend.value("SELECT observed_at FROM billing_subscriptions") == 139
    assert await backend.value("SELECT price_id FROM billing_subscriptions") == prices[139 % 3]
    assert await backend.tier(ada) == {"price_pro": "pro", "price_power": "power", "price_team": "team"}[prices[139 % 3]]


async def test_unknown_customers_are_ignored_and_our_metadata_links_them(backend):
    ada = await backend.add_user("ada@example.org")
    assert (await event(backend, "e1", state(customer="cus_x"), 100)).outcome is Outcome.IGNORED
    assert (await event(backend, "e2", state(customer="cus_y", hint="no-such-user"), 100)).outcome is Outcome.IGNORED
    assert await backend.count("billing_subscriptions") == 0
    assert (await event(backend, "e3", state(customer="cus_z", hint=ada), 100)).outcome is Outcome.APPLIED
    assert await backend.store.customer_of(ada) == "cus_z" and await backend.tier(ada) == "pro"
    # Our metadata wins for a customer this server has not seen, even if the account has another.
    assert (await event(backend, "e6", state("sub_2", customer="cus_other", hint=ada, price="price_team"), 100)).outcome \
        is Outcome.APPLIED
    assert await backend.tier(ada) == "team" and await backend.store.customer_of(ada) == "cus_z"
    # checkout.session.completed's link alone
    bob = await backend.add_user("bob@example.org")
    assert (await event(backend, "e4", None, 100, link=("cus_b", bob))).outcome is Outcome.APPLIED
    assert await backend.store.customer_of(bob) == "cus_b"
    assert (await event(backend, "e5", None, 100, ignore="not ours")).outcome is Outcome.IGNORED


async def test_past_due_keeps_the_tier_for_the_grace_from_when_it_began(backend):
    ada = await backend.add_user("ada@example.org")
    await backend.store.save_customer(ada, "cus_1", 1)
    await event(backend, "e1", state(), 100)
    await event(backend, "e2", state(status="past_due"), 200, now=200)
    await event(backend, "e3", state(status="past_due"), 3000, now=3000)  # a retry failed too
    (sub,) = await backend.store.subscriptions_of(ada)
    assert sub.past_due_since == 200 and POLICY.grace_until(sub) == 200 + 3600
    assert await backend.store.repair_tiers(3799, "grace") == [] and await backend.tier(ada) == "pro"
    (change,) = await backend.store.repair_tiers(3800, "grace")
    assert (change.email, change.old, change.new) == ("ada@example.org", "pro", "free")
    await event(backend, "e4", state(status="active"), 4000, now=4000)
    assert await backend.tier(ada) == "pro"
    (sub,) = await backend.store.subscriptions_of(ada)
    assert sub.past_due_since is None


async def test_a_complete_listing_ends_subscriptions_stripe_no_longer_has(backend):
    ada, bob = await backend.add_user("ada@example.org"), await backend.add_user("bob@example.org")
    await backend.store.save_customer(ada, "cus_a", 1)
    await backend.store.save_customer(bob, "cus_b", 1)
    await event(backend, "e1", state("sub_a", "cus_a"), 100)
    await event(backend, "e2", state("sub_b", "cus_b", price="price_team"), 100)
    await backend.add_user("cy@example.org", tier="power")  # never subscribed: left alone
    result = await backend.store.apply_observed([state("sub_b", "cus_b", price="price_power"),
                                                 state("sub_c", "cus_c")], 500, 500, complete=True, reason="reconcile")
    assert sorted((c.email, c.old, c.new) for c in result.changes) == [("ada@example.org", "pro", "free"),
                                                                       ("bob@example.org", "team", "power")]
    assert (result.updated, result.unknown) == (2, 1)
    assert await backend.value("SELECT status FROM billing_subscriptions WHERE subscription_id = ?", "sub_a") == "canceled"
    again = await backend.store.apply_observed([state("sub_b", "cus_b", price="price_power")], 600, 600,
                                               complete=True, reason="reconcile")
    assert (again.changes, again.updated) == ([], 0)


async def test_a_job_is_claimed_once_per_period(backend):
    claims = await asyncio.gather(*(backend.store.claim_job("reconcile", 10_000, 3600) for _ in range(10)))
    assert claims.count(True) == 1
    assert not await backend.store.claim_job("reconcile", 10_000 + 3599, 3600)
    assert await backend.store.claim_job("reconcile", 10_000 + 3600, 3600)
    assert await backend.store.claim_job("other", 10_000, 3600)


async def test_the_webhook_log_and_its_pruning(backend):
    first = await backend.store.log_delivery(100, "evt_1", "invoice.paid", {"Stripe-Signature": "t=1,v1=x"}, b'{"id": 1}')
    second = await backend.store.log_delivery(200, None, None, {}, b"\x00\xff")
    assert second > first
    await backend.store.finish_delivery(first, Outcome.ERROR, "Stripe down")
    assert await backend.value("SELECT outcome FROM billing_webhook_log WHERE id = ?", first) == "error"
    assert await backend.value("SELECT outcome FROM billing_webhook_log WHERE id = ?", second) == "received"
    assert bytes(await backend.value("SELECT body FROM billing_webhook_log WHERE id = ?", second)) == b"\x00\xff"
    assert await backend.store.prune_log(150) == 1
    assert await backend.count("billing_webhook_log") == 1
