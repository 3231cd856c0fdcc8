"""Paid plugins in licensed mode, as the desktop app, a developer, the admin and Stripe see them:
the real server on a socket, a real SQLite file, the real `stripe` library talking to the local
Stripe stand-in (tests/stripe_standin.py) with Connect destination charges, webhooks signed with
Stripe's scheme, and the real CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json

import pytest
from typer.testing import CliRunner

from adiuva_server.app import create_app
from adiuva_server.cli import app as cli_app
from adiuva_server.keys import DB, MARKETPLACE
from adiuva_server.marketplace import revenue
from tests import licenses as L
from tests.conftest import make_settings, register, set_tier
from tests.plugin_kit import API, package, submit
from tests.stripe_standin import sign

FAST = {"free": 100_000, "pro": 100_000, "power": 100_000, "team": 100_000}


def licensed(data_dir, standin, **overrides):
    L.write(data_dir / "license.json", L.signed(L.body(dt.datetime.now(dt.UTC), features=["billing", "marketplace"])))
    values = dict(licensed=True, default_tier="free", license_public_key=L.public_b64(),
                  stripe_secret_key=standin.api_key, stripe_webhook_secret=standin.webhook_secret,
                  stripe_api_base=standin.url, rate_limits=FAST)
    values.update(overrides)
    return make_settings(data_dir, **values)


def cli(data_dir, standin, *args):
    env = {"ADIUVA_DATA_DIR": str(data_dir), "STRIPE_SECRET_KEY": standin.api_key, "STRIPE_API_BASE": standin.url,
           "ADIUVA_LICENSE_PUBLIC_KEY": L.public_b64()}
    return CliRunner().invoke(cli_app, list(args), env=env)


async def _json(resp, status=200):
    text = await resp.text()
    assert resp.status == status, text
    return json.loads(text) if text else None


class Shop:
    """A licensed server with an admin, a developer selling `timebox` (EUR 4.99) through a
    connected account, and a buyer on the power tier."""

    def __init__(self, client, standin, data_dir, admin, dev, buyer, account):
        self.client, self.standin, self.data_dir = client, standin, data_dir
        self.admin, self.dev, self.buyer, self.account = admin, dev, buyer, account

    async def deliver(self, event) -> dict:
        body, signature = self.standin.body_and_signature(event)
        resp = await self.client.post(f"{API}/billing/webhook", data=body,
                                      headers={"Content-Type": "application/json", "Stripe-Signature": signature})
        return await _json(resp)

    async def install(self, acct=None, plugin="timebox", status=200):
        return await _json(await self.client.post(f"{API}/plugins/{plugin}/install",
                                                  headers=(acct or self.buyer).headers), status)

    async def installed(self, acct=None) -> dict:
        items = (await _json(await self.client.get(f"{API}/plugins/installed", headers=(acct or self.buyer).headers)))["items"]
        return {i["plugin_id"]: i for i in items}

    async def detail(self, plugin="timebox") -> dict:
        return await _json(await self.client.get(f"{API}/plugins/{plugin}", headers=self.buyer.headers))

    async def rows(self, sql, params=()):
        return [tuple(r) for r in await self.client.app[DB].fetchall(sql, params)]

    async def buy(self, acct=None, plugin="timebox") -> dict:
        """Install, pay at the stand-in's checkout, deliver Stripe's webhook: the installation."""
        started = await self.install(acct, plugin)
        session = started["checkout_url"].rsplit("/", 1)[1]
        assert (await self.deliver(self.standin.pay(session)))["outcome"] == "applied"
        return (await self.installed(acct))[plugin]

    def developer_add(self, *args):
        return cli(self.data_dir, self.standin, "plugin", "developer", "add", *args)


async def add_paid_plugin(client, admin, dev, tmp_path, pid="timebox", name="Timebox", price=499):
    data = package(tmp_path, id=pid, name=name, price_cents=price, currency="EUR")
    await _json(await submit(client, dev.headers, data, "/plugins/submissions"), 201)
    await _json(await client.post(f"{API}/admin/plugins/{pid}/approve", headers=admin.headers, json={}))


@pytest.fixture
async def shop(aiohttp_client, data_dir, stripe_standin, tmp_path):
    client = await aiohttp_client(create_app(licensed(data_dir, stripe_standin)))
    admin = await register(client, "admin@example.org")
    dev = await register(client, "dev@example.org")
    buyer = await register(client, "buyer@example.org")
    for who in ("dev@example.org", "buyer@example.org"):
        await set_tier(client, who, "power")
    await add_paid_plugin(client, admin, dev, tmp_path)
    account = stripe_standin.add_account()
    result = await asyncio.to_thread(cli, data_dir, stripe_standin, "plugin", "developer", "add", "dev@example.org",
                                     "--stripe-account", account)
    assert result.exit_code == 0, result.output
    assert f"dev@example.org is a plugin developer paid through {account}" in result.output
    return Shop(client, stripe_standin, data_dir, admin, dev, buyer, account)


def test_the_split_is_30_percent_rounded_half_up_and_always_sums():
    assert revenue.split(499) == (150, 349)  # 149.7 -> 150
    assert revenue.split(999) == (300, 699)  # 299.7 -> 300
    assert revenue.split(5) == (2, 3)  # 1.5 -> 2: half up
    assert revenue.split(15) == (5, 10)  # 4.5 -> 5
    assert revenue.split(1) == (0, 1)  # 0.3 -> 0
    assert revenue.split(0) == (0, 0)
    for price in range(0, 20_001):
        fee, share = revenue.split(price)
        exact = (decimal.Decimal(price) * decimal.Decimal("0.30")).quantize(0, rounding=decimal.ROUND_HALF_UP)
        assert (fee, fee + share) == (int(exact), price)
    with pytest.raises(ValueError):
        revenue.split(-1)


async def test_a_paid_install_charges_once_through_connect_and_installs_on_the_webhook(shop):
    s = shop
    started = await s.install()
    assert (started["status"], started["payment_state"], started["price_cents"]) == ("awaiting_payment", "pending", 499)
    session_id = started["checkout_url"].rsplit("/", 1)[1]
    session = s.standin.sessions[session_id]
    # A destination charge: the developer's account gets the payment, the platform keeps 30 %.
    assert (session["amount_total"], session["currency"], session["mode"]) == (499, "eur", "payment")
    assert session["_intent"]["destination"] == s.account and session["_intent"]["fee"] == 150
    assert session["metadata"]["purchase_id"] == started["purchase_id"]
    # Installing again before paying: the same purchase and page, no second session.
    again = await s.install()
    assert (again["purchase_id"], again["checkout_url"]) == (started["purchase_id"], started["checkout_url"])
    assert len(s.standin.sessions) == 1
    assert (await s.installed())["timebox"]["status"] == "awaiting_payment"
    assert (await s.detail())["install_count"] == 0  # not counted before it is paid
    # Rating needs a real installation.
    resp = await s.client.put(f"{API}/plugins/timebox/rating", headers=s.buyer.headers, json={"stars": 5})
    assert resp.status == 409

    event = s.standin.pay(session_id)
    ack = await s.deliver(event)
    assert ack["outcome"] == "applied"
    mine = (await s.installed())["timebox"]
    assert (mine["status"], mine["payment_state"], mine["price_cents"]) == ("installed", "paid", 499)
    assert (await s.detail())["install_count"] == 1
    assert s.standin.balances() == {s.account: 349, None: 150}
    # The same delivery again, and installing again: nothing more, no new charge.
    assert (await s.deliver(event))["outcome"] == "duplicate"
    assert (await s.install())["status"] == "installed"
    assert len(s.standin.sessions) == 1 and len(s.standin.payment_intents) == 1
    # Uninstalled and installed again: paid once, so installed without a checkout.
    resp = await s.client.delete(f"{API}/plugins/timebox/install", headers=s.buyer.headers)
    assert resp.status == 204
    back = await s.install()
    assert (back["status"], back["payment_state"], back["checkout_url"]) == ("installed", "paid", None)
    assert len(s.standin.sessions) == 1
    assert await s.rows("SELECT kind, gross_cents, fee_cents, developer_cents, destination FROM plugin_ledger") == [
        ("sale", 499, 150, 349, s.account)]
    # The checkout's idempotency key is the purchase's id.
    posts = [r for r in s.standin.requests if r[:2] == ("POST", "/v1/checkout/sessions")]
    assert {r[2] for r in posts} == {f"adiuva-plugin-purchase-{started['purchase_id']}"}


async def test_racing_installs_make_one_purchase_and_one_session(shop):
    s = shop
    s.standin.delay = 0.05  # every Stripe call overlaps the others
    answers = await asyncio.gather(*(s.install() for _ in range(12)))
    assert len({a["purchase_id"] for a in answers}) == 1
    assert len({a["checkout_url"] for a in answers}) == 1
    assert len(s.standin.sessions) == 1
    assert await s.rows("SELECT COUNT(*) FROM plugin_purchases") == [(1,)]
    # Two concurrent deliveries of the payment apply once.
    event = s.standin.pay(next(iter(s.standin.sessions)))
    acks = await asyncio.gather(s.deliver(event), s.deliver(event))
    assert sorted(a["outcome"] for a in acks) == ["applied", "duplicate"]
    assert await s.rows("SELECT COUNT(*) FROM plugin_ledger") == [(1,)]
    assert (await s.detail())["install_count"] == 1


async def test_a_refund_reverses_the_transfer_and_the_fee(shop):
    s = shop
    await s.buy()
    purchase = (await _json(await s.client.get(f"{API}/admin/plugins/purchases", headers=s.admin.headers)))["items"][0]
    assert (purchase["state"], purchase["fee_cents"], purchase["developer_cents"]) == ("paid", 150, 349)
    # Not for everyone.
    resp = await s.client.post(f"{API}/admin/plugins/purchases/{purchase['id']}/refund", headers=s.buyer.headers)
    assert resp.status == 403
    refunded = await _json(await s.client.post(f"{API}/admin/plugins/purchases/{purchase['id']}/refund",
                                               headers=s.admin.headers))
    assert refunded["state"] == "refunded" and refunded["refunded_at"]
    refund = next(iter(s.standin.refunds.values()))
    assert refund["amount"] == 499
    charge = s.standin.charges[refund["charge"]]
    assert s.standin.transfers[charge["transfer"]]["amount_reversed"] == 499
    fee = s.standin.application_fees[charge["application_fee"]]
    assert fee["amount_refunded"] == 150
    assert s.standin.balances() == {s.account: 0, None: 0}
    refund_posts = [r for r in s.standin.requests if r[:2] == ("POST", "/v1/refunds")]
    assert [r[2] for r in refund_posts] == [f"adiuva-plugin-refund-{purchase['id']}"]
    assert "timebox" not in await s.installed()
    assert (await s.detail())["install_count"] == 0
    assert await s.rows("SELECT kind, gross_cents, fee_cents, developer_cents FROM plugin_ledger ORDER BY seq") == [
        ("sale", 499, 150, 349), ("refund", -499, -150, -349)]
    # Stripe's charge.refunded arriving afterwards changes nothing; a second refund is refused.
    assert (await s.deliver(s.standin.events[-1]))["outcome"] == "applied"
    assert len(await s.rows("SELECT * FROM plugin_ledger")) == 2
    problem = await _json(await s.client.post(f"{API}/admin/plugins/purchases/{purchase['id']}/refund",
                                              headers=s.admin.headers), 409)
    assert problem["code"] == "purchase_not_refundable"
    # Buying it again is a new purchase with its own checkout.
    again = await s.install()
    assert again["status"] == "awaiting_payment" and again["purchase_id"] != purchase["id"]


async def test_a_refund_made_in_stripes_dashboard_arrives_by_webhook(shop):
    s = shop
    await s.buy()
    intent = next(iter(s.standin.payment_intents))
    assert (await s.deliver(s.standin.refund_in_dashboard(intent)))["outcome"] == "applied"
    assert await s.rows("SELECT state FROM plugin_purchases") == [("refunded",)]
    assert "timebox" not in await s.installed()
    assert await s.rows("SELECT kind FROM plugin_ledger ORDER BY seq") == [("sale",), ("refund",)]


async def test_an_expired_checkout_frees_the_install_and_a_new_one_starts(shop):
    s = shop
    first = await s.install()
    session = first["checkout_url"].rsplit("/", 1)[1]
    assert (await s.deliver(s.standin.expire(session)))["outcome"] == "applied"
    assert "timebox" not in await s.installed()
    second = await s.install()
    assert second["purchase_id"] != first["purchase_id"] and second["checkout_url"] != first["checkout_url"]
    assert await s.rows("SELECT state FROM plugin_purchases ORDER BY created_at") == [("expired",), ("pending",)]


async def test_a_stale_pending_checkout_is_replaced(shop):
    s = shop
    first = await s.install()
    service = s.client.app[MARKETPLACE]
    service.clock = lambda: dt.datetime.now(dt.UTC).timestamp() + revenue.PENDING_SECONDS + 60
    second = await s.install()
    assert second["purchase_id"] != first["purchase_id"]
    assert await s.rows("SELECT state FROM plugin_purchases ORDER BY created_unix") == [("expired",), ("pending",)]
    # Paid at the last moment on the old page: that one counts, the newer one ends.
    old_session = first["checkout_url"].rsplit("/", 1)[1]
    assert (await s.deliver(s.standin.pay(old_session)))["outcome"] == "applied"
    assert (await s.installed())["timebox"]["payment_state"] == "paid"
    assert sorted(await s.rows("SELECT id, state FROM plugin_purchases")) == sorted(
        [(first["purchase_id"], "paid"), (second["purchase_id"], "expired")])


async def test_a_payment_for_another_amount_installs_nothing(shop):
    s = shop
    started = await s.install()
    event = s.standin.pay(started["checkout_url"].rsplit("/", 1)[1])
    event["data"]["object"]["amount_total"] = 1  # signed by Stripe's secret, yet not what was due
    event["id"] = "evt_tampered"
    ack = await s.deliver(event)
    assert ack["outcome"] == "applied"
    assert (await s.installed())["timebox"]["status"] == "awaiting_payment"
    assert await s.rows("SELECT COUNT(*) FROM plugin_ledger") == [(0,)]
    detail = await s.rows("SELECT detail FROM billing_webhook_log WHERE event_id = 'evt_tampered'")
    assert "nothing installed" in detail[0][0]


async def test_the_operators_own_paid_plugin_keeps_the_whole_price(shop):
    s = shop
    mine = await s.buy(plugin="slack-notifier")  # bundled: no developer
    assert (mine["status"], mine["price_cents"]) == ("installed", 499)
    session = next(v for v in s.standin.sessions.values() if v["metadata"]["plugin_id"] == "slack-notifier")
    assert session["_intent"] == {"destination": None, "fee": None, "metadata": session["_intent"]["metadata"]}
    assert s.standin.balances() == {None: 499}
    assert await s.rows("SELECT fee_cents, developer_cents, developer_id FROM plugin_ledger") == [(499, 0, None)]


async def test_earnings_per_developer_and_period_api_and_cli(shop, tmp_path):
    s = shop
    await add_paid_plugin(s.client, s.admin, s.dev, tmp_path, pid="deep-work", name="Deep Work", price=5)
    other = await register(s.client, "cy@example.org")
    await set_tier(s.client, "cy@example.org", "team")
    await s.buy()
    await s.buy(other)
    await s.buy(other, "deep-work")  # 5 cents: fee 2 (1.5 rounded half up), developer 3
    await s.buy(plugin="slack-notifier")
    report = await _json(await s.client.get(f"{API}/plugins/earnings", headers=s.dev.headers))
    today = dt.datetime.now(dt.UTC).date()
    assert (report["developer"], report["from"], report["to"]) == ("dev@example.org", str(today.replace(day=1)),
                                                                  str(today))
    assert [(i["plugin_id"], i["sales"], i["gross_cents"], i["fee_cents"], i["developer_cents"])
            for i in report["items"]] == [("deep-work", 1, 5, 2, 3), ("timebox", 2, 998, 300, 698)]
    assert report["totals"] == [{"currency": "EUR", "gross_cents": 1003, "fee_cents": 302, "developer_cents": 701}]
    assert s.standin.balances()[s.account] == 701
    # A period without sales; a bad period.
    tomorrow = str(today + dt.timedelta(days=1))
    empty = await _json(await s.client.get(f"{API}/plugins/earnings", headers=s.dev.headers,
                                           params={"from": tomorrow, "to": tomorrow}))
    assert empty["items"] == [] and empty["totals"] == []
    bad = await _json(await s.client.get(f"{API}/plugins/earnings", headers=s.dev.headers,
                                         params={"from": tomorrow, "to": str(today)}), 422)
    assert bad["code"] == "validation_error"
    bad = await _json(await s.client.get(f"{API}/plugins/earnings", headers=s.dev.headers, params={"from": "soon"}), 422)
    # Someone who is not a developer.
    assert (await _json(await s.client.get(f"{API}/plugins/earnings", headers=s.buyer.headers), 404))["code"] == "not_found"
    # The admin sees every developer and the operator's own sales.
    everyone = await _json(await s.client.get(f"{API}/admin/plugins/earnings", headers=s.admin.headers))
    assert [(i["developer"], i["plugin_id"], i["developer_cents"]) for i in everyone["items"]] == [
        ("dev@example.org", "deep-work", 3), ("dev@example.org", "timebox", 698), (None, "slack-notifier", 0)]
    assert everyone["totals"] == [{"currency": "EUR", "gross_cents": 1502, "fee_cents": 801, "developer_cents": 701}]
    one = await _json(await s.client.get(f"{API}/admin/plugins/earnings", headers=s.admin.headers,
                                         params={"developer": "DEV@example.org"}))
    assert one["items"] == report["items"]
    # The CLI prints the same report.
    result = await asyncio.to_thread(cli, s.data_dir, s.standin, "plugin", "earnings", "--developer",
                                     "dev@example.org", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == report
    result = await asyncio.to_thread(cli, s.data_dir, s.standin, "plugin", "earnings")
    assert result.exit_code == 0, result.output
    assert "total EUR: gross 15.02 EUR, fee 8.01 EUR, developers 7.01 EUR" in result.output
    result = await asyncio.to_thread(cli, s.data_dir, s.standin, "plugin", "earnings", "--from", "yesterday")
    assert result.exit_code == 2 and "YYYY-MM-DD" in result.output


async def test_developer_accounts_are_checked_and_unpaid_developers_cannot_sell(shop, tmp_path):
    s = shop
    bad = await asyncio.to_thread(s.developer_add, "dev@example.org", "--stripe-account", "acct 1")
    assert bad.exit_code == 2 and "acct_" in bad.output
    missing = await asyncio.to_thread(s.developer_add, "nobody@example.org", "--stripe-account", s.account)
    assert missing.exit_code == 1 and "no account has the email" in missing.output
    unknown = await asyncio.to_thread(s.developer_add, "dev@example.org", "--stripe-account", "acct_unknown1")
    assert unknown.exit_code == 1 and "no connected account" in unknown.output
    pending = s.standin.add_account(transfers="inactive")
    inactive = await asyncio.to_thread(s.developer_add, "dev@example.org", "--stripe-account", pending)
    assert inactive.exit_code == 1 and "onboarding" in inactive.output
    taken = await asyncio.to_thread(s.developer_add, "buyer@example.org", "--stripe-account", s.account)
    assert taken.exit_code == 1 and "another developer" in taken.output
    assert await s.rows("SELECT stripe_account FROM plugin_developers") == [(s.account,)]  # unchanged
    listed = await asyncio.to_thread(cli, s.data_dir, s.standin, "plugin", "developer", "list")
    assert listed.exit_code == 0 and f"dev@example.org  {s.account}" in listed.output
    # A developer without a connected account: their paid plugin is not for sale yet.
    indie = await register(s.client, "indie@example.org")
    await set_tier(s.client, "indie@example.org", "power")
    await add_paid_plugin(s.client, s.admin, indie, tmp_path, pid="mood-board", name="Mood Board", price=299)
    problem = await s.install(plugin="mood-board", status=409)
    assert problem["code"] == "developer_not_payable"
    assert "mood-board" not in await s.installed() and await s.rows("SELECT COUNT(*) FROM plugin_purchases") == [(0,)]
    # Once added (and made the owner of a bundled plugin too), both sell through their account.
    account = s.standin.add_account()
    added = await asyncio.to_thread(s.developer_add, "indie@example.org", "--stripe-account", account,
                                    "--plugin", "time-tracker")
    assert added.exit_code == 0, added.output
    started = await s.install(plugin="mood-board")
    assert s.standin.sessions[started["checkout_url"].rsplit("/", 1)[1]]["_intent"]["destination"] == account
    started = await s.install(plugin="time-tracker")
    intent = s.standin.sessions[started["checkout_url"].rsplit("/", 1)[1]]["_intent"]
    assert (intent["destination"], intent["fee"]) == (account, 300)  # EUR 9.99


async def test_without_a_stripe_key_or_license_paid_plugins_are_refused_cleanly(aiohttp_client, data_dir, stripe_standin):
    client = await aiohttp_client(create_app(licensed(data_dir, stripe_standin, stripe_secret_key="")))
    acct = await register(client)
    await set_tier(client, acct.email, "team")
    problem = await _json(await client.post(f"{API}/plugins/slack-notifier/install", headers=acct.headers), 503)
    assert problem["code"] == "billing_not_configured"
    assert (await _json(await client.get(f"{API}/plugins/installed", headers=acct.headers)))["items"] == []
    await _json(await client.post(f"{API}/plugins/github-sync/install", headers=acct.headers))  # free: as usual
    assert stripe_standin.requests == []


async def test_homelab_mode_has_no_earnings_and_ignores_the_webhook(client, account):
    problem = await _json(await client.get(f"{API}/plugins/earnings", headers=account.headers), 403)
    assert problem["code"] == "licensed_mode_required"
    body = b'{"id": "evt_1"}'
    resp = await client.post(f"{API}/billing/webhook", data=body,
                             headers={"Stripe-Signature": sign(body, "whsec_x"), "Content-Type": "application/json"})
    assert resp.status == 404 and (await resp.json())["code"] == "billing_not_enabled"


async def test_the_cli_lists_purchases_and_refunds_one(shop):
    s = shop
    await s.buy()
    listed = await asyncio.to_thread(cli, s.data_dir, s.standin, "plugin", "purchases", "--json")
    assert listed.exit_code == 0, listed.output
    purchase = json.loads(listed.output.splitlines()[0])
    assert (purchase["state"], purchase["plugin_id"], purchase["destination"]) == ("paid", "timebox", s.account)
    done = await asyncio.to_thread(cli, s.data_dir, s.standin, "plugin", "refund", purchase["id"])
    assert done.exit_code == 0, done.output
    assert "4.99 EUR back to the buyer (3.49 EUR reversed from the developer)" in done.output
    assert s.standin.balances() == {s.account: 0, None: 0}
    assert "timebox" not in await s.installed()
    twice = await asyncio.to_thread(cli, s.data_dir, s.standin, "plugin", "refund", purchase["id"])
    assert twice.exit_code == 1 and "only a paid purchase can be refunded" in twice.output
    unknown = await asyncio.to_thread(cli, s.data_dir, s.standin, "plugin", "refund", "nope")
    assert unknown.exit_code == 1 and "no such purchase" in unknown.output
    assert len(s.standin.refunds) == 1
