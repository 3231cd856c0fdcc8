"""The parts of Stripe's API billing uses, through the real `stripe` library.

A `StripeClient` (no module-level `stripe.api_key`: each client carries its own key and base
URL) on the library's own aiohttp transport, sharing one `aiohttp.ClientSession` with the
server, so calls run on the event loop without a thread. Every POST carries an idempotency key
we choose (the library retries network failures with the same key). Results come back as plain
dicts; every failure becomes `PaymentProviderUnavailable` with a detail that names no secret.
`stripe` is imported only when used (~0.3 s here): a homelab server never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from adiuva_server import errors

log = logging.getLogger(__name__)
TIMEOUT_SECONDS = 20.0
PAGE = 100


def _plain(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


class StripeGateway:
    def __init__(self, secret_key: str, api_base: str, session: aiohttp.ClientSession) -> None:
        import stripe

        self._error = stripe.StripeError
        transport = stripe.AIOHTTPClient(session=session, timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS))
        self.client = stripe.StripeClient(secret_key, base_addresses={"api": api_base}, http_client=transport,
                                          max_network_retries=2)

    async def _call(self, what: str, coro: Any, *, missing: str | None = None) -> Any:
        try:
            return await coro
        except self._error as exc:
            if missing is not None and exc.http_status == 404:
                raise errors.NotFound(missing) from None
            # The library's messages mask keys; still, only the kind of failure is logged.
            log.warning("Stripe %s failed: %s (HTTP %s, code %s)", what, type(exc).__name__, exc.http_status, exc.code)
            raise errors.PaymentProviderUnavailable(
                f"Stripe could not {what} ({type(exc).__name__}); try again later") from None

    async def create_customer(self, user_id: str, email: str) -> str:
        # The key is the account's: concurrent first checkouts of one account get one customer.
        customer = await self._call("create the customer", self.client.v1.customers.create_async(
            {"email": email, "metadata": {"user_id": user_id}},
            {"idempotency_key": f"adiuva-customer-{user_id}"}))
        return customer.id

    async def subscriptions(self, customer_id: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every subscription (of one customer, or all), whatever its status, page by page."""
        params: dict[str, Any] = {"status": "all", "limit": PAGE}
        if customer_id is not None:
            params["customer"] = customer_id
        while True:
            page = await self._call("list subscriptions", self.client.v1.subscriptions.list_async(params))
            items = [_plain(s) for s in page.data]
            for item in items:
                yield item
            if not page.has_more or not items:
                return
            params = {**params, "starting_after": items[-1]["id"]}

    async def retrieve_subscription(self, subscription_id: str) -> dict[str, Any]:
        return _plain(await self._call("read the subscription",
                                       self.client.v1.subscriptions.retrieve_async(subscription_id)))

    async def cancel_subscription(self, subscription_id: str) -> dict[str, Any]:
        return _plain(await self._call("cancel the subscription", self.client.v1.subscriptions.cancel_async(
            subscription_id, None, {"idempotency_key": f"adiuva-cancel-{subscription_id}"})))

    async def create_checkout(self, *, customer_id: str, user_id: str, price: str, success_url: str,
                              cancel_url: str, idempotency_key: str) -> str:
        session = await self._call("start the checkout", self.client.v1.checkout.sessions.create_async({
            "mode": "subscription",
            "customer": customer_id,
            "client_reference_id": user_id,
            "line_items": [{"price": price, "quantity": 1}],
            "subscription_data": {"metadata": {"user_id": user_id}},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }, {"idempotency_key": idempotency_key}))
        return session.url

    async def create_portal(self, *, customer_id: str, return_url: str, idempotency_key: str) -> str:
        portal = await self._call("open the customer portal", self.client.v1.billing_portal.sessions.create_async(
            {"customer": customer_id, "return_url": return_url}, {"idempotency_key": idempotency_key}))
        return portal.url

    # -- paid plugins (Connect) ----------------------------------------------------------------

    async def create_plugin_checkout(self, *, purchase_id: str, user_id: str, email: str, plugin_id: str,
                                     name: str, amount: int, currency: str, fee: int, destination: str | None,
                                     success_url: str, cancel_url: str) -> dict[str, Any]:
        """A one-time Checkout session for a plugin. With a developer (`destination`) it is a
        destination charge: Stripe moves the payment to the connected account and keeps `fee`
        (the application fee) for the platform. The purchase id is the idempotency key, so a
        retried or concurrent install of the same purchase gets this same session."""
        payment_intent: dict[str, Any] = {"metadata": {"purchase_id": purchase_id, "plugin_id": plugin_id}}
        if destination is not None:
            payment_intent.update(application_fee_amount=fee, transfer_data={"destination": destination})
        session = await self._call("start the checkout", self.client.v1.checkout.sessions.create_async({
            "mode": "payment",
            "customer_email": email,
            "client_reference_id": user_id,
            "line_items": [{"quantity": 1, "price_data": {
                "currency": currency.lower(), "unit_amount": amount, "product_data": {"name": name}}}],
            "payment_intent_data": payment_intent,
            "metadata": {"kind": "plugin_purchase", "purchase_id": purchase_id, "plugin_id": plugin_id,
                         "user_id": user_id},
            "success_url": success_url,
            "cancel_url": cancel_url,
        }, {"idempotency_key": f"adiuva-plugin-purchase-{purchase_id}"}))
        return {"id": session.id, "url": session.url}

    async def refund_plugin(self, *, purchase_id: str, payment_intent: str, transferred: bool) -> str:
        """Refund a plugin purchase in full; for a destination charge the developer's transfer is
        reversed and the application fee refunded with it, so neither side keeps a share."""
        params: dict[str, Any] = {"payment_intent": payment_intent, "metadata": {"purchase_id": purchase_id}}
        if transferred:
            params.update(reverse_transfer=True, refund_application_fee=True)
        refund = await self._call("refund the payment", self.client.v1.refunds.create_async(
            params, {"idempotency_key": f"adiuva-plugin-refund-{purchase_id}"}))
        return refund.id

    async def connected_account(self, account_id: str) -> dict[str, Any]:
        return _plain(await self._call("read the connected account", self.client.v1.accounts.retrieve_async(account_id),
                                       missing=f"Stripe has no connected account {account_id} on this platform"))

def verify_signature(body: bytes, header: str | None, secret: str, tolerance: int) -> None:
    """Stripe's scheme, checked by the library on the raw body: `t=<time>,v1=<HMAC-SHA256 of
    "<time>.<body>">`, constant-time, and no older than `tolerance` seconds."""
    import stripe

    try:
        stripe.WebhookSignature.verify_header(body, header, secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        raise errors.InvalidWebhookSignature(str(exc).split(" Read it from")[0]) from None
    except UnicodeDecodeError:
        raise errors.InvalidWebhookSignature("the body is not UTF-8") from None
