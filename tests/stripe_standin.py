"""A local stand-in for the parts of Stripe's API that billing uses, for the real `stripe`
library to talk to: customers, checkout sessions, subscriptions (list, retrieve, cancel),
billing portal sessions and events, on 127.0.0.1.

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
