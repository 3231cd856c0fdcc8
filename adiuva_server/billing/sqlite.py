"""The billing store on SQLite (migration 0011). Every write is one BEGIN IMMEDIATE transaction
on the single writer, so concurrent deliveries of one event serialise and the event id's primary
key lets exactly one of them apply."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from adiuva_server.billing.policy import Policy, StoredSubscription, SubscriptionState, TierChange, supersedes
from adiuva_server.billing.store import Applied, EventEffects, Outcome, Reconciled
from adiuva_server.db import Database

_SUB_COLUMNS = ("subscription_id, user_id, customer_id, status, price_id, current_period_end, cancel_at_period_end, "
                "past_due_since, observed_at")
# Transactions of a reconcile stay short: this many subscriptions each.
RECONCILE_CHUNK = 200


def _sub(row: Any) -> StoredSubscription:
    return StoredSubscription(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8])


class SQLiteBillingStore:
    def __init__(self, db: Database, policy: Policy) -> None:
        self.db = db
        self.policy = policy

    # -- reads ------------------------------------------------------------------------------

    async def customer_of(self, user_id: str) -> str | None:
        row = await self.db.fetchone("SELECT customer_id FROM billing_customers WHERE user_id = ?", (user_id,))
        return row[0] if row else None

    async def subscriptions_of(self, user_id: str) -> list[StoredSubscription]:
        rows = await self.db.fetchall(
            f"SELECT {_SUB_COLUMNS} FROM billing_subscriptions WHERE user_id = ? ORDER BY observed_at DESC", (user_id,))
        return [_sub(r) for r in rows]

    async def event_seen(self, event_id: str) -> bool:
        return await self.db.fetchone("SELECT 1 FROM billing_events WHERE event_id = ?", (event_id,)) is not None

    # -- customers --------------------------------------------------------------------------

    async def save_customer(self, user_id: str, customer_id: str, now: int) -> str:
        async with self.db.write() as conn:
            await conn.execute("INSERT INTO billing_customers (user_id, customer_id, created_at) VALUES (?, ?, ?) "
                               "ON CONFLICT DO NOTHING", (user_id, customer_id, now))
            async with conn.execute("SELECT customer_id FROM billing_customers WHERE user_id = ?", (user_id,)) as cur:
                row = await cur.fetchone()
        if row is None:  # the customer id is another account's (cannot happen with our keys)
            raise LookupError(f"customer {customer_id} belongs to another account")
        return row[0]

    # -- the webhook log --------------------------------------------------------------------

    async def log_delivery(self, now: int, event_id: str | None, event_type: str | None,
                           headers: Mapping[str, str], body: bytes) -> int:
        async with self.db.write() as conn:
            cur = await conn.execute(
                "INSERT INTO billing_webhook_log (received_at, event_id, event_type, headers, body) VALUES (?, ?, ?, ?, ?)",
                (now, event_id, event_type, json.dumps(dict(headers), sort_keys=True), body))
            return cur.lastrowid

    async def finish_delivery(self, log_id: int, outcome: Outcome, detail: str) -> None:
        await self.db.execute_write("UPDATE billing_webhook_log SET outcome = ?, detail = ? WHERE id = ?",
                                    (outcome.value, detail, log_id))

    async def prune_log(self, before: int) -> int:
        return await self.db.execute_write("DELETE FROM billing_webhook_log WHERE received_at < ?", (before,))

    # -- events -----------------------------------------------------------------------------

    async def apply_event(self, log_id: int, event_id: str, event_type: str, created: int, now: int,
                          effects: EventEffects) -> Applied:
        async with self.db.write() as conn:
            cur = await conn.execute(
                "INSERT INTO billing_events (event_id, type, created, processed_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING", (event_id, event_type, created, now))
            if cur.rowcount == 0:
                result = Applied(Outcome.DUPLICATE, "this event was applied before")
            else:
                result = await self._apply_effects(conn, effects, now, f"{event_type} {event_id}")
            await conn.execute("UPDATE billing_webhook_log SET outcome = ?, detail = ? WHERE id = ?",
                               (result.outcome.value, result.detail, log_id))
        return result

    async def _apply_effects(self, conn: Any, effects: EventEffects, now: int, reason: str) -> Applied:
        if effects.ignore:
            return Applied(Outcome.IGNORED, effects.ignore)
        if effects.done:
            return Applied(Outcome.APPLIED, effects.done)
        if effects.link is not None:
            customer_id, user_id = effects.link
            if await self._user_exists(conn, user_id):
                await conn.execute("INSERT INTO billing_customers (user_id, customer_id, created_at) VALUES (?, ?, ?) "
                                   "ON CONFLICT DO NOTHING", (user_id, customer_id, now))
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

    async def _user_exists(self, conn: Any, user_id: str) -> bool:
        async with conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)) as cur:
            return await cur.fetchone() is not None

    async def _owner(self, conn: Any, state: SubscriptionState, now: int) -> str | None:
        """Whose subscription this is: its stored row, else its customer's account, else the user
        id our checkout put in its metadata (then that customer is linked to the account)."""
        async with conn.execute("SELECT user_id FROM billing_customers WHERE customer_id = ?",
                                (state.customer_id,)) as cur:
            row = await cur.fetchone()
        if row is not None:
            return row[0]
        if state.user_hint and await self._user_exists(conn, state.user_hint):
            await conn.execute("INSERT INTO billing_customers (user_id, customer_id, created_at) VALUES (?, ?, ?) "
                               "ON CONFLICT DO NOTHING", (state.user_hint, state.customer_id, now))
            return state.user_hint
        return None

    async def _apply_state(self, conn: Any, state: SubscriptionState, observed_at: int,
                           now: int) -> tuple[Outcome, str | None, bool]:
        """(outcome, owner, whether the stored status, price or period moved)."""
        async with conn.execute(f"SELECT {_SUB_COLUMNS} FROM billing_subscriptions WHERE subscription_id = ?",
                                (state.id,)) as cur:
            row = await cur.fetchone()
        old = _sub(row) if row else None
        if old is not None and not supersedes(state.status, observed_at, old.status, old.observed_at):
            return Outcome.STALE, old.user_id, False
        user_id = old.user_id if old is not None else await self._owner(conn, state, now)
        if user_id is None:
            return Outcome.IGNORED, None, False
        # The grace of past_due runs from when it became past_due, not from each retry's event.
        past_due_since = None
        if state.status == "past_due":
            past_due_since = old.past_due_since if old and old.status == "past_due" and old.past_due_since else observed_at
        await conn.execute(
            f"INSERT INTO billing_subscriptions ({_SUB_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (subscription_id) DO UPDATE SET status = excluded.status, price_id = excluded.price_id, "
            "current_period_end = excluded.current_period_end, cancel_at_period_end = excluded.cancel_at_period_end, "
            "past_due_since = excluded.past_due_since, observed_at = excluded.observed_at, updated_at = excluded.updated_at",
            (state.id, user_id, state.customer_id, state.status, state.price_id, state.current_period_end,
             int(state.cancel_at_period_end), past_due_since, observed_at, now))
        moved = old is None or (old.status, old.price_id, old.current_period_end, old.cancel_at_period_end) != (
            state.status, state.price_id, state.current_period_end, state.cancel_at_period_end)
        return Outcome.APPLIED, user_id, moved

    async def _retier(self, conn: Any, user_id: str, now: int, reason: str) -> TierChange | None:
        async with conn.execute(f"SELECT {_SUB_COLUMNS} FROM billing_subscriptions WHERE user_id = ?", (user_id,)) as cur:
            subs = [_sub(r) for r in await cur.fetchall()]
        tier = self.policy.tier(subs, now)
        async with conn.execute("SELECT email, tier FROM users WHERE id = ?", (user_id,)) as cur:
            row = await cur.fetchone()
        if row is None or row[1] == tier:
            return None
        await conn.execute("UPDATE users SET tier = ? WHERE id = ?", (tier, user_id))
        return TierChange(user_id, row[0], row[1], tier, reason)

    # -- reconciliation ---------------------------------------------------------------------

    async def apply_observed(self, states: Sequence[SubscriptionState], observed_at: int, now: int, *,
                             complete: bool, reason: str) -> Reconciled:
        updated = unknown = 0
        for start in range(0, len(states), RECONCILE_CHUNK):
            async with self.db.write() as conn:
                for state in states[start:start + RECONCILE_CHUNK]:
                    outcome, _, moved = await self._apply_state(conn, state, observed_at, now)
                    updated += moved
                    if outcome is Outcome.IGNORED:
                        unknown += 1
        if complete:
            listed = {s.id for s in states}
            rows = await self.db.fetchall(
                f"SELECT {_SUB_COLUMNS} FROM billing_subscriptions WHERE status NOT IN ('canceled', 'incomplete_expired')")
            gone = [_sub(r) for r in rows if r[0] not in listed]
            if gone:
                async with self.db.write() as conn:
                    for sub in gone:
                        # Stripe no longer has it: it grants nothing. Only if nothing newer came meanwhile.
                        cur = await conn.execute(
                            "UPDATE billing_subscriptions SET status = 'canceled', past_due_since = NULL, "
                            "observed_at = ?, updated_at = ? WHERE subscription_id = ? AND observed_at < ?",
                            (observed_at, now, sub.id, observed_at))
                        updated += cur.rowcount
        changes = await self.repair_tiers(now, reason)
        return Reconciled(changes, updated, unknown)

    async def repair_tiers(self, now: int, reason: str) -> list[TierChange]:
        rows = await self.db.fetchall("SELECT DISTINCT user_id FROM billing_subscriptions")
        changes: list[TierChange] = []
        users = [r[0] for r in rows]
        for start in range(0, len(users), RECONCILE_CHUNK):
            async with self.db.write() as conn:
                for user_id in users[start:start + RECONCILE_CHUNK]:
                    change = await self._retier(conn, user_id, now, reason)
                    if change is not None:
                        changes.append(change)
        return changes

    # -- jobs -------------------------------------------------------------------------------

    async def claim_job(self, name: str, now: int, period: float) -> bool:
        # One atomic upsert: of two processes that claim at once, only one changes the row.
        changed = await self.db.execute_write(
            "INSERT INTO billing_job_runs (name, last_started) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_started = excluded.last_started "
            "WHERE billing_job_runs.last_started <= ?", (name, now, now - period))
        return changed > 0
