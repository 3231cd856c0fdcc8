"""What a Stripe subscription is worth, as pure functions (no I/O): the status allow-list, the
tier of each price, the past_due grace, and the rule that an older state never replaces a newer.
The stores call these inside their transactions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from adiuva_server.config import Settings

FREE = "free"
TIER_ORDER = ("free", "pro", "power", "team")
GRANTING = frozenset({"active", "trialing"})
PAST_DUE = "past_due"
# Ended for good: a new checkout may start; they grant nothing.
ENDED = frozenset({"canceled", "incomplete_expired"})
# Any status not in GRANTING or PAST_DUE grants nothing (unpaid, canceled, incomplete_expired,
# and whatever Stripe adds next: incomplete, paused, ...).

# Two states with the same time (Stripe's `created` has one-second resolution: a subscription's
# `created` and its first `updated` often share a second): the one further along its life wins.
_LIFECYCLE = {"incomplete": 0, "trialing": 1, "active": 1, "past_due": 2, "unpaid": 3, "paused": 3,
              "canceled": 4, "incomplete_expired": 4}


@dataclass(frozen=True, slots=True)
class SubscriptionState:
    """A subscription as Stripe describes it (an event's payload or a fetched object)."""

    id: str
    customer_id: str
    status: str
    price_id: str | None
    current_period_end: int | None
    cancel_at_period_end: bool
    user_hint: str | None  # metadata.user_id, set by our checkout

    @classmethod
    def from_stripe(cls, obj: Mapping[str, Any]) -> SubscriptionState:
        """Raises ValueError when the object is not a subscription we can read."""
        sub_id, customer, status = obj.get("id"), obj.get("customer"), obj.get("status")
        if isinstance(customer, Mapping):  # expanded
            customer = customer.get("id")
        if not all(isinstance(v, str) and v for v in (sub_id, customer, status)):
            raise ValueError("a subscription needs string id, customer and status")
        items = ((obj.get("items") or {}).get("data") or [])
        first = items[0] if items and isinstance(items[0], Mapping) else {}
        price = first.get("price") or {}
        price_id = price.get("id") if isinstance(price, Mapping) else price if isinstance(price, str) else None
        # Newer API versions keep the period on the item, older ones on the subscription.
        period_end = obj.get("current_period_end") or first.get("current_period_end")
        metadata = obj.get("metadata") or {}
        hint = metadata.get("user_id") if isinstance(metadata, Mapping) else None
        return cls(sub_id, customer, status, price_id if isinstance(price_id, str) else None,
                   int(period_end) if isinstance(period_end, (int, float)) else None,
                   bool(obj.get("cancel_at_period_end")), hint if isinstance(hint, str) else None)


@dataclass(frozen=True, slots=True)
class StoredSubscription:
    id: str
    user_id: str
    customer_id: str
    status: str
    price_id: str | None
    current_period_end: int | None
    cancel_at_period_end: bool
    past_due_since: int | None
    observed_at: int


@dataclass(frozen=True, slots=True)
class TierChange:
    user_id: str
    email: str
    old: str
    new: str
    reason: str


class Policy:
    def __init__(self, prices: Mapping[str, str], past_due_grace: float) -> None:
        self.tier_of_price = {price: tier for tier, price in prices.items()}
        self.price_of_tier = dict(prices)
        self.past_due_grace = past_due_grace

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls({"pro": settings.stripe_price_pro, "power": settings.stripe_price_power,
                    "team": settings.stripe_price_team}, settings.billing_past_due_grace)

    def plan(self, price_id: str | None) -> str | None:
        """The paid tier a price buys; None for a price that is not ours."""
        return self.tier_of_price.get(price_id) if price_id else None

    def grace_until(self, sub: StoredSubscription) -> int | None:
        if sub.status != PAST_DUE or sub.past_due_since is None:
            return None
        return int(sub.past_due_since + self.past_due_grace)

    def granted(self, sub: StoredSubscription, now: float) -> str:
        """The tier this subscription grants now (free when it grants nothing)."""
        plan = self.plan(sub.price_id)
        if plan is None:
            return FREE
        if sub.status in GRANTING:
            return plan
        if sub.status == PAST_DUE:
            until = self.grace_until(sub)
            return plan if until is not None and now < until else FREE
        return FREE

    def tier(self, subs: Iterable[StoredSubscription], now: float) -> str:
        """The best tier any of a user's subscriptions grants."""
        return max((self.granted(s, now) for s in subs), key=TIER_ORDER.index, default=FREE)


def is_live(status: str) -> bool:
    """A subscription that still exists at Stripe (a second checkout would make a second one)."""
    return status not in ENDED


def supersedes(new_status: str, new_time: int, old_status: str, old_time: int) -> bool:
    """Whether a state observed at `new_time` may replace the stored one: never an older one."""
    if new_time != old_time:
        return new_time > old_time
    return _LIFECYCLE.get(new_status, 0) >= _LIFECYCLE.get(old_status, 0)
