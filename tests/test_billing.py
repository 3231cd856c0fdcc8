"""Stripe billing as the desktop app and Stripe see it: the real server on a socket, a real
SQLite file, the real `stripe` library talking to a local stand-in of Stripe's API
(tests/stripe_standin.py), and webhook deliveries signed with Stripe's scheme."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from typer.testing import CliRunner

from adiuva_server import config
from adiuva_server.app import create_app
from adiuva_server.billing import stripe_api
from adiuva_server.cli import app as cli_app
from adiuva_server.keys import BILLING, DB

from tests.conftest import make_settings, register, set_tier
from tests.stripe_standin import sign

API = "/api/v1"
PROBLEM = "application/problem+json"
ROUTES = [("POST", "/billing/checkout", {"tier": "pro"}), ("GET", "/billing/subscription", None),
          ("DELETE", "/billing/subscription", None), ("POST", "/billing/portal", None),
          ("POST", "/billing/webhook", {"id": "evt_1"})]


def licensed_settings(data_dir, standin, **overrides):
    values = dict(licensed=True, default_tier="free", stripe_secret_key=standin.api_key,
                  stripe_webhook_secret=standin.webhook_secret, stripe_api_base=standin.url,
                  rate_limits={"free": 100_000, "pro": 100_000, "power": 100_000, "team": 100_000})
    values.update(overrides)
    return make_settings(data_dir, **values)


@pytest.fixture
async def bclient(aiohttp_client, data_dir, stripe_standin):
    return await aiohttp_client(create_app(licensed_settings(data_dir, stripe_standin)))


async def problem(resp, status: int, code: str) -> dict:
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == PROBLEM, text
    body = json.loads(text)
    assert body["code"] == code and body["status"] == status, body
    return body


async def tier_of(client, acct) -> str:
    return (await (await client.get(f"{API}/auth/me", headers=acct.headers)).json())["tier"]


async def deliver(client, standin, event, *, t=None, secret=None, body=None, signature=None):
    raw, sig = standin.body_and_signature(event, t=t, secret=secret)
    raw = raw if body is None else body
    headers = {"Content-Type": "application/json"}
    if signature is not False:
        headers["Stripe-Signature"] = sig if signature is None else signature
    return await client.post(f"{API}/billing/webhook", data=raw, headers=headers)


async def delivered(client, standin, event) -> str:
    resp = await deliver(client, standin, event)
    assert resp.status == 200, await resp.text()
    return (await resp.json())["outcome"]


async def start_checkout(client, acct, tier="pro") -> str:
    resp = await client.post(f"{API}/billing/checkout", headers=acct.headers, json={"tier": tier})
    assert resp.status == 200, await resp.text()
    url = (await resp.json())["checkout_url"]
    return url.rsplit("/", 1)[1]  # the stand-in's checkout page: /pay/<session id>


async def subscribe(client, standin, acct, tier="pro", deliver_events=True) -> tuple[str, list[dict]]:
    session_id = await start_checkout(client, acct, tier)
    events = standin.complete_checkout(session_id)
    if deliver_events:
        for event in events:
            await delivered(client, standin, event)
    return standin.sessions[session_id]["subscription"], events


async def rows(client, sql: str, params=()) -> list:
    return [tuple(r) for r in await client.app[DB].fetchall(sql, params)]


# -- modes ------------------------------------------------------------------------------------

async def test_homelab_mode_every_billing_route_is_404_billing_not_enabled(client, account):
    for method, path, body in ROUTES:
        resp = await client.request(method, API + path, headers=account.headers, json=body)
        await problem(resp, 404, "billing_not_enabled")
    assert await rows(client, "SELECT * FROM billing_webhook_log") == []


async def test_licensed_without_a_stripe_key_checkout_is_the_stub(aiohttp_client, data_dir, stripe_standin):
    settings = licensed_settings(data_dir, stripe_standin, stripe_secret_key="", stripe_webhook_secret="")
    client = await aiohttp_client(create_app(settings))
    acct = await register(client)
    body = await problem(await client.post(f"{API}/billing/checkout", headers=acct.headers, json={"tier": "pro"}),
                         503, "billing_not_configured")
    assert "STRIPE_SECRET_KEY" in body["detail"]
    await problem(await client.post(f"{API}/billing/portal", headers=acct.headers), 503, "billing_not_configured")
    await problem(await client.delete(f"{API}/billing/subscription", headers=acct.headers), 503, "billing_not_configured")
    event = stripe_standin._event("customer.subscription.updated", {"id": "sub_x"})
    body = await problem(await deliver(client, stripe_standin, event), 503, "billing_not_configured")
    assert "STRIPE_WEBHOOK_SECRET" in body["detail"]
    resp = await client.get(f"{API}/billing/subscription", headers=acct.headers)
    assert resp.status == 200 and await resp.json() == {"tier": "free", "subscription": None}
    assert stripe_standin.requests == []  # nothing was sent to Stripe


# -- checkout ---------------------------------------------------------------------------------

async def test_checkout_to_tier(bclient, stripe_standin):
    acct = await register(bclient)
    assert await tier_of(bclient, acct) == "free"
    session_id = await start_checkout(bclient, acct, "power")
    session = stripe_standin.sessions[session_id]
    me = await (await bclient.get(f"{API}/auth/me", headers=acct.headers)).json()
    assert session["client_reference_id"] == me["id"] and session["mode"] == "subscription"
    assert stripe_standin.session_prices[session_id] == "price_power_monthly"
    assert "{CHECKOUT_SESSION_ID}" in session["success_url"]
    (customer,) = stripe_standin.customers.values()
    assert session["customer"] == customer["id"] and customer["metadata"] == {"user_id": me["id"]}
    assert await tier_of(bclient, acct) == "free"  # nothing until Stripe says it is paid
    events = stripe_standin.complete_checkout(session_id)
    assert [await delivered(bclient, stripe_standin, e) for e in events] == ["applied"] * 3
    assert await tier_of(bclient, acct) == "power"
    info = await (await bclient.get(f"{API}/billing/subscription", headers=acct.headers)).json()
    assert info["tier"] == "power"
    assert info["subscription"]["status"] == "active" and info["subscription"]["plan"] == "power"
    assert info["subscription"]["id"] == session["subscription"] and info["subscription"]["grace_until"] is None
    # Every POST to Stripe carried an idempotency key.
    posts = [r for r in stripe_standin.requests if r[0] == "POST"]
    assert posts and all(key for _, _, key in posts)


@pytest.mark.parametrize("which", ["customer.subscription.created", "checkout.session.completed", "invoice.paid"])
async def test_each_checkout_event_alone_brings_the_tier(bclient, stripe_standin, which):
    """Stripe may lose or delay any of them: each one is enough (the last two name the
    subscription and the server reads it from Stripe)."""
    acct = await register(bclient)
    _, events = await subscribe(bclient, stripe_standin, acct, "team", deliver_events=False)
    (event,) = [e for e in events if e["type"] == which]
    assert await delivered(bclient, stripe_standin, event) == "applied"
    assert await tier_of(bclient, acct) == "team"


async def test_invoice_events_of_older_api_versions(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "pro", deliver_events=False)
    assert await delivered(bclient, stripe_standin, stripe_standin.invoice_event(sub_id, "invoice.paid", legacy=True)) == "applied"
    assert await tier_of(bclient, acct) == "pro"


async def test_subscription_updated_and_deleted(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "pro")
    stripe_standin.clock_offset = 5
    assert await delivered(bclient, stripe_standin, stripe_standin.change_price(sub_id, "price_team_monthly")) == "applied"
    assert await tier_of(bclient, acct) == "team"
    stripe_standin.clock_offset = 10
    stripe_standin.subscriptions[sub_id]["status"] = "canceled"
    deleted = stripe_standin._event("customer.subscription.deleted", stripe_standin.subscriptions[sub_id])
    assert await delivered(bclient, stripe_standin, deleted) == "applied"
    assert await tier_of(bclient, acct) == "free"


@pytest.mark.parametrize("status", ["unpaid", "canceled", "incomplete_expired", "incomplete", "paused", "some_new_status"])
async def test_only_allow_listed_statuses_grant_a_tier(bclient, stripe_standin, status):
    acct = await register(bclient)
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "pro")
    stripe_standin.clock_offset = 5
    assert await delivered(bclient, stripe_standin, stripe_standin.set_status(sub_id, status)) == "applied"
    assert await tier_of(bclient, acct) == "free"
    stripe_standin.clock_offset = 10
    assert await delivered(bclient, stripe_standin, stripe_standin.set_status(sub_id, "trialing")) == "applied"
    assert await tier_of(bclient, acct) == "pro"


async def test_a_price_this_server_does_not_sell_grants_nothing(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "pro")
    stripe_standin.clock_offset = 5
    assert await delivered(bclient, stripe_standin, stripe_standin.change_price(sub_id, "price_someone_elses")) == "applied"
    assert await tier_of(bclient, acct) == "free"


async def test_events_about_customers_of_no_account_change_nothing(bclient, stripe_standin):
    acct = await register(bclient)
    sub = {"id": "sub_foreign", "object": "subscription", "customer": "cus_foreign", "status": "active",
           "metadata": {"user_id": "not-a-user"}, "items": {"data": [{"price": {"id": "price_team_monthly"}}]}}
    assert await delivered(bclient, stripe_standin, stripe_standin._event("customer.subscription.created", sub)) == "ignored"
    assert await delivered(bclient, stripe_standin, stripe_standin._event("charge.succeeded", {"id": "ch_1"})) == "ignored"
    assert await rows(bclient, "SELECT * FROM billing_subscriptions") == []
    assert await tier_of(bclient, acct) == "free"


async def test_a_second_checkout_while_subscribed_is_409_use_the_portal(bclient, stripe_standin):
    acct = await register(bclient)
    await subscribe(bclient, stripe_standin, acct, "pro")
    resp = await bclient.post(f"{API}/billing/checkout", headers=acct.headers, json={"tier": "team"})
    body = await problem(resp, 409, "subscription_exists")
    assert "portal" in body["detail"]
    # Even when no webhook reached this server: Stripe is asked before a second session starts.
    other = await register(bclient, "bob@example.org")
    await subscribe(bclient, stripe_standin, other, "pro", deliver_events=False)
    assert await tier_of(bclient, other) == "free"
    await problem(await bclient.post(f"{API}/billing/checkout", headers=other.headers, json={"tier": "pro"}),
                  409, "subscription_exists")
    assert len(stripe_standin.sessions) == 2


async def test_concurrent_first_checkouts_make_one_customer(bclient, stripe_standin):
    acct = await register(bclient)
    stripe_standin.delay = 0.2  # every Stripe call takes a while: the checkouts overlap
    resps = await asyncio.gather(*(bclient.post(f"{API}/billing/checkout", headers=acct.headers, json={"tier": "pro"})
                                   for _ in range(5)))
    assert [r.status for r in resps] == [200] * 5
    assert len(stripe_standin.customers) == 1
    (customer_id,) = stripe_standin.customers
    assert await rows(bclient, "SELECT customer_id FROM billing_customers") == [(customer_id,)]
    assert {s["customer"] for s in stripe_standin.sessions.values()} == {customer_id}
    # Later checkouts reuse it without asking Stripe for a customer again.
    stripe_standin.delay = 0
    before = sum(1 for m, p, _ in stripe_standin.requests if (m, p) == ("POST", "/v1/customers"))
    await start_checkout(bclient, acct)
    assert sum(1 for m, p, _ in stripe_standin.requests if (m, p) == ("POST", "/v1/customers")) == before


async def test_checkout_validates_the_tier_and_stripe_failures_are_503(bclient, stripe_standin):
    acct = await register(bclient)
    for body in ({"tier": "free"}, {"tier": "gold"}, {}, {"tier": "pro", "price": "price_cheap"}):
        await problem(await bclient.post(f"{API}/billing/checkout", headers=acct.headers, json=body), 422, "validation_error")
    stripe_standin.down = True
    body = await problem(await bclient.post(f"{API}/billing/checkout", headers=acct.headers, json={"tier": "pro"}),
                         503, "payment_provider_unavailable")
    assert stripe_standin.api_key not in body["detail"]
    assert stripe_standin.sessions == {}


async def test_a_wrong_stripe_key_is_a_clean_503(aiohttp_client, data_dir, stripe_standin):
    client = await aiohttp_client(create_app(licensed_settings(data_dir, stripe_standin, stripe_secret_key="sk_test_wrong")))
    acct = await register(client)
    body = await problem(await client.post(f"{API}/billing/checkout", headers=acct.headers, json={"tier": "pro"}),
                         503, "payment_provider_unavailable")
    assert "sk_test_wrong" not in body["detail"] and stripe_standin.customers == {}


# -- portal and cancel ------------------------------------------------------------------------

async def test_portal_opens_for_the_accounts_own_customer(bclient, stripe_standin):
    acct = await register(bclient)
    await subscribe(bclient, stripe_standin, acct, "pro")
    resp = await bclient.post(f"{API}/billing/portal", headers=acct.headers)
    assert resp.status == 200, await resp.text()
    url = (await resp.json())["portal_url"]
    (customer_id,) = stripe_standin.customers
    assert url == f"{stripe_standin.url}/portal/{customer_id}"
    (portal,) = stripe_standin.portals.values()
    assert portal["return_url"] == "https://adiuva.app/billing/return"


async def test_cancel_goes_back_to_free_at_once(bclient, stripe_standin):
    acct = await register(bclient)
    await problem(await bclient.delete(f"{API}/billing/subscription", headers=acct.headers), 404, "not_found")
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "power")
    resp = await bclient.delete(f"{API}/billing/subscription", headers=acct.headers)
    assert resp.status == 200, await resp.text()
    info = await resp.json()
    assert info["tier"] == "free" and info["subscription"]["status"] == "canceled"
    assert stripe_standin.subscriptions[sub_id]["status"] == "canceled"
    assert await tier_of(bclient, acct) == "free"
    # Stripe's own deleted event arrives afterwards: nothing moves.
    deleted = [e for e in stripe_standin.events if e["type"] == "customer.subscription.deleted"]
    assert await delivered(bclient, stripe_standin, deleted[-1]) in ("applied", "stale")
    assert await tier_of(bclient, acct) == "free"
    # Once canceled, a new checkout is allowed again.
    await start_checkout(bclient, acct, "pro")


async def test_cancel_and_checkout_believe_stripe_over_a_missed_webhook(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "pro")
    stripe_standin.subscriptions[sub_id]["status"] = "canceled"  # canceled at Stripe; the event was lost
    # A new checkout is not refused on the strength of this server's stale record.
    await start_checkout(bclient, acct, "team")
    # Cancel finds nothing to cancel at Stripe, records what Stripe says, and the account is free.
    resp = await bclient.delete(f"{API}/billing/subscription", headers=acct.headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["subscription"]["status"] == "canceled"
    assert await tier_of(bclient, acct) == "free"
    assert not any(r[0] == "DELETE" for r in stripe_standin.requests)


# -- webhook signatures, replays, order -------------------------------------------------------

async def test_forged_missing_and_stale_signatures_are_400_and_change_nothing(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, events = await subscribe(bclient, stripe_standin, acct, "pro", deliver_events=False)
    event = events[0]
    body, good = stripe_standin.body_and_signature(event)
    t = int(time.time())
    attempts = {
        "other secret": dict(secret="whsec_someone_else"),
        "no header": dict(signature=False),
        "empty header": dict(signature=""),
        "garbage header": dict(signature="v1=deadbeef"),
        "stale (301 s)": dict(t=t - 301),
        "body changed after signing": dict(body=body.replace(b'"active"', b'"trialing"'), signature=good),
        "v0 scheme only": dict(signature=good.replace("v1=", "v0=")),
        "not utf-8": dict(body=b"\xff\xfe" + body),
    }
    for kw in attempts.values():
        await problem(await deliver(bclient, stripe_standin, event, **kw), 400, "invalid_signature")
    assert await rows(bclient, "SELECT * FROM billing_webhook_log") == []
    assert await rows(bclient, "SELECT * FROM billing_events") == []
    assert await tier_of(bclient, acct) == "free"
    # Within the tolerance it is accepted.
    assert (await deliver(bclient, stripe_standin, event, t=t - 250)).status == 200
    assert await tier_of(bclient, acct) == "pro"


async def test_a_replay_answers_200_and_changes_nothing(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, events = await subscribe(bclient, stripe_standin, acct, "pro")
    stripe_standin.clock_offset = 5
    assert await delivered(bclient, stripe_standin, stripe_standin.set_status(sub_id, "canceled")) == "applied"
    assert await tier_of(bclient, acct) == "free"
    before = await rows(bclient, "SELECT subscription_id, status, observed_at FROM billing_subscriptions")
    for event in events:  # Stripe redelivers the activation (a retry after a timeout, or an attacker)
        assert await delivered(bclient, stripe_standin, event) == "duplicate"
    assert await tier_of(bclient, acct) == "free"
    assert await rows(bclient, "SELECT subscription_id, status, observed_at FROM billing_subscriptions") == before
    outcomes = await rows(bclient, "SELECT outcome FROM billing_webhook_log ORDER BY id")
    assert [o for (o,) in outcomes] == ["applied"] * 4 + ["duplicate"] * 3


async def test_an_older_payload_never_moves_a_subscription_back(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "pro", deliver_events=False)
    stripe_standin.clock_offset = 100
    to_team = stripe_standin.change_price(sub_id, "price_team_monthly")
    stripe_standin.clock_offset = 50
    past_due = stripe_standin.set_status(sub_id, "past_due")  # created earlier than to_team
    stripe_standin.subscriptions[sub_id]["status"] = "active"
    created = next(e for e in stripe_standin.events if e["type"] == "customer.subscription.created")
    # Delivered newest first.
    assert await delivered(bclient, stripe_standin, to_team) == "applied"
    assert await delivered(bclient, stripe_standin, past_due) == "stale"
    assert await delivered(bclient, stripe_standin, created) == "stale"
    assert await tier_of(bclient, acct) == "team"
    (status, price), = await rows(bclient, "SELECT status, price_id FROM billing_subscriptions")
    assert (status, price) == ("active", "price_team_monthly")


async def test_same_second_events_the_later_lifecycle_wins(bclient, stripe_standin):
    """Stripe's `created` has one-second resolution: incomplete -> active in one second, delivered
    the wrong way round, must stay active."""
    acct = await register(bclient)
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "pro", deliver_events=False)
    incomplete = stripe_standin.set_status(sub_id, "incomplete")
    active = stripe_standin.set_status(sub_id, "active")
    active["created"] = incomplete["created"]
    assert await delivered(bclient, stripe_standin, active) == "applied"
    assert await delivered(bclient, stripe_standin, incomplete) == "stale"
    assert await tier_of(bclient, acct) == "pro"


async def test_concurrent_duplicate_deliveries_apply_exactly_once(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, _ = await subscribe(bclient, stripe_standin, acct, "pro", deliver_events=False)
    event = stripe_standin.set_status(sub_id, "active")
    resps = await asyncio.gather(*(deliver(bclient, stripe_standin, event) for _ in range(20)))
    assert [r.status for r in resps] == [200] * 20
    outcomes = sorted([(await r.json())["outcome"] for r in resps])
    assert outcomes == ["applied"] + ["duplicate"] * 19
    assert await rows(bclient, "SELECT event_id FROM billing_events") == [(event["id"],)]
    logged = await rows(bclient, "SELECT outcome FROM billing_webhook_log WHERE event_id = ?", (event["id"],))
    assert sorted(o for (o,) in logged) == ["applied"] + ["duplicate"] * 19
    assert await tier_of(bclient, acct) == "pro"


async def test_each_delivery_is_logged_before_processing_and_stripe_down_means_retry(bclient, stripe_standin):
    acct = await register(bclient)
    sub_id, events = await subscribe(bclient, stripe_standin, acct, "pro", deliver_events=False)
    paid = next(e for e in events if e["type"] == "invoice.paid")
    stripe_standin.down = True  # the server must read the subscription from Stripe for this one
    await problem(await deliver(bclient, stripe_standin, paid), 503, "payment_provider_unavailable")
    assert await rows(bclient, "SELECT * FROM billing_events") == []  # not applied: Stripe retries it
    stripe_standin.down = False
    assert await delivered(bclient, stripe_standin, paid) == "applied"
    assert await tier_of(bclient, acct) == "pro"
    log = await rows(bclient, "SELECT event_id, event_type, headers, body, outcome FROM billing_webhook_log ORDER BY id")
    assert [(r[0], r[1], r[4]) for r in log] == [(paid["id"], "invoice.paid", "error"), (paid["id"], "invoice.paid", "applied")]
    headers = json.loads(log[1][2])
    assert headers["Stripe-Signature"].startswith("t=") and "Authorization" not in headers
    assert json.loads(log[1][3]) == paid


async def test_malformed_signed_events_and_oversized_bodies(bclient, stripe_standin):
    acct = await register(bclient)
    for body in (b"not json", b"[]", json.dumps({"id": "evt_1", "type": "x"}).encode()):
        resp = await bclient.post(f"{API}/billing/webhook", data=body,
                                  headers={"Stripe-Signature": sign(body, stripe_standin.webhook_secret)})
        await problem(resp, 400, "malformed_request")
    big = b"{" + b" " * (600 * 1024) + b"}"
    await problem(await deliver(bclient, stripe_standin, {}, body=big), 413, "payload_too_large")
    assert await rows(bclient, "SELECT * FROM billing_events") == []
    assert await tier_of(bclient, acct) == "free"


# -- past_due grace ---------------------------------------------------------------------------

async def test_past_due_keeps_the_tier_for_the_grace_then_free(aiohttp_client, data_dir, stripe_standin):
    client = await aiohttp_client(create_app(licensed_settings(data_dir, stripe_standin, billing_past_due_grace=3 * 86400)))
    service = client.app[BILLING]
    acct = await register(client)
    sub_id, _ = await subscribe(client, stripe_standin, acct, "power")
    start = time.time()
    service.clock = lambda: start
    stripe_standin.subscriptions[sub_id]["status"] = "past_due"  # a renewal failed
    failed = stripe_standin.invoice_event(sub_id, "invoice.payment_failed")
    assert await delivered(client, stripe_standin, failed) == "applied"
    assert await tier_of(client, acct) == "power"
    info = await (await client.get(f"{API}/billing/subscription", headers=acct.headers)).json()
    assert info["subscription"]["status"] == "past_due"
    assert info["subscription"]["grace_until"] == int(start) + 3 * 86400
    # Stripe's retries keep it past_due: each update keeps the grace's start.
    service.clock = lambda: start + 86400
    stripe_standin.clock_offset = 86400
    assert await delivered(client, stripe_standin, stripe_standin.set_status(sub_id, "past_due")) == "applied"
    assert await service.expire_grace() == []
    assert await tier_of(client, acct) == "power"
    # Three days after it fell past due, the background job ends the grace.
    service.clock = lambda: start + 3 * 86400 + 1
    (change,) = await service.expire_grace()
    assert (change.email, change.old, change.new) == ("ada@example.org", "power", "free")
    assert await tier_of(client, acct) == "free"
    # The card is fixed: the tier comes back.
    stripe_standin.clock_offset = 4 * 86400
    stripe_standin.subscriptions[sub_id]["status"] = "active"
    assert await delivered(client, stripe_standin, stripe_standin.invoice_event(sub_id, "invoice.paid")) == "applied"
    assert await tier_of(client, acct) == "power"


# -- drift repair -----------------------------------------------------------------------------

def _cli_reconcile(monkeypatch, data_dir, standin):
    monkeypatch.setattr(config, "licensed_mode", lambda env: True)
    env = {"ADIUVA_DATA_DIR": str(data_dir), "STRIPE_SECRET_KEY": standin.api_key, "STRIPE_API_BASE": standin.url,
           "ADIUVA_DEFAULT_TIER": "free"}
    return CliRunner().invoke(cli_app, ["billing", "reconcile"], env=env)


async def test_reconcile_cli_repairs_missed_webhooks(bclient, stripe_standin, data_dir, monkeypatch):
    monkeypatch.setattr(stripe_api, "PAGE", 2)  # several pages of subscriptions
    ada = await register(bclient, "ada@example.org")
    bob = await register(bclient, "bob@example.org")
    cy = await register(bclient, "cy@example.org")
    await subscribe(bclient, stripe_standin, ada, "pro", deliver_events=False)  # every webhook lost
    bob_sub, _ = await subscribe(bclient, stripe_standin, bob, "team")
    cy_sub, _ = await subscribe(bclient, stripe_standin, cy, "power")
    stripe_standin.subscriptions[bob_sub]["status"] = "canceled"  # its deleted event lost too
    await set_tier(bclient, "cy@example.org", "free")  # drift by hand
    assert [await tier_of(bclient, a) for a in (ada, bob, cy)] == ["free", "team", "free"]
    result = await asyncio.to_thread(_cli_reconcile, monkeypatch, data_dir, stripe_standin)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sorted(lines[:-1]) == ["ada@example.org: free -> pro", "bob@example.org: team -> free",
                                  "cy@example.org: free -> power"]
    assert lines[-1].startswith("3 tier(s) repaired")
    assert [await tier_of(bclient, a) for a in (ada, bob, cy)] == ["pro", "free", "power"]
    lists = [r for r in stripe_standin.requests if r[:2] == ("GET", "/v1/subscriptions")]
    assert len(lists) >= 2  # paginated
    # Nothing left to repair: a second run changes nothing.
    again = await asyncio.to_thread(_cli_reconcile, monkeypatch, data_dir, stripe_standin)
    assert again.exit_code == 0 and again.output.splitlines()[0].startswith("0 tier(s) repaired"), again.output
    # An old webhook arriving after the repair does not undo it.
    bob_created = next(e for e in stripe_standin.events if e["type"] == "customer.subscription.created"
                       and e["data"]["object"]["id"] == bob_sub)
    assert await delivered(bclient, stripe_standin, bob_created) == "duplicate"


async def test_reconcile_cli_refuses_in_homelab_mode(data_dir, client, stripe_standin):
    env = {"ADIUVA_DATA_DIR": str(data_dir), "STRIPE_SECRET_KEY": stripe_standin.api_key}
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["billing", "reconcile"], env=env)
    assert result.exit_code == 2 and "homelab mode" in result.output
    assert stripe_standin.requests == []


async def test_the_background_job_reconciles_once_per_interval(aiohttp_client, data_dir, stripe_standin):
    client = await aiohttp_client(create_app(licensed_settings(data_dir, stripe_standin)))
    # A second server process on the same database (one more app, as a cluster node would be).
    other = await aiohttp_client(create_app(licensed_settings(data_dir, stripe_standin)))
    acct = await register(client)
    await subscribe(client, stripe_standin, acct, "pro", deliver_events=False)
    await asyncio.gather(client.app[BILLING].run_jobs(), other.app[BILLING].run_jobs())
    lists = [r for r in stripe_standin.requests if r[:2] == ("GET", "/v1/subscriptions")]
    checkout_lists = 1  # the checkout asked Stripe for the customer's subscriptions
    assert len(lists) == checkout_lists + 1  # one reconcile for the two nodes
    assert await tier_of(client, acct) == "pro"
    await client.app[BILLING].run_jobs()  # within the interval: no second run
    assert len([r for r in stripe_standin.requests if r[:2] == ("GET", "/v1/subscriptions")]) == checkout_lists + 1
    service = client.app[BILLING]
    later = time.time() + 86400 + 1
    service.clock = lambda: later
    await service.run_jobs()
    assert len([r for r in stripe_standin.requests if r[:2] == ("GET", "/v1/subscriptions")]) == checkout_lists + 2
