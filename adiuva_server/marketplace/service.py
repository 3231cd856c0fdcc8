"""The marketplace: what users, developers and reviewers can do, for the routes and the
`adiuva plugin` CLI alike. Tier gates come from the caller's tier as the database has it now
(the Principal), never from the client.

Paid plugins: an installation records the price and currency it was installed at and a payment
state ('free' here). Charging (Stripe Checkout or the saved payment method, Connect transfers of
the developer's 70 %, refunds, the revenue ledger) is not built yet: in homelab mode a paid
plugin answers 403 `licensed_mode_required`; in licensed mode 402 `payment_not_available` until
the paid part replaces `_install_paid`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from adiuva_server import errors, tiers
from adiuva_server.config import Settings
from adiuva_server.license.state import LicenseState
from adiuva_server.marketplace import checks
from adiuva_server.marketplace.checks import Limits
from adiuva_server.marketplace.signing import SigningKey
from adiuva_server.marketplace.store import (
    Installation, MarketplaceStore, NewVersion, PackageBytes, Plugin, Review, UserView, Version,
)

log = logging.getLogger(__name__)

PAGE_SIZE = 20
FEATURE = "plugin_marketplace"
BUNDLED_FOLDER = "plugins"


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


class MarketplaceService:
    def __init__(self, settings: Settings, store: MarketplaceStore, license: LicenseState | None = None) -> None:
        self.settings = settings
        self.license = license
        self.store = store
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
        raise errors.PaymentNotAvailable(f"{plugin.name} costs {price}; paying for plugins is not available yet")

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

