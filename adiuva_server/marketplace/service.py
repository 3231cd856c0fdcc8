"""The marketplace: what users, developers and reviewers can do, for the routes and the
`adiuva plugin` CLI alike. Tier gates come from the caller's tier as the database has it now
(the Principal), never from the client.

Paid plugins (licensed mode; revenue.py has the money rules): installing one opens a purchase
(one per user and plugin, written before Stripe is called) and a Stripe Checkout session that is a
Connect destination charge with the platform's 30 % as the application fee; the signed webhook
`checkout.session.completed` installs it. Refunds reverse the developer's transfer and the fee.
In homelab mode a paid plugin answers 403 `licensed_mode_required`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from adiuva_server import errors, tiers
from adiuva_server.config import Settings
from adiuva_server.license.state import LicenseState
from adiuva_server.marketplace import checks, revenue
from adiuva_server.marketplace.checks import Limits
from adiuva_server.marketplace.signing import SigningKey
from adiuva_server.marketplace.store import (
    Installation, MarketplaceStore, NewVersion, PackageBytes, Plugin, Review, UserView, Version,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 20
FEATURE = "plugin_marketplace"
BUNDLED_FOLDER = "plugins"
STRIPE_ACCOUNT = re.compile(r"^acct_[A-Za-z0-9]{1,64}$")
PURCHASE_KIND = "plugin_purchase"  # the metadata.kind of our plugin checkouts


def licensed_mode(license: LicenseState | None) -> bool:
    """Whether the licensed-mode parts of the marketplace are on (paid plugins, developer
    submissions): the one place that decides it, from the license's live state (a license naming
    `marketplace`, expired included). No state (a CLI tool on its own): homelab mode."""
    return license is not None and license.allows("marketplace")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def bundled_dir(settings: Settings) -> Path | None:
    """The bundled plugins: ADIUVA_PLUGINS_DIR when set ("" turns them off), else `plugins/`
    inside the one-file binary (adiuva.spec puts it there) or beside the package in a checkout."""
    if settings.plugins_dir is not None:
        return Path(settings.plugins_dir).expanduser() if settings.plugins_dir else None
    frozen = getattr(sys, "_MEIPASS", None)
    base = Path(frozen) if frozen else Path(__file__).resolve().parents[2]
    folder = base / BUNDLED_FOLDER
    return folder if folder.is_dir() else None


def limits(settings: Settings) -> Limits:
    return Limits(settings.plugin_max_package_bytes, settings.plugin_max_unpacked_bytes, settings.plugin_max_files)


@dataclass(frozen=True)
class Detail:
    plugin: Plugin
    version: Version
    mine: UserView


@dataclass(frozen=True)
class ReviewRecord:
    plugin: Plugin
    versions: list[Version]
    reviews: list[Review]


@dataclass(frozen=True)
class EarningsReport:
    developer: str | None  # the developer's email; None: every developer and the operator
    since: dt.date
    until: dt.date  # inclusive
    items: list[revenue.Earnings]


class MarketplaceService:
    def __init__(self, settings: Settings, store: MarketplaceStore, license: LicenseState | None = None,
                 gateway: Any = None, clock=time.time) -> None:
        self.settings = settings
        self.license = license
        self.store = store
        self.gateway = gateway  # billing/stripe_api.StripeGateway; None: no STRIPE_SECRET_KEY
        self.clock = clock
        self.limits = limits(settings)
        self._key: SigningKey | None = None

    async def signing_key(self) -> SigningKey:
        if self._key is None:
            # Generated here, kept only if no process stored one first (the store decides).
            self._key = await self.store.signing_key(SigningKey.generate(), now_iso())
        return self._key

    # -- users ----------------------------------------------------------------------------------

    @staticmethod
    def gate(principal) -> None:
        tiers.require_feature(principal.tier, FEATURE)

    async def browse(self, principal, *, category: str | None, q: str | None, sort: str,
                     page: int) -> tuple[list[Plugin], int]:
        self.gate(principal)
        return await self.store.browse(category=category or None, q=(q or "").strip() or None, sort=sort,
                                       offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE)

    async def _listed(self, plugin_id: str) -> Plugin:
        plugin = await self.store.plugin(plugin_id)
        if plugin is None or plugin.status != "approved":
            raise errors.NotFound("no such plugin")  # pending, rejected and revoked ones alike
        return plugin

    async def detail(self, principal, plugin_id: str) -> Detail:
        self.gate(principal)
        plugin = await self._listed(plugin_id)
        version = next(v for v in await self.store.versions(plugin_id)
                       if v.status == "approved" and v.version == plugin.version)
        return Detail(plugin, version, await self.store.user_view(principal.id, plugin_id))

    async def install(self, principal, plugin_id: str) -> Installation:
        self.gate(principal)
        plugin = await self._listed(plugin_id)
        if plugin.price_cents > 0:
            return await self._install_paid(principal, plugin)
        installation = await self.store.install(principal.id, plugin_id, now_iso())
        if installation is None:  # revoked, or repriced, between the two reads
            raise errors.Conflict(f"{plugin_id} changed while installing; try again")
        return installation

    async def _install_paid(self, principal, plugin: Plugin) -> Installation:
        price = f"{plugin.currency} {plugin.price_cents // 100}.{plugin.price_cents % 100:02d}"
        if not licensed_mode(self.license):
            raise errors.LicensedModeRequired(
                f"{plugin.name} costs {price}: paid plugins need a licensed server (this one runs in homelab mode, "
                "without billing); free plugins install as usual")
        self.license.require_new_sales("marketplace")  # an expired license sells nothing new
        stripe = self._stripe()
        opened = await self.store.open_purchase(principal.id, plugin.id, str(uuid.uuid4()), now_iso(), int(self.clock()))
        if opened.purchase is None:  # paid before: installed again, nothing charged
            return await self._installation(principal.id, plugin.id)
        purchase = opened.purchase
        if purchase.checkout_url is None:
            # Outside every transaction. The purchase id is the idempotency key: a concurrent
            # install that found this purchase gets this same session from Stripe.
            base = self.settings.billing_return_url
            sep = "&" if "?" in base else "?"
            session = await stripe.create_plugin_checkout(
                purchase_id=purchase.id, user_id=principal.id, email=principal.email, plugin_id=plugin.id,
                name=plugin.name, amount=purchase.price_cents, currency=purchase.currency, fee=purchase.fee_cents,
                destination=purchase.destination,
                success_url=f"{base}{sep}plugin={plugin.id}&checkout=success&session_id={{CHECKOUT_SESSION_ID}}",
                cancel_url=f"{base}{sep}plugin={plugin.id}&checkout=canceled")
            purchase = await self.store.set_checkout(purchase.id, session["id"], session["url"])
        installation = await self._installation(principal.id, plugin.id)
        return dataclasses.replace(installation, checkout_url=purchase.checkout_url, purchase_id=purchase.id)

    async def _installation(self, user_id: str, plugin_id: str) -> Installation:
        found = [i for i in await self.store.installed(user_id) if i.plugin_id == plugin_id]
        if not found:
            raise errors.Conflict(f"{plugin_id} changed while installing; try again")
        return found[0]

    def _stripe(self):
        if self.gateway is None:
            raise errors.BillingNotConfigured(
                "this server has no Stripe key (STRIPE_SECRET_KEY), so paid plugins cannot be sold here; "
                "free plugins install as usual")
        return self.gateway

    # -- payments: Stripe's signed webhooks (billing/service.py verifies and logs them) ----------

    async def payment_event(self, kind: str, obj: dict[str, Any]) -> str | None:
        """Apply an event about a plugin payment and say what happened; None when the event is not
        about one (billing handles it). Each outcome is idempotent: a redelivery changes nothing."""
        if kind.startswith("checkout.session."):
            metadata = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
            if obj.get("mode") != "payment" or metadata.get("kind") != PURCHASE_KIND:
                return None
            purchase_id, session_id = metadata.get("purchase_id"), obj.get("id")
            if not (isinstance(purchase_id, str) and isinstance(session_id, str)):
                return "a plugin checkout without its purchase id: nothing changed"
            if kind == "checkout.session.expired":
                return self._said(await self.store.expire_purchase(session_id))
            if kind not in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
                return f"{kind}: nothing to do for a plugin purchase"
            if obj.get("payment_status") != "paid":
                return f"purchase {purchase_id}: not paid yet ({obj.get('payment_status')}); waiting for Stripe"
            amount, currency, intent = obj.get("amount_total"), obj.get("currency"), obj.get("payment_intent")
            intent = intent.get("id") if isinstance(intent, dict) else intent
            if not (isinstance(amount, int) and isinstance(currency, str) and isinstance(intent, str)):
                return f"purchase {purchase_id}: the session lacks its amount, currency or payment: nothing installed"
            return self._said(await self.store.complete_purchase(purchase_id, session_id, intent, amount, currency,
                                                                 now_iso()))
        if kind == "charge.refunded":
            intent = obj.get("payment_intent")
            intent = intent.get("id") if isinstance(intent, dict) else intent
            if not isinstance(intent, str) or obj.get("amount_refunded") != obj.get("amount"):
                return None  # not ours, or a partial refund: a purchase stays paid
            refunds = obj.get("refunds", {}).get("data") if isinstance(obj.get("refunds"), dict) else None
            refund_id = refunds[0].get("id") if refunds and isinstance(refunds[0], dict) else None
            outcome = await self.store.refunded(payment_intent=intent, refund_id=refund_id, now=now_iso())
            return None if outcome.startswith("no purchase") else self._said(outcome)
        return None

    @staticmethod
    def _said(outcome: str) -> str:
        (log.warning if "refund this" in outcome or "refund it" in outcome else log.info)("plugin payment: %s", outcome)
        return outcome

    async def refund(self, purchase_id: str, *, by: str) -> revenue.Purchase:
        """Refund a paid purchase in full at Stripe (the transfer and the fee reversed), then here:
        the plugin is uninstalled and the ledger records the reversal."""
        purchase = await self.store.refundable(purchase_id)
        stripe = self._stripe()
        refund_id = await stripe.refund_plugin(purchase_id=purchase.id, payment_intent=purchase.payment_intent,
                                               transferred=purchase.destination is not None)
        outcome = await self.store.refunded(purchase_id=purchase.id, refund_id=refund_id, now=now_iso())
        log.info("plugin refund by %s: %s", by, outcome)
        return await self.store.purchase(purchase.id)

    async def purchases(self, user_id: str | None = None, limit: int = 100) -> list[revenue.Purchase]:
        return await self.store.purchases(user_id, limit)

    # -- developers and their earnings -----------------------------------------------------------

    async def add_developer(self, email: str, stripe_account: str, plugin_ids: list[str]) -> revenue.Developer:
        """Pay `email`'s plugins to `stripe_account` (checked with Stripe when a key is set)."""
        if not STRIPE_ACCOUNT.match(stripe_account):
            raise errors.ValidationError.field("stripe_account", "a Stripe connected account id looks like acct_1A2b3C")
        if self.gateway is not None:
            account = await self.gateway.connected_account(stripe_account)
            if (account.get("capabilities") or {}).get("transfers") not in ("active", None):
                raise errors.Conflict(f"{stripe_account} cannot receive transfers yet (its transfers capability is "
                                      f"{account['capabilities']['transfers']}); finish its Stripe onboarding first")
        return await self.store.add_developer(email.strip(), stripe_account, plugin_ids, now_iso())

    async def developers(self) -> list[revenue.Developer]:
        return await self.store.developers()

    async def my_earnings(self, principal, since: dt.date | None, until: dt.date | None) -> EarningsReport:
        self.require_licensed()
        if not await self.store.developers(principal.id):
            raise errors.NotFound("this account is not a plugin developer on this server (its admin adds "
                                  "developers with `adiuva plugin developer add`)")
        return await self._earnings(principal.id, principal.email, since, until, everyone=False)

    async def earnings(self, developer_email: str | None, since: dt.date | None, until: dt.date | None) -> EarningsReport:
        if developer_email is None:
            return await self._earnings(None, None, since, until, everyone=True)
        found = [d for d in await self.store.developers() if d.email.lower() == developer_email.strip().lower()]
        if not found:
            raise errors.NotFound(f"{developer_email} is not a plugin developer on this server")
        return await self._earnings(found[0].user_id, found[0].email, since, until, everyone=False)

    async def _earnings(self, developer_id, email, since, until, *, everyone: bool) -> EarningsReport:
        since, until = period(since, until, dt.datetime.fromtimestamp(self.clock(), dt.UTC).date())
        items = await self.store.earnings(developer_id, f"{since.isoformat()}T00:00:00.000Z",
                                          f"{(until + dt.timedelta(days=1)).isoformat()}T00:00:00.000Z",
                                          everyone=everyone)
        return EarningsReport(email, since, until, items)

    async def uninstall(self, principal, plugin_id: str) -> None:
        # No tier gate: a user whose tier went down can still remove what they installed.
        if not await self.store.uninstall(principal.id, plugin_id, now_iso()):
            raise errors.NotFound("no such plugin")

    async def installed(self, principal) -> list[Installation]:
        return await self.store.installed(principal.id)

    async def rate(self, principal, plugin_id: str, stars: int) -> Plugin:
        self.gate(principal)
        return await self.store.rate(principal.id, plugin_id, stars, now_iso())

    async def package(self, principal, plugin_id: str) -> PackageBytes:
        self.gate(principal)
        package = await self.store.package(plugin_id)
        if package is None:
            raise errors.NotFound("no such plugin")
        return package

    # -- submissions and review -----------------------------------------------------------------

    async def submit(self, data: bytes, *, submitted_by: str, owner_id: str | None, admin: bool) -> Version:
        """Run every automated check; record the version as pending_review when all pass, else
        raise PluginChecksFailed naming each failed rule (nothing recorded)."""
        package, failures = await asyncio.to_thread(checks.check_package, data, self.limits)
        new = NewVersion(str(uuid.uuid4()), package.manifest, data, package.checksum, submitted_by, owner_id,
                         admin, now_iso())
        if _identifiable(package.manifest):
            failures += await self.store.submission_failures(new)
            if not failures:
                failures = await self.store.add_submission(new)
        if failures:
            raise errors.PluginChecksFailed(failures)
        return next(v for v in await self.store.versions(new.manifest["id"]) if v.submission_id == new.submission_id)

    def require_licensed(self) -> None:
        if not licensed_mode(self.license):
            raise errors.LicensedModeRequired("plugin submissions from developers need a licensed server; "
                                              "in homelab mode the admin submits with `adiuva plugin submit DIR`")

    async def submit_as_developer(self, principal, data: bytes) -> Version:
        self.require_licensed()
        return await self.submit(data, submitted_by=principal.id, owner_id=principal.id, admin=False)

    async def submissions_of(self, principal) -> list[Version]:
        self.require_licensed()
        return await self.store.submissions_of(principal.id)

    async def pending(self) -> list[Version]:
        return await self.store.pending()

    async def approve(self, plugin_id: str, *, reviewer: str, notes: str = "") -> Version:
        waiting = [v for v in await self.store.pending() if v.plugin_id == plugin_id]
        if not waiting:
            raise errors.NotFound(f"no version of {plugin_id} is waiting for review")
        version = waiting[0]
        key = await self.signing_key()
        signature = key.sign(plugin_id, version.version, version.checksum)
        return await self.store.approve(plugin_id, version.version, signature, key.key_id, reviewer, notes, now_iso())

    async def reject(self, plugin_id: str, *, reviewer: str, reason: str) -> Version:
        if not reason.strip():
            raise errors.ValidationError.field("reason", "say why it is rejected")
        return await self.store.reject(plugin_id, reviewer, reason.strip(), now_iso())

    async def revoke(self, plugin_id: str, *, reviewer: str, notes: str = "") -> Plugin:
        return await self.store.revoke(plugin_id, reviewer, notes, now_iso())

    async def review_record(self, plugin_id: str) -> ReviewRecord:
        plugin = await self.store.plugin(plugin_id)
        if plugin is None:
            raise errors.NotFound("no such plugin")
        return ReviewRecord(plugin, await self.store.versions(plugin_id), await self.store.reviews(plugin_id))

    # -- bundled plugins ------------------------------------------------------------------------

    async def import_bundled(self, folder: Path | None = None) -> list[str]:
        """Import the bundled plugins: new ones and newer versions are added (approved and
        signed); what the catalog has already is left alone, counts and ratings included.
        Returns the `id version` pairs it added."""
        folder = folder if folder is not None else bundled_dir(self.settings)
        if folder is None:
            return []
        added = []
        for path in sorted(p for p in folder.iterdir() if (p / checks.MANIFEST).is_file()):
            data = await asyncio.to_thread(checks.build_package, path)
            package, failures = await asyncio.to_thread(checks.check_package, data, self.limits)
            if failures:
                log.error("bundled plugin %s skipped: %s", path.name, "; ".join(f"{f.check}: {f.detail}" for f in failures))
                continue
            m = package.manifest
            current = await self.store.plugin(m["id"])
            if current is not None and (current.status == "revoked" or (
                    current.version and checks.semver_key(current.version) >= checks.semver_key(m["version"]))):
                continue  # the usual restart: nothing to write
            key = await self.signing_key()
            new = NewVersion(str(uuid.uuid4()), m, data, package.checksum, "bundled", None, True, now_iso())
            if await self.store.import_bundled(new, key.sign(m["id"], m["version"], package.checksum), key.key_id):
                added.append(f"{m['id']} {m['version']}")
        if added:
            log.info("bundled plugins imported: %s", ", ".join(added))
        return added


def _identifiable(manifest: dict) -> bool:
    """The catalog rules need a well-formed id, name and version to look up."""
    return (isinstance(manifest.get("id"), str) and bool(checks.ID.match(manifest["id"]))
            and isinstance(manifest.get("name"), str) and bool(manifest["name"].strip())
            and isinstance(manifest.get("version"), str) and bool(checks.SEMVER.match(manifest["version"])))


def period(since: dt.date | None, until: dt.date | None, today: dt.date) -> tuple[dt.date, dt.date]:
    """An earnings period, both days included: by default the current month up to today."""
    until = until or today
    since = since or until.replace(day=1)
    if since > until:
        raise errors.ValidationError.field("from", "the period starts after it ends")
    if (until - since).days > 3660:
        raise errors.ValidationError.field("from", "a period is at most ten years")
    return since, until
