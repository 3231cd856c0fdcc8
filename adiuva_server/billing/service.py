"""Stripe billing: checkout, the subscription, cancel, the customer portal, webhooks and drift
repair. Stripe calls happen outside every database transaction; the store applies their results.

Ordering (Stripe does not order events): a state carried by an event counts as of the event's
`created`; a state we fetched from Stripe (for events that carry none, a listing, a cancel)
counts as of when we asked. The store never lets an older state replace a newer one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from adiuva_server import errors
from adiuva_server.billing import mode
from adiuva_server.billing.policy import Policy, StoredSubscription, SubscriptionState, TierChange, is_live
from adiuva_server.billing.store import Applied, BillingStore, EventEffects, Outcome, Reconciled
from adiuva_server.billing.stripe_api import StripeGateway, verify_signature
from adiuva_server.config import Settings
from adiuva_server.license.state import LicenseState

log = logging.getLogger(__name__)
SIGNATURE_TOLERANCE = 300  # seconds (Stripe's default): older signed deliveries are refused
WEBHOOK_MAX_BYTES = 512 * 1024
LOG_RETENTION_SECONDS = 90 * 86400
# The background job's period: past_due grace ends within this; reconcile keeps its own interval.
JOB_SECONDS = 3600.0
SUBSCRIPTION_EVENTS = ("customer.subscription.created", "customer.subscription.updated",
                       "customer.subscription.deleted")
# Events that name a subscription without carrying it: it is fetched from Stripe.
FETCHING_EVENTS = ("checkout.session.completed", "invoice.paid", "invoice.payment_failed")
HANDLED_EVENTS = SUBSCRIPTION_EVENTS + FETCHING_EVENTS
# Request headers kept in the webhook log (never Authorization or cookies).
LOGGED_HEADERS = ("Stripe-Signature", "User-Agent", "Content-Type", "Content-Length")


@dataclass(frozen=True, slots=True)
class SubscriptionView:
    tier: str
    subscription: StoredSubscription | None
    plan: str | None
    grace_until: int | None


class BillingService:
    def __init__(self, settings: Settings, store: BillingStore, gateway: StripeGateway | None,
                 license: LicenseState, clock: Callable[[], float] = time.time, payments: Any = None) -> None:
        self.settings = settings
        # The marketplace's `payment_event` (plugin purchases arrive on this same webhook).
        self.payments = payments
        self.license = license
        self.store = store
        self.gateway = gateway  # None: no STRIPE_SECRET_KEY (the stub)
        self.policy = Policy.from_settings(settings)
        self.clock = clock

    def now(self) -> int:
        return int(self.clock())

    def _stripe(self) -> StripeGateway:
        if self.gateway is None:
            raise errors.BillingNotConfigured(
                "this server has no Stripe key (STRIPE_SECRET_KEY), so nothing can be bought or changed here; "
                "ask its operator")
        return self.gateway

    # -- the signed-in user's routes -----------------------------------------------------------

    async def checkout(self, user_id: str, email: str, tier: str) -> str:
        mode.require_new_sales(self.license)
        stripe = self._stripe()
        customer = await self._customer(user_id, email)
        # Stripe is the truth, not our records (a webhook may be late or lost either way): it
        # happily starts a second subscription for a customer who has one.
        async for sub in stripe.subscriptions(customer):
            if is_live(str(sub.get("status"))):
                raise self._exists()
        base = self.settings.billing_return_url
        sep = "&" if "?" in base else "?"
        return await stripe.create_checkout(
            customer_id=customer, user_id=user_id, price=self.policy.price_of_tier[tier],
            success_url=f"{base}{sep}checkout=success&session_id={{CHECKOUT_SESSION_ID}}",
            cancel_url=f"{base}{sep}checkout=canceled", idempotency_key=f"adiuva-checkout-{uuid.uuid4()}")

    @staticmethod
    def _exists() -> errors.SubscriptionExists:
        return errors.SubscriptionExists(
            "this account already has a subscription; change its plan or card in the customer portal "
            "(POST /api/v1/billing/portal) instead of buying a second one")

    async def _customer(self, user_id: str, email: str) -> str:
        existing = await self.store.customer_of(user_id)
        if existing is not None:
            return existing
        created = await self._stripe().create_customer(user_id, email)
        return await self.store.save_customer(user_id, created, self.now())

    async def subscription(self, user_id: str, tier: str) -> SubscriptionView:
        subs = await self.store.subscriptions_of(user_id)
        current = next((s for s in subs if is_live(s.status)), subs[0] if subs else None)
        if current is None:
            return SubscriptionView(tier, None, None, None)
        return SubscriptionView(tier, current, self.policy.plan(current.price_id), self.policy.grace_until(current))

    async def cancel(self, user_id: str) -> list[TierChange]:
        """Cancel every live subscription of the account now, at Stripe, then here: back to free.
        Stripe's list is the truth (a webhook may be missing either way)."""
        stripe = self._stripe()
        known_live = any(is_live(s.status) for s in await self.store.subscriptions_of(user_id))
        customer = await self.store.customer_of(user_id)
        asked = self.now()
        states = [] if customer is None else _readable([s async for s in stripe.subscriptions(customer)])
        if not known_live and not any(is_live(s.status) for s in states):
            raise errors.NotFound("this account has no subscription to cancel")
        observed = [s for s in states if not is_live(s.status)]
        for sub in (s for s in states if is_live(s.status)):
            observed += _readable([await stripe.cancel_subscription(sub.id)])
        result = await self.store.apply_observed(observed, asked, self.now(), complete=False, reason="canceled by the user")
        return result.changes

    async def portal(self, user_id: str, email: str) -> str:
        stripe = self._stripe()
        customer = await self._customer(user_id, email)
        return await stripe.create_portal(customer_id=customer, return_url=self.settings.billing_return_url,
                                          idempotency_key=f"adiuva-portal-{uuid.uuid4()}")

    # -- webhooks --------------------------------------------------------------------------

    async def webhook(self, body: bytes, headers: Mapping[str, str]) -> Applied:
        secret = self.settings.stripe_webhook_secret
        if not secret:
            raise errors.BillingNotConfigured("this server has no STRIPE_WEBHOOK_SECRET, so it cannot check "
                                              "deliveries; nothing was processed")
        try:
            verify_signature(body, headers.get("Stripe-Signature"), secret, SIGNATURE_TOLERANCE)
        except errors.InvalidWebhookSignature as exc:
            # Not written to the database: forgeries must cost no disk. The log line is bounded.
            log.warning("billing webhook refused: %s", exc.detail[:200])
            raise
        event = _parse_event(body)
        log_id = await self.store.log_delivery(self.now(), event["id"], event["type"],
                                               {k: headers[k] for k in LOGGED_HEADERS if k in headers}, body)
        if await self.store.event_seen(event["id"]):  # a replay: no Stripe call for it
            await self.store.finish_delivery(log_id, Outcome.DUPLICATE, "this event was applied before")
            return Applied(Outcome.DUPLICATE, "this event was applied before")
        try:
            effects = await self._effects(event)
        except errors.PaymentProviderUnavailable as exc:
            # Not recorded as applied: answering 503 makes Stripe deliver it again later.
            await self.store.finish_delivery(log_id, Outcome.ERROR, exc.detail)
            raise
        result = await self.store.apply_event(log_id, event["id"], event["type"], event["created"], self.now(), effects)
        for change in result.changes:
            log.info("billing: %s tier %s -> %s (%s)", change.email, change.old, change.new, change.reason)
        return result

    async def _effects(self, event: dict[str, Any]) -> EventEffects:
        kind, obj = event["type"], event["data"]["object"]
        if self.payments is not None and (done := await self.payments.payment_event(kind, obj)) is not None:
            return EventEffects(done=done)
        if not mode.billing_enabled(self.license):
            return EventEffects(ignore="billing is not enabled on this server")
        if kind not in HANDLED_EVENTS:
            return EventEffects(ignore=f"{kind} is not an event this server acts on")
        if kind in SUBSCRIPTION_EVENTS:
            try:
                return EventEffects(state=SubscriptionState.from_stripe(obj), observed_at=event["created"])
            except ValueError as exc:
                return EventEffects(ignore=f"unreadable subscription: {exc}")
        link = None
        if kind == "checkout.session.completed":
            if obj.get("mode") != "subscription":
                return EventEffects(ignore="not a subscription checkout")
            customer, user = obj.get("customer"), obj.get("client_reference_id")
            if isinstance(customer, str) and isinstance(user, str):
                link = (customer, user)
            subscription_id = obj.get("subscription")
        else:  # invoices: the subscription moved to `subscription_details` in newer API versions
            parent = obj.get("parent")
            details = parent.get("subscription_details") if isinstance(parent, dict) else None
            subscription_id = obj.get("subscription") or (details.get("subscription") if isinstance(details, dict) else None)
        if isinstance(subscription_id, dict):
            subscription_id = subscription_id.get("id")
        if not isinstance(subscription_id, str) or not subscription_id:
            return EventEffects(link=link, ignore="" if link else "names no subscription")
        asked = self.now()
        fetched = await self._stripe().retrieve_subscription(subscription_id)
        try:
            return EventEffects(link=link, state=SubscriptionState.from_stripe(fetched), observed_at=asked)
        except ValueError as exc:
            return EventEffects(link=link, ignore=f"unreadable subscription: {exc}")

    # -- drift repair ----------------------------------------------------------------------

    async def reconcile(self) -> Reconciled:
        """Read every subscription from Stripe and repair every stored state and tier that
        disagrees (missed webhooks); also ends past_due grace periods that have run out."""
        stripe = self._stripe()
        asked = self.now()
        states = _readable([obj async for obj in stripe.subscriptions()])
        result = await self.store.apply_observed(states, asked, self.now(), complete=True, reason="reconcile")
        for change in result.changes:
            log.info("billing reconcile: %s tier %s -> %s", change.email, change.old, change.new)
        return result

    async def expire_grace(self) -> list[TierChange]:
        """Local only (no Stripe): tiers whose past_due grace has run out go back to free."""
        return await self.store.repair_tiers(self.now(), "past_due grace ended")

    async def run_jobs(self) -> None:
        """The periodic work: grace expiry every time; reconcile and log pruning once per
        interval across every server process (claimed in the store)."""
        if not mode.billing_enabled(self.license):
            return
        await self.expire_grace()
        interval = self.settings.billing_reconcile_interval
        if interval and self.gateway is not None and await self.store.claim_job("reconcile", self.now(), interval):
            await self.reconcile()
            await self.store.prune_log(self.now() - LOG_RETENTION_SECONDS)


@contextlib.asynccontextmanager
async def stripe_gateway(settings: Settings) -> AsyncIterator[StripeGateway | None]:
    """The Stripe client of a server or a command, on an HTTP session of its own; None without
    STRIPE_SECRET_KEY (the stub). The session opens no connection until the first call."""
    if settings.stripe_secret_key or settings.stripe_webhook_secret:
        import stripe  # noqa: F401  (~0.3 s: at start, not in the first request's event loop turn)
    if not settings.stripe_secret_key:
        yield None
        return
    async with aiohttp.ClientSession() as session:
        yield StripeGateway(settings.stripe_secret_key, settings.stripe_api_base, session)


def _readable(objects: list[dict[str, Any]]) -> list[SubscriptionState]:
    states = []
    for obj in objects:
        try:
            states.append(SubscriptionState.from_stripe(obj))
        except ValueError:
            log.warning("billing: skipped an unreadable subscription from Stripe (%r)", obj.get("id"))
    return states


def _parse_event(body: bytes) -> dict[str, Any]:
    """A signed body is Stripe's; still, only the shape we rely on is accepted."""
    try:
        event = json.loads(body)
    except ValueError:
        raise errors.MalformedRequest("the event is not JSON") from None
    if not (isinstance(event, dict) and isinstance(event.get("id"), str) and isinstance(event.get("type"), str)
            and isinstance(event.get("created"), int) and isinstance(event.get("data"), dict)
            and isinstance(event["data"].get("object"), dict)):
        raise errors.MalformedRequest("the event needs an id, a type, created and data.object")
    return event

