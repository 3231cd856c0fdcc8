"""The billing store's interface: customers, subscriptions, applied events and the webhook log.

Implementations own their transactions and invariants: one customer per account (unique on both
sides), an event's id recorded in the same transaction as its effects (a replay or a concurrent
duplicate changes nothing), an older subscription state never replacing a newer one
(`policy.supersedes`), and a user's tier recomputed from their subscriptions in that same
transaction. No method awaits network I/O inside a transaction: callers fetch from Stripe first.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from adiuva_server.billing.policy import StoredSubscription, SubscriptionState, TierChange


class Outcome(str, enum.Enum):
    RECEIVED = "received"  # logged, not processed (yet, or the process died meanwhile)
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # its id was applied before: nothing changed
    STALE = "stale"  # older than the state already applied: nothing changed
    IGNORED = "ignored"  # not an event we act on, or about a customer that is not ours
    ERROR = "error"  # could not be processed (Stripe unreachable): not recorded, Stripe retries


@dataclass(frozen=True, slots=True)
class Applied:
    outcome: Outcome
    detail: str = ""
    changes: tuple[TierChange, ...] = ()


@dataclass(frozen=True, slots=True)
class EventEffects:
    """What one event asks for, worked out before the transaction (fetches from Stripe done)."""

    link: tuple[str, str] | None = None  # (customer_id, user_id) from a completed checkout
    state: SubscriptionState | None = None
    observed_at: int = 0  # the time `state` describes
    ignore: str = ""  # non-empty: record the event, change nothing, say why
    done: str = ""  # non-empty: applied already by its own (idempotent) store, e.g. a plugin payment


@dataclass(frozen=True, slots=True)
class Reconciled:
    changes: list[TierChange] = field(default_factory=list)
    updated: int = 0  # subscriptions whose stored state moved
    unknown: int = 0  # listed subscriptions of customers that are not ours


class BillingStore(Protocol):
    async def customer_of(self, user_id: str) -> str | None: ...

    async def save_customer(self, user_id: str, customer_id: str, now: int) -> str:
        """Record the account's customer unless it has one; return the one it has (first wins)."""

    async def subscriptions_of(self, user_id: str) -> list[StoredSubscription]: ...

    async def event_seen(self, event_id: str) -> bool:
        """A shortcut for replays (no Stripe fetch for them); `apply_event` is the guarantee."""

    async def log_delivery(self, now: int, event_id: str | None, event_type: str | None,
                           headers: Mapping[str, str], body: bytes) -> int:
        """Record a signed delivery before it is processed; returns its log id."""

    async def finish_delivery(self, log_id: int, outcome: Outcome, detail: str) -> None: ...

    async def apply_event(self, log_id: int, event_id: str, event_type: str, created: int, now: int,
                          effects: EventEffects) -> Applied:
        """In one transaction: record the event id (DUPLICATE if it is there already), apply its
        effects, recompute the user's tier, write the outcome into the log."""

    async def apply_observed(self, states: Sequence[SubscriptionState], observed_at: int, now: int, *,
                             complete: bool, reason: str) -> Reconciled:
        """States read from Stripe at `observed_at` (a listing, a cancel's answer). `complete`:
        `states` is every subscription Stripe has, so a stored live one missing from it ended."""

    async def repair_tiers(self, now: int, reason: str) -> list[TierChange]:
        """Recompute the tier of every user with a subscription (past_due grace expiry, drift)."""

    async def claim_job(self, name: str, now: int, period: float) -> bool:
        """True for exactly one caller per `period` across every process on this store."""

    async def prune_log(self, before: int) -> int: ...
