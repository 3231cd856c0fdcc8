"""The billing store on PostgreSQL (migration postgres/0004), for many server processes at once.

READ COMMITTED transactions keep the invariants with the statements themselves: the event id's
primary key (`INSERT ... ON CONFLICT DO NOTHING RETURNING`: of concurrent duplicates, the later
ones wait for the first and then insert nothing), the customer's unique keys, and the user's row
locked (`SELECT ... FOR UPDATE`) before any of their subscriptions or their tier is read and
changed, so the ordering rule and the tier are decided on a state nobody else is changing.
Deadlocks between a reconcile and a delivery are retried by the façade (no side effects here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from adiuva_server.billing.policy import Policy, StoredSubscription, SubscriptionState, TierChange, supersedes
from adiuva_server.billing.store import Applied, EventEffects, Outcome, Reconciled
from adiuva_server.db.postgres import PgDatabase

_SUB_COLUMNS = ("subscription_id, user_id, customer_id, status, price_id, current_period_end, cancel_at_period_end, "
                "past_due_since, observed_at")
RECONCILE_CHUNK = 200


def _sub(row: Any) -> StoredSubscription:
    return StoredSubscription(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8])


def _count(status: str) -> int:
    """Rows affected, from asyncpg's command tag ("INSERT 0 1", "UPDATE 3", "DELETE 0")."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresBillingStore:
    def __init__(self, db: PgDatabase, policy: Policy) -> None:
        self.db = db
        self.policy = policy

    # -- reads ------------------------------------------------------------------------------

    async def customer_of(self, user_id: str) -> str | None:
        return await self.db.fetchval("SELECT customer_id FROM billing_customers WHERE user_id = $1", user_id)

    async def subscriptions_of(self, user_id: str) -> list[StoredSubscription]:
        rows = await self.db.fetch(
            f"SELECT {_SUB_COLUMNS} FROM billing_subscriptions WHERE user_id = $1 ORDER BY observed_at DESC", user_id)
        return [_sub(r) for r in rows]

    async def event_seen(self, event_id: str) -> bool:
        return await self.db.fetchval("SELECT 1 FROM billing_events WHERE event_id = $1", event_id) is not None

    # -- customers --------------------------------------------------------------------------

    async def save_customer(self, user_id: str, customer_id: str, now: int) -> str:
        async def go(conn: Any) -> str | None:
            await conn.execute("INSERT INTO billing_customers (user_id, customer_id, created_at) VALUES ($1, $2, $3) "
                               "ON CONFLICT DO NOTHING", user_id, customer_id, now)
            # READ COMMITTED: this statement sees a concurrent inserter's committed row.
            return await conn.fetchval("SELECT customer_id FROM billing_customers WHERE user_id = $1", user_id)

        stored = await self.db.transaction(go)
        if stored is None:
            raise LookupError(f"customer {customer_id} belongs to another account")
        return stored

    # -- the webhook log --------------------------------------------------------------------

    async def log_delivery(self, now: int, event_id: str | None, event_type: str | None,
                           headers: Mapping[str, str], body: bytes) -> int:
        return await self.db.fetchval(
            "INSERT INTO billing_webhook_log (received_at, event_id, event_type, headers, body) "
            "VALUES ($1, $2, $3, $4, $5) RETURNING id",
            now, event_id, event_type, json.dumps(dict(headers), sort_keys=True), body)

    async def finish_delivery(self, log_id: int, outcome: Outcome, detail: str) -> None:
        await self.db.execute("UPDATE billing_webhook_log SET outcome = $1, detail = $2 WHERE id = $3",
                              outcome.value, detail, log_id)

    async def prune_log(self, before: int) -> int:
        return _count(await self.db.execute("DELETE FROM billing_webhook_log WHERE received_at < $1", before))

    # -- events -----------------------------------------------------------------------------

    async def apply_event(self, log_id: int, event_id: str, event_type: str, created: int, now: int,
                          effects: EventEffects) -> Applied:
        async def go(conn: Any) -> Applied:
            inserted = await conn.fetchval(
                "INSERT INTO billing_events (event_id, type, created, processed_at) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING RETURNING event_id", event_id, event_type, created, now)
            if inserted is None:
                result = Applied(Outcome.DUPLICATE, "this event was applied before")
            else:
                result = await self._apply_effects(conn, effects, now, f"{event_type} {event_id}")
            await conn.execute("UPDATE billing_webhook_log SET outcome = $1, detail = $2 WHERE id = $3",
                               result.outcome.value, result.detail, log_id)
            return result

        return await self.db.transaction(go)

    async def _apply_effects(self, conn: Any, effects: EventEffects, now: int, reason: str) -> Applied:
        if effects.ignore:
            return Applied(Outcome.IGNORED, effects.ignore)
        if effects.done:
            return Applied(Outcome.APPLIED, effects.done)
        if effects.link is not None:
            customer_id, user_id = effects.link
            await conn.execute(
                "INSERT INTO billing_customers (user_id, customer_id, created_at) "
                "SELECT $1, $2, $3 WHERE EXISTS (SELECT 1 FROM users WHERE id = $1) ON CONFLICT DO NOTHING",
                user_id, customer_id, now)
        if effects.state is None:
            return Applied(Outcome.APPLIED, "customer linked")
        outcome, user_id, _ = await self._apply_state(conn, effects.state, effects.observed_at, now)
        if outcome is not Outcome.APPLIED or user_id is None:
            detail = {Outcome.STALE: "older than the state already applied",
                      Outcome.IGNORED: "not a customer of this server"}.get(outcome, "")
            return Applied(outcome, detail)
        change = await self._retier(conn, user_id, now, reason)
        detail = f"{effects.state.id} {effects.state.status}" + (f"; tier {change.old} -> {change.new}" if change else "")
        return Applied(Outcome.APPLIED, detail, (change,) if change else ())

    async def _owner(self, conn: Any, state: SubscriptionState, now: int) -> str | None:
        owner = await conn.fetchval(
            "SELECT user_id FROM billing_subscriptions WHERE subscription_id = $1", state.id)
        if owner is None:
            owner = await conn.fetchval("SELECT user_id FROM billing_customers WHERE customer_id = $1",
                                        state.customer_id)
        if owner is None and state.user_hint and await conn.fetchval("SELECT 1 FROM users WHERE id = $1",
                                                                     state.user_hint):
            # The user id our checkout put in the metadata (signed by Stripe): link the customer.
            await conn.execute("INSERT INTO billing_customers (user_id, customer_id, created_at) VALUES ($1, $2, $3) "
                               "ON CONFLICT DO NOTHING", state.user_hint, state.customer_id, now)
            owner = await conn.fetchval("SELECT user_id FROM billing_customers WHERE customer_id = $1",
                                        state.customer_id) or state.user_hint
        return owner

    async def _apply_state(self, conn: Any, state: SubscriptionState, observed_at: int,
                           now: int) -> tuple[Outcome, str | None, bool]:
        user_id = await self._owner(conn, state, now)
        if user_id is None:
            return Outcome.IGNORED, None, False
        # Every change to a user's subscriptions and tier happens under their row's lock.
        if await conn.fetchval("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user_id) is None:
            return Outcome.IGNORED, None, False
        row = await conn.fetchrow(f"SELECT {_SUB_COLUMNS} FROM billing_subscriptions WHERE subscription_id = $1",
                                  state.id)
        old = _sub(row) if row else None
        if old is not None and not supersedes(state.status, observed_at, old.status, old.observed_at):
            return Outcome.STALE, old.user_id, False
        past_due_since = None
        if state.status == "past_due":
            past_due_since = old.past_due_since if old and old.status == "past_due" and old.past_due_since else observed_at
        await conn.execute(
            f"INSERT INTO billing_subscriptions ({_SUB_COLUMNS}, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            "ON CONFLICT (subscription_id) DO UPDATE SET status = excluded.status, price_id = excluded.price_id, "
            "current_period_end = excluded.current_period_end, cancel_at_period_end = excluded.cancel_at_period_end, "
            "past_due_since = excluded.past_due_since, observed_at = excluded.observed_at, updated_at = excluded.updated_at",
            state.id, user_id, state.customer_id, state.status, state.price_id, state.current_period_end,
            int(state.cancel_at_period_end), past_due_since, observed_at, now)
        moved = old is None or (old.status, old.price_id, old.current_period_end, old.cancel_at_period_end) != (
            state.status, state.price_id, state.current_period_end, state.cancel_at_period_end)
        return Outcome.APPLIED, user_id, moved

    async def _retier(self, conn: Any, user_id: str, now: int, reason: str) -> TierChange | None:
        row = await conn.fetchrow("SELECT email, tier FROM users WHERE id = $1 FOR UPDATE", user_id)
        if row is None:
            return None
        subs = [_sub(r) for r in await conn.fetch(
            f"SELECT {_SUB_COLUMNS} FROM billing_subscriptions WHERE user_id = $1", user_id)]
        tier = self.policy.tier(subs, now)
        if row["tier"] == tier:
            return None
        await conn.execute("UPDATE users SET tier = $1 WHERE id = $2", tier, user_id)
        return TierChange(user_id, row["email"], row["tier"], tier, reason)

    # -- reconciliation ---------------------------------------------------------------------

    async def apply_observed(self, states: Sequence[SubscriptionState], observed_at: int, now: int, *,
                             complete: bool, reason: str) -> Reconciled:
        updated = unknown = 0
        for start in range(0, len(states), RECONCILE_CHUNK):
            chunk = states[start:start + RECONCILE_CHUNK]

            async def go(conn: Any, chunk: Sequence[SubscriptionState] = chunk) -> tuple[int, int]:
                moved_n = unknown_n = 0
                for state in chunk:
                    outcome, _, moved = await self._apply_state(conn, state, observed_at, now)
                    moved_n += moved
                    unknown_n += outcome is Outcome.IGNORED
                return moved_n, unknown_n

            moved_n, unknown_n = await self.db.transaction(go)  # counted once, after any retry
            updated += moved_n
            unknown += unknown_n
        if complete:
            listed = [s.id for s in states]
            updated += _count(await self.db.execute(
                "UPDATE billing_subscriptions SET status = 'canceled', past_due_since = NULL, observed_at = $1, "
                "updated_at = $2 WHERE status NOT IN ('canceled', 'incomplete_expired') "
                "AND NOT (subscription_id = ANY($3::text[])) AND observed_at < $1", observed_at, now, listed))
        changes = await self.repair_tiers(now, reason)
        return Reconciled(changes, updated, unknown)

    async def repair_tiers(self, now: int, reason: str) -> list[TierChange]:
        users = [r[0] for r in await self.db.fetch("SELECT DISTINCT user_id FROM billing_subscriptions ORDER BY user_id")]
        changes: list[TierChange] = []
        for start in range(0, len(users), RECONCILE_CHUNK):
            chunk = users[start:start + RECONCILE_CHUNK]

            async def go(conn: Any, chunk: list[str] = chunk) -> list[TierChange]:
                found = [await self._retier(conn, user_id, now, reason) for user_id in chunk]
                return [c for c in found if c is not None]

            changes += await self.db.transaction(go)
        return changes

    # -- jobs -------------------------------------------------------------------------------

    async def claim_job(self, name: str, now: int, period: float) -> bool:
        # Of concurrent claimers the later ones wait on the row and then find the WHERE false.
        status = await self.db.execute(
            "INSERT INTO billing_job_runs (name, last_started) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET last_started = excluded.last_started "
            "WHERE billing_job_runs.last_started <= $3", name, now, int(now - period))
        return _count(status) > 0
