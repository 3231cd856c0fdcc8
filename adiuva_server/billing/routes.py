"""HTTP routes of billing (licensed mode; DESIGN "Billing"): thin, they check that billing runs
here, call the service, shape the answer. In homelab mode every one answers 404
`billing_not_enabled`."""

from __future__ import annotations

from aiohttp import web

from adiuva_server import errors
from adiuva_server.billing import mode
from adiuva_server.billing.models import (
    CheckoutRequest, CheckoutResponse, PortalResponse, SubscriptionInfo, SubscriptionOut, WebhookAck,
)
from adiuva_server.billing.service import WEBHOOK_MAX_BYTES, BillingService, SubscriptionView
from adiuva_server.http.auth import principal
from adiuva_server.http.bodies import read_body
from adiuva_server.http.routing import JSON, Api
from adiuva_server.keys import AUTH, BILLING, LICENSE

api = Api("billing")


def billing(request: web.Request) -> BillingService:
    if not mode.billing_enabled(request.app[LICENSE]):
        raise errors.BillingNotEnabled("this server runs without billing (homelab mode); tiers are set by its admin")
    return request.app[BILLING]


def _info(view: SubscriptionView) -> SubscriptionInfo:
    s = view.subscription
    out = None if s is None else SubscriptionOut(
        id=s.id, status=s.status, plan=view.plan, current_period_end=s.current_period_end,
        cancel_at_period_end=s.cancel_at_period_end, grace_until=view.grace_until)
    return SubscriptionInfo(tier=view.tier, subscription=out)


@api.post(
    "/billing/checkout", summary="Start a Stripe Checkout for a paid tier", body=CheckoutRequest,
    response=CheckoutResponse, errors=(401, 403, 404, 409, 422, 429, 503),
)
async def checkout(request: web.Request, body: CheckoutRequest) -> CheckoutResponse:
    service, who = billing(request), principal(request)
    return CheckoutResponse(checkout_url=await service.checkout(who.id, who.email, body.tier))


@api.get("/billing/subscription", summary="The account's tier and subscription", response=SubscriptionInfo,
         errors=(401, 404, 429))
async def get_subscription(request: web.Request) -> SubscriptionInfo:
    service, who = billing(request), principal(request)
    return _info(await service.subscription(who.id, who.tier))


@api.delete(
    "/billing/subscription", summary="Cancel the subscription now (back to the free tier)",
    response=SubscriptionInfo, errors=(401, 404, 429, 503),
)
async def cancel_subscription(request: web.Request) -> SubscriptionInfo:
    service, who = billing(request), principal(request)
    await service.cancel(who.id)
    user = await request.app[AUTH].store.get_by_id(who.id)
    return _info(await service.subscription(who.id, user.tier if user else who.tier))


@api.post("/billing/portal", summary="Open Stripe's customer portal (plan changes, cards)",
          response=PortalResponse, errors=(401, 404, 429, 503))
async def portal(request: web.Request) -> PortalResponse:
    service, who = billing(request), principal(request)
    return PortalResponse(portal_url=await service.portal(who.id, who.email))


@api.post(
    "/billing/webhook", summary="Stripe's webhook deliveries (signed; no bearer token)", auth=False,
    read_body=False, raw_body={JSON: "the event exactly as Stripe sent it"}, response=WebhookAck,
    request_headers={"Stripe-Signature": "t=<unix time>,v1=<HMAC-SHA256 of '<t>.<body>'>"},
    errors=(400, 404, 413, 503),
)
async def webhook(request: web.Request) -> WebhookAck:
    # Subscriptions and plugin purchases (licensed marketplace) share this one endpoint.
    service = request.app[BILLING]
    if not (mode.billing_enabled(request.app[LICENSE]) or request.app[LICENSE].allows("marketplace")):
        billing(request)  # the 404 billing_not_enabled
    body = await read_body(request, WEBHOOK_MAX_BYTES)  # raw: the signature is over these bytes
    result = await service.webhook(body, request.headers)
    return WebhookAck(outcome=result.outcome.value)
