"""Paid plugins: the split, purchases, developers and the revenue ledger (migrations 0013 on
SQLite, postgres/0006). Each function here is one transaction's work, written once against `Tx`,
a four-method view of a connection that both backends provide (sqlite.py and postgres.py), so the
money rules cannot differ between them.

The rules:
- The split is fixed when the purchase row is written: the platform's fee is 30 % of the price in
  integer cents, rounded half up; the developer gets the rest (price - fee), so the two always sum
  to what the buyer paid. A plugin without a developer (bundled, or submitted by the admin) is the
  operator's own: the operator keeps the whole price and nothing is transferred.
- One user holds at most one open (pending) or paid purchase of a plugin (a partial unique index):
  a second or concurrent install, or a retry, finds that row, whose id is the idempotency key of
  its Stripe checkout, so Stripe makes one session and the buyer pays once.
- A payment counts when Stripe's signed webhook says so, for the exact amount and currency of the
  row; a refund reverses the developer's transfer and the fee. The ledger gets one 'sale' and at
  most one 'refund' per purchase, and is never updated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from adiuva_server import errors

FEE_PERCENT = 30
# A Checkout session lives 24 h at Stripe; a pending purchase older than this is replaced by a
# new one (and a new session) instead of sending the buyer to a dead page.
PENDING_SECONDS = 23 * 3600


def split(price_cents: int) -> tuple[int, int]:
    """(platform fee, developer share) of a price in cents: the fee is 30 %, rounded half up."""
    if price_cents < 0:
        raise ValueError("a price is never negative")
    fee = (price_cents * FEE_PERCENT + 50) // 100
    return fee, price_cents - fee


class Tx(Protocol):
    """One transaction's connection. SQL uses `?` placeholders on both backends; `lock` is appended
    to SELECTs whose rows the transaction goes on to change (PostgreSQL's row lock; SQLite's single
    writer needs none)."""

    lock: str

    async def row(self, sql: str, *args: Any) -> Any: ...
    async def rows(self, sql: str, *args: Any) -> list[Any]: ...
    async def run(self, sql: str, *args: Any) -> int:
        """Rows changed."""


@dataclass(frozen=True, slots=True)
class Purchase:
    id: str
    user_id: str | None
    plugin_id: str
    state: str  # pending | paid | refunded | expired
    price_cents: int
    currency: str
    fee_cents: int
    developer_cents: int
    developer_id: str | None
    destination: str | None
    checkout_session: str | None
    checkout_url: str | None
    payment_intent: str | None
    created_at: str
    created_unix: int
    paid_at: str | None
    refunded_at: str | None


_PURCHASE = ("id, user_id, plugin_id, state, price_cents, currency, fee_cents, developer_cents, developer_id, "
             "destination, checkout_session, checkout_url, payment_intent, created_at, created_unix, paid_at, refunded_at")


def _purchase(r: Any) -> Purchase:
    return Purchase(*(r[i] for i in range(17)))


@dataclass(frozen=True, slots=True)
class Developer:
    user_id: str
    email: str
    stripe_account: str
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class Earnings:
    """One developer's takings from one plugin in one currency over a period."""

    developer_id: str | None  # None: the operator's own plugins
    email: str | None
    plugin_id: str
    currency: str
    sales: int
    refunds: int
    gross_cents: int
    fee_cents: int
    developer_cents: int


@dataclass(frozen=True, slots=True)
class Opened:
    """What an install of a paid plugin found or made: the purchase to pay (`purchase`, with its
    checkout when one was made already), or nothing to pay (`installed`: paid before)."""

    purchase: Purchase | None
    installed: bool


class DeveloperNotPayable(errors.Conflict):
    code = "developer_not_payable"
    title = "This plugin cannot be sold yet"


class PurchaseNotRefundable(errors.Conflict):
    code = "purchase_not_refundable"
    title = "This purchase cannot be refunded"


class RevenueMethods:
    """The store methods of paid plugins, the same on both backends: each runs one function
    below in one transaction; the store gives `_write` (a write transaction) and `_read`."""

    async def open_purchase(self, user_id: str, plugin_id: str, purchase_id: str, now: str,
                            now_unix: int) -> Opened:
        return await self._write(open_purchase, user_id, plugin_id, purchase_id, now, now_unix)

    async def set_checkout(self, purchase_id: str, session_id: str, url: str) -> Purchase:
        return await self._write(set_checkout, purchase_id, session_id, url)

    async def purchase(self, purchase_id: str) -> Purchase:
        return await self._read(purchase, purchase_id)

    async def purchases(self, user_id: str | None, limit: int) -> list[Purchase]:
        return await self._read(purchases, user_id, limit)

    async def complete_purchase(self, purchase_id: str, session_id: str, payment_intent: str | None, amount: int,
                                currency: str, now: str) -> str:
        return await self._write(complete, purchase_id, session_id, payment_intent, amount, currency, now)

    async def expire_purchase(self, session_id: str) -> str:
        return await self._write(expire, session_id)

    async def refundable(self, purchase_id: str) -> Purchase:
        return await self._read(refundable, purchase_id)

    async def refunded(self, *, purchase_id: str | None = None, payment_intent: str | None = None,
                       refund_id: str | None, now: str) -> str:
        return await self._write(refunded, purchase_id=purchase_id, payment_intent=payment_intent,
                                 refund_id=refund_id, now=now)

    async def add_developer(self, email: str, stripe_account: str, plugin_ids: list[str], now: str) -> Developer:
        return await self._write(add_developer, email, stripe_account, plugin_ids, now)

    async def developers(self, user_id: str | None = None) -> list[Developer]:
        return await self._read(developers, user_id)

    async def earnings(self, developer_id: str | None, since: str, until: str, *,
                       everyone: bool) -> list[Earnings]:
        return await self._read(earnings, developer_id, since, until, everyone=everyone)


# -- installs ----------------------------------------------------------------------------------


async def open_purchase(tx: Tx, user_id: str, plugin_id: str, purchase_id: str, now: str, now_unix: int) -> Opened:
    """The purchase an install of a paid plugin pays: the user's open one, or a new one (the split
    fixed now, the installation 'awaiting_payment'); none when the user paid before (then the
    installation is 'installed' again, free of a second charge)."""
    plugin = await tx.row("SELECT status, price_cents, currency, owner_id FROM plugins WHERE id = ?", plugin_id)
    if plugin is None or plugin["status"] != "approved":
        raise errors.NotFound("no such plugin")
    installed = await tx.row("SELECT 1 FROM plugin_installs WHERE user_id = ? AND plugin_id = ? AND state = 'installed'",
                             user_id, plugin_id)
    if installed is not None:  # installed already (paid, or while it was free): nothing to charge
        return Opened(None, True)
    held = await tx.row(f"SELECT {_PURCHASE} FROM plugin_purchases WHERE user_id = ? AND plugin_id = ? "
                        f"AND state IN ('pending', 'paid'){tx.lock}", user_id, plugin_id)
    if held is not None and held["state"] == "paid":
        await tx.run("UPDATE plugin_installs SET state = 'installed', installed_at = ?, uninstalled_at = NULL "
                     "WHERE user_id = ? AND plugin_id = ? AND state != 'installed'", now, user_id, plugin_id)
        return Opened(None, True)
    if held is not None and held["created_unix"] >= now_unix - PENDING_SECONDS:
        return Opened(_purchase(held), False)
    if held is not None:  # its checkout has (nearly) expired: a new purchase replaces it
        await tx.run("UPDATE plugin_purchases SET state = 'expired' WHERE id = ? AND state = 'pending'", held["id"])
    developer_id, destination = plugin["owner_id"], None
    if developer_id is not None:
        payee = await tx.row("SELECT stripe_account FROM plugin_developers WHERE user_id = ?", developer_id)
        if payee is None:
            raise DeveloperNotPayable("this plugin's developer has not connected a Stripe account to this server "
                                      "yet, so it cannot be sold; try again later")
        destination = payee["stripe_account"]
    price = plugin["price_cents"]
    fee, share = split(price)
    if developer_id is None:
        fee, share = price, 0  # the operator's own plugin: nothing to transfer
    # A concurrent install of the same user (another node) may insert first: then this one
    # waits for it, inserts nothing, and reads that row instead.
    inserted = await tx.run(
        f"INSERT INTO plugin_purchases ({_PURCHASE}) VALUES (?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, "
        "?, ?, NULL, NULL) ON CONFLICT (user_id, plugin_id) WHERE state IN ('pending', 'paid') DO NOTHING",
        purchase_id, user_id, plugin_id, price, plugin["currency"], fee, share, developer_id, destination, now, now_unix)
    current = await tx.row(f"SELECT {_PURCHASE} FROM plugin_purchases WHERE user_id = ? AND plugin_id = ? "
                           "AND state IN ('pending', 'paid')", user_id, plugin_id)
    if not inserted:
        return Opened(None, True) if current["state"] == "paid" else Opened(_purchase(current), False)
    await tx.run(
        "INSERT INTO plugin_installs (user_id, plugin_id, state, price_cents, currency, payment_state, payment_ref, "
        "first_installed_at, installed_at) VALUES (?, ?, 'awaiting_payment', ?, ?, 'pending', ?, ?, ?) "
        "ON CONFLICT (user_id, plugin_id) DO UPDATE SET state = 'awaiting_payment', price_cents = excluded.price_cents, "
        "currency = excluded.currency, payment_state = 'pending', payment_ref = excluded.payment_ref, "
        "installed_at = excluded.installed_at, uninstalled_at = NULL WHERE plugin_installs.state != 'installed'",
        user_id, plugin_id, price, plugin["currency"], purchase_id, now, now)
    return Opened(_purchase(current), False)


async def set_checkout(tx: Tx, purchase_id: str, session_id: str, url: str) -> Purchase:
    """Record the purchase's Checkout session (the same one on a retry: the idempotency key)."""
    await tx.run("UPDATE plugin_purchases SET checkout_session = ?, checkout_url = ? "
                 "WHERE id = ? AND (checkout_session IS NULL OR checkout_session = ?)",
                 session_id, url, purchase_id, session_id)
    return await purchase(tx, purchase_id)


async def purchase(tx: Tx, purchase_id: str) -> Purchase:
    r = await tx.row(f"SELECT {_PURCHASE} FROM plugin_purchases WHERE id = ?", purchase_id)
    if r is None:
        raise errors.NotFound("no such purchase")
    return _purchase(r)


async def purchases(tx: Tx, user_id: str | None, limit: int) -> list[Purchase]:
    if user_id is None:
        rows = await tx.rows(f"SELECT {_PURCHASE} FROM plugin_purchases ORDER BY created_at DESC, id LIMIT ?", limit)
    else:
        rows = await tx.rows(f"SELECT {_PURCHASE} FROM plugin_purchases WHERE user_id = ? "
                             "ORDER BY created_at DESC, id LIMIT ?", user_id, limit)
    return [_purchase(r) for r in rows]


# -- Stripe's side, from signed webhooks --------------------------------------------------------


async def complete(tx: Tx, purchase_id: str, session_id: str, payment_intent: str | None, amount: int,
                   currency: str, now: str) -> str:
    """A Checkout session was paid: the purchase is paid, the plugin installed, the sale in the
    ledger; all or nothing. Returns what happened, in words (for the webhook log)."""
    r = await tx.row(f"SELECT {_PURCHASE} FROM plugin_purchases WHERE id = ?{tx.lock}", purchase_id)
    if r is None:
        return "no such purchase on this server: nothing installed"
    p = _purchase(r)
    if p.checkout_session not in (None, session_id):
        return f"purchase {p.id} belongs to another checkout session: nothing installed"
    if amount != p.price_cents or currency.upper() != p.currency.upper():
        return (f"purchase {p.id}: paid {amount} {currency} where {p.price_cents} {p.currency} was due: "
                "nothing installed (refund it)")
    if p.state in ("paid", "refunded"):
        return f"purchase {p.id} was {p.state} before: nothing changed"
    if p.state == "expired":  # paid at the last moment after a newer purchase replaced it
        other = await tx.row("SELECT id, state FROM plugin_purchases WHERE user_id = ? AND plugin_id = ? "
                             f"AND state IN ('pending', 'paid') AND id != ?{tx.lock}", p.user_id, p.plugin_id, p.id)
        if other is not None and other["state"] == "paid":
            return f"purchase {p.id}: the plugin was paid by purchase {other['id']} already (refund this one)"
        if other is not None:
            await tx.run("UPDATE plugin_purchases SET state = 'expired' WHERE id = ?", other["id"])
    await tx.run("UPDATE plugin_purchases SET state = 'paid', paid_at = ?, payment_intent = ?, "
                 "checkout_session = COALESCE(checkout_session, ?) WHERE id = ?", now, payment_intent, session_id, p.id)
    if p.user_id is not None:
        await tx.run(
            "INSERT INTO plugin_installs (user_id, plugin_id, state, price_cents, currency, payment_state, payment_ref, "
            "first_installed_at, installed_at) VALUES (?, ?, 'installed', ?, ?, 'paid', ?, ?, ?) "
            "ON CONFLICT (user_id, plugin_id) DO UPDATE SET state = 'installed', price_cents = excluded.price_cents, "
            "currency = excluded.currency, payment_state = 'paid', payment_ref = excluded.payment_ref, "
            "installed_at = excluded.installed_at, uninstalled_at = NULL",
            p.user_id, p.plugin_id, p.price_cents, p.currency, p.id, now, now)
    await _ledger(tx, p, "sale", payment_intent, now)
    return f"purchase {p.id} paid: {p.plugin_id} installed; fee {p.fee_cents}, developer {p.developer_cents} {p.currency}"


async def expire(tx: Tx, session_id: str) -> str:
    """A Checkout session expired unpaid: its purchase ends; the installation it awaited goes."""
    r = await tx.row(f"SELECT id, user_id, plugin_id, state FROM plugin_purchases WHERE checkout_session = ?{tx.lock}",
                     session_id)
    if r is None:
        return "no purchase has this session: nothing changed"
    if r["state"] != "pending":
        return f"purchase {r['id']} is {r['state']}: nothing changed"
    await tx.run("UPDATE plugin_purchases SET state = 'expired' WHERE id = ?", r["id"])
    await tx.run("DELETE FROM plugin_installs WHERE user_id = ? AND plugin_id = ? AND state = 'awaiting_payment' "
                 "AND payment_ref = ?", r["user_id"], r["plugin_id"], r["id"])
    return f"purchase {r['id']} expired unpaid"


async def refundable(tx: Tx, purchase_id: str) -> Purchase:
    p = await purchase(tx, purchase_id)
    if p.state != "paid" or not p.payment_intent:
        raise PurchaseNotRefundable(f"purchase {p.id} is {p.state}; only a paid purchase can be refunded")
    return p


async def refunded(tx: Tx, *, purchase_id: str | None = None, payment_intent: str | None = None,
                   refund_id: str | None, now: str) -> str:
    """The purchase was refunded in full (by us, or in Stripe's dashboard): the installation ends,
    the ledger gets the reversal. Idempotent."""
    if purchase_id is not None:
        r = await tx.row(f"SELECT {_PURCHASE} FROM plugin_purchases WHERE id = ?{tx.lock}", purchase_id)
    else:
        r = await tx.row(f"SELECT {_PURCHASE} FROM plugin_purchases WHERE payment_intent = ?{tx.lock}", payment_intent)
    if r is None:
        return "no purchase has this payment: nothing changed"
    p = _purchase(r)
    if p.state != "paid":
        return f"purchase {p.id} is {p.state}: nothing changed"
    await tx.run("UPDATE plugin_purchases SET state = 'refunded', refunded_at = ? WHERE id = ?", now, p.id)
    if p.user_id is not None:
        await tx.run("UPDATE plugin_installs SET state = 'uninstalled', payment_state = 'refunded', uninstalled_at = ? "
                     "WHERE user_id = ? AND plugin_id = ? AND payment_ref = ?", now, p.user_id, p.plugin_id, p.id)
    await _ledger(tx, p, "refund", refund_id, now)
    return f"purchase {p.id} refunded: {p.plugin_id} uninstalled"


async def _ledger(tx: Tx, p: Purchase, kind: str, ref: str | None, now: str) -> None:
    sign = 1 if kind == "sale" else -1
    await tx.run("INSERT INTO plugin_ledger (purchase_id, kind, plugin_id, developer_id, destination, currency, "
                 "gross_cents, fee_cents, developer_cents, stripe_ref, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                 "ON CONFLICT (purchase_id, kind) DO NOTHING",
                 p.id, kind, p.plugin_id, p.developer_id, p.destination, p.currency, sign * p.price_cents,
                 sign * p.fee_cents, sign * p.developer_cents, ref, now)


# -- developers and earnings -------------------------------------------------------------------


async def add_developer(tx: Tx, email: str, stripe_account: str, plugin_ids: list[str], now: str) -> Developer:
    """Make the account with this email a developer paid through `stripe_account` (again: the
    account is replaced), and the owner of `plugin_ids`."""
    user = await tx.row("SELECT id, email FROM users WHERE lower(email) = lower(?)", email)
    if user is None:
        raise errors.NotFound(f"no account has the email {email}")
    taken = await tx.row("SELECT user_id FROM plugin_developers WHERE stripe_account = ? AND user_id != ?",
                         stripe_account, user["id"])
    if taken is not None:
        raise errors.Conflict(f"{stripe_account} is the connected account of another developer")
    for plugin_id in plugin_ids:
        if await tx.run("UPDATE plugins SET owner_id = ? WHERE id = ?", user["id"], plugin_id) != 1:
            raise errors.NotFound(f"no plugin has the id {plugin_id}")
    await tx.run("INSERT INTO plugin_developers (user_id, stripe_account, created_at, updated_at) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT (user_id) DO UPDATE SET stripe_account = excluded.stripe_account, "
                 "updated_at = excluded.updated_at", user["id"], stripe_account, now, now)
    return (await developers(tx, user["id"]))[0]


async def developers(tx: Tx, user_id: str | None = None) -> list[Developer]:
    sql = ("SELECT d.user_id, u.email, d.stripe_account, d.created_at, d.updated_at FROM plugin_developers d "
           "JOIN users u ON u.id = d.user_id")
    rows = await (tx.rows(f"{sql} WHERE d.user_id = ?", user_id) if user_id else tx.rows(f"{sql} ORDER BY u.email"))
    return [Developer(r[0], r[1], r[2], r[3], r[4]) for r in rows]


async def earnings(tx: Tx, developer_id: str | None, since: str, until: str, *, everyone: bool) -> list[Earnings]:
    """The ledger summed per developer, plugin and currency for entries at `since` <= at < `until`:
    one developer's (`developer_id`), or with `everyone` all of them and the operator's own (None)."""
    where, args = "l.at >= ? AND l.at < ?", [since, until]
    if not everyone:
        where += " AND l.developer_id = ?"
        args.append(developer_id)
    rows = await tx.rows(
        "SELECT l.developer_id, u.email, l.plugin_id, l.currency, "
        "SUM(CASE WHEN l.kind = 'sale' THEN 1 ELSE 0 END), SUM(CASE WHEN l.kind = 'refund' THEN 1 ELSE 0 END), "
        "SUM(l.gross_cents), SUM(l.fee_cents), SUM(l.developer_cents) FROM plugin_ledger l "
        f"LEFT JOIN users u ON u.id = l.developer_id WHERE {where} "
        "GROUP BY l.developer_id, u.email, l.plugin_id, l.currency "
        "ORDER BY u.email IS NULL, u.email, l.plugin_id, l.currency", *args)
    return [Earnings(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), int(r[7]), int(r[8])) for r in rows]
