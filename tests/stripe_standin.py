"""A local stand-in for the parts of Stripe's API that billing uses, for the real `stripe`
library to talk to: customers, checkout sessions (subscriptions, and one-time payments that are
Connect destination charges), subscriptions (list, retrieve, cancel), billing portal sessions,
connected accounts, refunds (reversing transfers and application fees) and events, on 127.0.0.1.

Like Stripe it checks `Authorization: Bearer <secret key>`, reads form-encoded bodies with
Stripe's bracket notation, answers errors as `{"error": {...}}`, and honours `Idempotency-Key`:
the same key again gets the same response (with `Idempotent-Replayed: true`), the same key with
other parameters a 400 `idempotency_error`. Tests drive what would happen on Stripe's side
(a customer paying, a card failing) with methods, which return the events Stripe would send;
`sign()` signs a delivery with Stripe's scheme."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import secrets
import time
import urllib.parse
from collections import defaultdict
from typing import Any

from aiohttp import web

PERIOD = 30 * 86400


def sign(body: bytes, secret: str, t: int | None = None) -> str:
    """Stripe-Signature: `t=<time>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`."""
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """`line_items[0][price]=p` -> {"line_items": [{"price": "p"}]}."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        parts = re.findall(r"[^\[\]]+", key)
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    def lists(node: Any) -> Any:
        if isinstance(node, dict):
            if node and all(k.isdigit() for k in node):
                return [lists(node[k]) for k in sorted(node, key=int)]
            return {k: lists(v) for k, v in node.items()}
        return node

    return lists(root)


class StripeError(Exception):
    def __init__(self, status: int, kind: str, message: str, code: str | None = None) -> None:
        self.status, self.kind, self.message, self.code = status, kind, message, code


class StripeStandIn:
    def __init__(self, api_key: str = "sk_test_standin_" + "k" * 24, webhook_secret: str = "whsec_standin") -> None:
        self.api_key = api_key
        self.webhook_secret = webhook_secret
        self.customers: dict[str, dict] = {}
        self.sessions: dict[str, dict] = {}
        self.session_prices: dict[str, str] = {}
        self.session_metadata: dict[str, dict] = {}  # subscription_data.metadata of each session
        self.subscriptions: dict[str, dict] = {}
        self.portals: dict[str, dict] = {}
        self.events: list[dict] = []
        self.accounts: dict[str, dict] = {}  # Connect accounts of the platform
        self.payment_intents: dict[str, dict] = {}
        self.charges: dict[str, dict] = {}
        self.transfers: dict[str, dict] = {}
        self.application_fees: dict[str, dict] = {}
        self.refunds: dict[str, dict] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, idempotency key)
        self.delay = 0.0  # seconds each API call takes (to let concurrent calls overlap)
        self.down = False  # answer every call 500 (Stripe in trouble)
        self.clock_offset = 0  # seconds added to this Stripe's clock (events' `created`)
        self._ids = itertools.count(1)
        self._idempotent: dict[str, tuple[str, int, bytes]] = {}
        self._key_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._runner: web.AppRunner | None = None
        self.url = ""

    # -- server ------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def now(self) -> int:
        return int(time.time()) + self.clock_offset

    def _id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}{secrets.token_hex(4)}"

    async def _handle(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        self.requests.append((request.method, request.path, key))
        auth = request.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
            return self._error(StripeError(401, "invalid_request_error", "Invalid API Key provided"))
        raw = await request.read()
        if request.method == "GET":
            params = parse_form(list(request.query.items()))
        else:
            params = parse_form(urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True))
        if key and request.method in ("POST", "DELETE"):
            fingerprint = json.dumps([request.method, request.path, params], sort_keys=True)
            async with self._key_locks[key]:
                if key in self._idempotent:
                    seen, status, body = self._idempotent[key]
                    if seen != fingerprint:
                        return self._error(StripeError(
                            400, "idempotency_error",
                            "Keys for idempotent requests can only be used with the same parameters they were first used with."))
                    return web.Response(status=status, body=body, content_type="application/json",
                                        headers={"Idempotent-Replayed": "true"})
                response = await self._dispatch(request.method, request.path, params)
                self._idempotent[key] = (fingerprint, response.status, response.body)  # type: ignore[assignment]
                return response
        return await self._dispatch(request.method, request.path, params)

    async def _dispatch(self, method: str, path: str, params: dict) -> web.Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            return self._error(StripeError(500, "api_error", "Something went wrong on Stripe's end."))
        routes = [
            ("POST", r"/v1/customers", self._create_customer),
            ("GET", r"/v1/customers/(?P<id>[^/]+)", self._get_customer),
            ("POST", r"/v1/checkout/sessions", self._create_session),
            ("GET", r"/v1/subscriptions", self._list_subscriptions),
            ("GET", r"/v1/subscriptions/(?P<id>[^/]+)", self._get_subscription),
            ("DELETE", r"/v1/subscriptions/(?P<id>[^/]+)", self._cancel_subscription),
            ("POST", r"/v1/billing_portal/sessions", self._create_portal),
            ("GET", r"/v1/accounts/(?P<id>[^/]+)", self._get_account),
            ("POST", r"/v1/refunds", self._create_refund),
            ("GET", r"/v1/events", self._list_events),
            ("GET", r"/v1/events/(?P<id>[^/]+)", self._get_event),
        ]
        for m, pattern, fn in routes:
            match = re.fullmatch(pattern, path)
            if m == method and match:
                try:
                    return web.json_response(fn(params, **match.groupdict()))
                except StripeError as exc:
                    return self._error(exc)
        return self._error(StripeError(404, "invalid_request_error", f"Unrecognized request URL ({method}: {path})."))

    @staticmethod
    def _error(exc: StripeError) -> web.Response:
        err = {"type": exc.kind, "message": exc.message}
        if exc.code:
            err["code"] = exc.code
        return web.json_response({"error": err}, status=exc.status)

    @staticmethod
    def _missing(kind: str, ident: str) -> StripeError:
        return StripeError(404, "invalid_request_error", f"No such {kind}: '{ident}'", "resource_missing")

    # -- API ---------------------------------------------------------------------------------

    def _create_customer(self, params: dict) -> dict:
        customer = {"id": self._id("cus"), "object": "customer", "email": params.get("email"),
                    "metadata": params.get("metadata", {}), "created": self.now()}
        self.customers[customer["id"]] = customer
        return customer

    def _get_customer(self, params: dict, id: str) -> dict:
        if id not in self.customers:
            raise self._missing("customer", id)
        return self.customers[id]

    def _create_session(self, params: dict) -> dict:
        if params.get("mode") == "payment":
            return self._create_payment_session(params)
        for name in ("customer", "success_url", "cancel_url", "line_items"):
            if name not in params:
                raise StripeError(400, "invalid_request_error", f"Missing required param: {name}.", "parameter_missing")
        if params["customer"] not in self.customers:
            raise self._missing("customer", params["customer"])
        session_id = self._id("cs_test")
        session = {"id": session_id, "object": "checkout.session", "mode": params.get("mode"),
                   "customer": params["customer"], "client_reference_id": params.get("client_reference_id"),
                   "status": "open", "payment_status": "unpaid", "subscription": None,
                   "success_url": params["success_url"], "cancel_url": params["cancel_url"],
                   "url": f"{self.url}/pay/{session_id}", "metadata": params.get("metadata", {}),
                   "created": self.now()}
        self.sessions[session_id] = session
        self.session_prices[session_id] = params["line_items"][0]["price"]
        self.session_metadata[session_id] = (params.get("subscription_data") or {}).get("metadata", {})
        return session

    def _create_payment_session(self, params: dict) -> dict:
        """A one-time payment; with payment_intent_data[transfer_data][destination], a Connect
        destination charge whose application_fee_amount stays with the platform."""
        for name in ("success_url", "cancel_url", "line_items"):
            if name not in params:
                raise StripeError(400, "invalid_request_error", f"Missing required param: {name}.", "parameter_missing")
        item = params["line_items"][0]
        price_data = item.get("price_data") or {}
        try:
            amount, quantity = int(price_data["unit_amount"]), int(item.get("quantity", 1))
            currency = price_data["currency"]
        except (KeyError, ValueError):
            raise StripeError(400, "invalid_request_error", "line_items[0][price_data] needs unit_amount and currency.",
                              "parameter_missing") from None
        if currency != currency.lower() or len(currency) != 3:
            raise StripeError(400, "invalid_request_error", f"Invalid currency: {currency}.", "parameter_invalid")
        intent = params.get("payment_intent_data") or {}
        destination = (intent.get("transfer_data") or {}).get("destination")
        fee = int(intent["application_fee_amount"]) if "application_fee_amount" in intent else None
        if destination is not None and destination not in self.accounts:
            raise StripeError(400, "invalid_request_error", f"No such destination: '{destination}'", "resource_missing")
        if fee is not None and destination is None:
            raise StripeError(400, "invalid_request_error", "Can only apply an application_fee_amount when the "
                              "PaymentIntent is attempting a direct payment or destination payment.")
        if fee is not None and not 0 <= fee <= amount * quantity:
            raise StripeError(400, "invalid_request_error", "application_fee_amount must be at most the amount.")
        session_id = self._id("cs_test")
        session = {"id": session_id, "object": "checkout.session", "mode": "payment", "customer": params.get("customer"),
                   "customer_email": params.get("customer_email"), "client_reference_id": params.get("client_reference_id"),
                   "status": "open", "payment_status": "unpaid", "payment_intent": None,
                   "amount_total": amount * quantity, "currency": currency,
                   "success_url": params["success_url"], "cancel_url": params["cancel_url"],
                   "url": f"{self.url}/pay/{session_id}", "metadata": params.get("metadata", {}),
                   "created": self.now(), "_intent": {"destination": destination, "fee": fee,
                                                      "metadata": intent.get("metadata", {})}}
        self.sessions[session_id] = session
        return self._public(session)

    @staticmethod
    def _public(obj: dict) -> dict:
        return {k: v for k, v in obj.items() if not k.startswith("_")}

    def _get_account(self, params: dict, id: str) -> dict:
        if id not in self.accounts:
            raise StripeError(404, "invalid_request_error",
                              f"The provided key does not have access to account '{id}' (or that account does not "
                              "exist).", "resource_missing")
        return self.accounts[id]

    def _create_refund(self, params: dict) -> dict:
        intent_id = params.get("payment_intent")
        if intent_id not in self.payment_intents:
            raise self._missing("payment_intent", str(intent_id))
        return self._refund(self.payment_intents[intent_id], params.get("reverse_transfer") == "true",
                            params.get("refund_application_fee") == "true", params.get("metadata", {}))

    def _refund(self, intent: dict, reverse_transfer: bool, refund_fee: bool, metadata: dict) -> dict:
        charge = self.charges[intent["latest_charge"]]
        if charge["refunded"]:
            raise StripeError(400, "invalid_request_error", f"Charge {charge['id']} has already been refunded.",
                              "charge_already_refunded")
        if (reverse_transfer or refund_fee) and not charge.get("transfer"):
            raise StripeError(400, "invalid_request_error", "reverse_transfer and refund_application_fee need a "
                              "charge with a transfer (a destination charge).")
        refund = {"id": self._id("re"), "object": "refund", "amount": charge["amount"], "charge": charge["id"],
                  "payment_intent": intent["id"], "status": "succeeded", "metadata": metadata, "created": self.now()}
        self.refunds[refund["id"]] = refund
        charge.update(amount_refunded=charge["amount"], refunded=True,
                      refunds={"object": "list", "data": [refund], "has_more": False})
        if reverse_transfer:
            transfer = self.transfers[charge["transfer"]]
            transfer["amount_reversed"] = transfer["amount"]
        if refund_fee and charge.get("application_fee"):
            fee = self.application_fees[charge["application_fee"]]
            fee["amount_refunded"] = fee["amount"]
        self._event("charge.refunded", charge)
        return refund
    def _list_subscriptions(self, params: dict) -> dict:
        subs = [s for s in self.subscriptions.values()
                if params.get("customer") in (None, s["customer"])
                and (params.get("status", "all") == "all" or s["status"] == params.get("status"))]
        if params.get("status") is None:  # Stripe's default leaves canceled ones out
            subs = [s for s in subs if s["status"] != "canceled"]
        subs.sort(key=lambda s: s["id"])
        if "starting_after" in params:
            ids = [s["id"] for s in subs]
            subs = subs[ids.index(params["starting_after"]) + 1:]
        limit = int(params.get("limit", 10))
        return {"object": "list", "url": "/v1/subscriptions", "data": subs[:limit], "has_more": len(subs) > limit}

    def _get_subscription(self, params: dict, id: str) -> dict:
        if id not in self.subscriptions:
            raise self._missing("subscription", id)
        return self.subscriptions[id]

    def _cancel_subscription(self, params: dict, id: str) -> dict:
        sub = self._get_subscription(params, id)
        if sub["status"] == "canceled":
            raise StripeError(400, "invalid_request_error", "A canceled subscription can only update its metadata.")
        sub.update(status="canceled", canceled_at=self.now())
        self._event("customer.subscription.deleted", sub)
        return sub

    def _create_portal(self, params: dict) -> dict:
        if params.get("customer") not in self.customers:
            raise self._missing("customer", str(params.get("customer")))
        portal = {"id": self._id("bps"), "object": "billing_portal.session", "customer": params["customer"],
                  "return_url": params.get("return_url"), "url": f"{self.url}/portal/{params['customer']}"}
        self.portals[portal["id"]] = portal
        return portal

    def _list_events(self, params: dict) -> dict:
        events = [e for e in reversed(self.events) if params.get("type") in (None, e["type"])]
        limit = int(params.get("limit", 10))
        return {"object": "list", "url": "/v1/events", "data": events[:limit], "has_more": len(events) > limit}

    def _get_event(self, params: dict, id: str) -> dict:
        for event in self.events:
            if event["id"] == id:
                return event
        raise self._missing("event", id)

    # -- what happens on Stripe's side (test controls) -----------------------------------------

    def _event(self, kind: str, obj: dict, created: int | None = None) -> dict:
        event = {"id": self._id("evt"), "object": "event", "api_version": "2025-03-31.basil", "type": kind,
                 "created": self.now() if created is None else created, "livemode": False, "pending_webhooks": 1,
                 "data": {"object": json.loads(json.dumps(obj))}}  # a snapshot, as Stripe sends
        self.events.append(event)
        return event

    def complete_checkout(self, session_id: str, status: str = "active") -> list[dict]:
        """The customer paid: the subscription exists. Returns the events Stripe sends, in the
        order it creates them (customer.subscription.created, checkout.session.completed,
        invoice.paid)."""
        session = self.sessions[session_id]
        now = self.now()
        sub = {"id": self._id("sub"), "object": "subscription", "customer": session["customer"], "status": status,
               "created": now, "cancel_at_period_end": False, "metadata": self.session_metadata[session_id],
               "items": {"object": "list", "data": [{"id": self._id("si"), "object": "subscription_item",
                                                      "price": {"id": self.session_prices[session_id], "object": "price"},
                                                      "current_period_end": now + PERIOD}]}}
        self.subscriptions[sub["id"]] = sub
        session.update(status="complete", payment_status="paid", subscription=sub["id"])
        return [self._event("customer.subscription.created", sub), self._event("checkout.session.completed", session),
                self.invoice_event(sub["id"], "invoice.paid")]

    def add_account(self, transfers: str = "active") -> str:
        """A connected account of the platform (a developer onboarded through Connect)."""
        account = {"id": self._id("acct"), "object": "account", "type": "express", "charges_enabled": True,
                   "payouts_enabled": True, "capabilities": {"transfers": transfers, "card_payments": transfers}}
        self.accounts[account["id"]] = account
        return account["id"]

    def pay(self, session_id: str) -> dict:
        """The buyer paid a one-time Checkout session: the PaymentIntent and its charge exist; for a
        destination charge the amount is transferred to the connected account and the
        application fee collected from it. Returns checkout.session.completed."""
        session = self.sessions[session_id]
        spec = session["_intent"]
        intent = {"id": self._id("pi"), "object": "payment_intent", "amount": session["amount_total"],
                  "currency": session["currency"], "status": "succeeded", "metadata": spec["metadata"],
                  "application_fee_amount": spec["fee"],
                  "transfer_data": {"destination": spec["destination"]} if spec["destination"] else None}
        charge = {"id": self._id("ch"), "object": "charge", "amount": intent["amount"], "amount_refunded": 0,
                  "refunded": False, "currency": intent["currency"], "payment_intent": intent["id"], "paid": True,
                  "transfer": None, "application_fee": None, "destination": spec["destination"],
                  "refunds": {"object": "list", "data": [], "has_more": False}}
        if spec["destination"]:
            transfer = {"id": self._id("tr"), "object": "transfer", "amount": intent["amount"],
                        "amount_reversed": 0, "destination": spec["destination"], "source_transaction": charge["id"]}
            self.transfers[transfer["id"]] = transfer
            charge["transfer"] = transfer["id"]
            if spec["fee"]:
                fee = {"id": self._id("fee"), "object": "application_fee", "amount": spec["fee"], "amount_refunded": 0,
                       "account": spec["destination"], "charge": charge["id"]}
                self.application_fees[fee["id"]] = fee
                charge["application_fee"] = fee["id"]
        intent["latest_charge"] = charge["id"]
        self.payment_intents[intent["id"]] = intent
        self.charges[charge["id"]] = charge
        session.update(status="complete", payment_status="paid", payment_intent=intent["id"])
        return self._event("checkout.session.completed", self._public(session))

    def expire(self, session_id: str) -> dict:
        session = self.sessions[session_id]
        session.update(status="expired")
        return self._event("checkout.session.expired", self._public(session))

    def refund_in_dashboard(self, intent_id: str) -> dict:
        """The operator refunded in Stripe's dashboard (transfer and fee reversed): charge.refunded."""
        self._refund(self.payment_intents[intent_id], True, True, {})
        return self.events[-1]

    def balances(self) -> dict[str | None, int]:
        """Net cents per connected account (transfers less reversals less application fees kept)
        and for the platform (None: application fees less their refunds)."""
        net: dict[str | None, int] = defaultdict(int)
        for t in self.transfers.values():
            net[t["destination"]] += t["amount"] - t["amount_reversed"]
        for f in self.application_fees.values():
            kept = f["amount"] - f["amount_refunded"]
            net[f["account"]] -= kept
            net[None] += kept
        for c in self.charges.values():
            if not c["destination"]:  # the platform's own sale
                net[None] += c["amount"] - c["amount_refunded"]
        return dict(net)

    def set_status(self, sub_id: str, status: str, **changes: Any) -> dict:
        """Stripe moved the subscription (a renewal failed, a retry paid, ...): its update event."""
        sub = self.subscriptions[sub_id]
        sub.update(status=status, **changes)
        return self._event("customer.subscription.updated", sub)

    def change_price(self, sub_id: str, price: str) -> dict:
        """A plan change in the customer portal."""
        self.subscriptions[sub_id]["items"]["data"][0]["price"] = {"id": price, "object": "price"}
        return self._event("customer.subscription.updated", self.subscriptions[sub_id])

    def invoice_event(self, sub_id: str, kind: str, legacy: bool = False) -> dict:
        """invoice.paid / invoice.payment_failed; `legacy`: the subscription at the top level (API
        versions before 2025-03), else under parent.subscription_details (newer versions)."""
        sub = self.subscriptions[sub_id]
        invoice = {"id": self._id("in"), "object": "invoice", "customer": sub["customer"],
                   "status": "paid" if kind == "invoice.paid" else "open"}
        if legacy:
            invoice["subscription"] = sub_id
        else:
            invoice["parent"] = {"type": "subscription_details", "subscription_details": {"subscription": sub_id}}
        return self._event(kind, invoice)

    def body_and_signature(self, event: dict, *, t: int | None = None, secret: str | None = None) -> tuple[bytes, str]:
        body = json.dumps(event).encode()
        return body, sign(body, secret or self.webhook_secret, t)
