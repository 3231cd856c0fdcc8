"""The marketplace's data: the catalog, submitted versions and their reviews, installations,
ratings and the signing key. `MarketplaceStore` is the interface the service uses; the SQLite
implementation is in sqlite.py (a PostgreSQL one slots in beside it). Each method is one
transaction that keeps its own invariants (install counts and rating sums, one pending review
per plugin, one installation per user and plugin, unique ids, names and versions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from adiuva_server import errors
from adiuva_server.marketplace.checks import Failure, semver_key
from adiuva_server.marketplace.signing import SigningKey

SORTS = ("rating", "installs", "newest")


@dataclass(frozen=True, slots=True)
class Plugin:
    id: str
    name: str
    status: str  # unlisted | approved | revoked
    version: str | None
    description: str
    author: str
    category: str
    price_cents: int
    currency: str
    permissions: list[str]
    bundled: bool
    install_count: int
    rating_count: int
    rating_sum: int
    owner_id: str | None
    created_at: str
    listed_at: str | None

    @property
    def average_rating(self) -> float | None:
        return round(self.rating_sum / self.rating_count, 2) if self.rating_count else None


@dataclass(frozen=True, slots=True)
class Version:
    submission_id: str
    plugin_id: str
    version: str
    status: str  # pending_review | approved | rejected
    manifest: dict[str, Any]
    checksum: str
    size_bytes: int
    signature: str | None
    key_id: str | None
    submitted_by: str
    submitted_at: str
    reviewer: str | None
    notes: str | None
    reviewed_at: str | None


@dataclass(frozen=True, slots=True)
class Review:
    plugin_id: str
    version: str | None
    decision: str  # approved | rejected | revoked
    reviewer: str
    notes: str
    decided_at: str


@dataclass(frozen=True, slots=True)
class Installation:
    plugin_id: str
    name: str
    version: str | None  # the plugin's approved version now
    state: str  # installed (or, with the paid part, awaiting_payment)
    revoked: bool
    price_cents: int  # what it cost when installed (a snapshot)
    currency: str
    payment_state: str  # free | pending | paid | refunded
    installed_at: str
    checkout_url: str | None = None  # awaiting_payment: where the buyer pays (Stripe Checkout)
    purchase_id: str | None = None


@dataclass(frozen=True, slots=True)
class UserView:
    """What one user has to do with one plugin."""

    installed: bool
    stars: int | None


@dataclass(frozen=True, slots=True)
class PackageBytes:
    plugin_id: str
    version: str
    data: bytes
    checksum: str
    signature: str
    key_id: str


@dataclass(frozen=True, slots=True)
class NewVersion:
    """A submission that passed the pure checks."""

    submission_id: str
    manifest: dict[str, Any]
    package: bytes
    checksum: str
    submitted_by: str  # a user id, 'cli' or 'bundled'
    owner_id: str | None  # the developer it belongs to (None: the admin's or bundled)
    may_update_any: bool  # the admin (CLI, admin API) may submit versions of any plugin
    now: str


class MarketplaceStore(Protocol):
    async def browse(self, *, category: str | None, q: str | None, sort: str, offset: int,
                     limit: int) -> tuple[list[Plugin], int]:
        """Approved plugins only, one page and the total, from one snapshot."""
    async def plugin(self, plugin_id: str) -> Plugin | None:
        """Any status (callers decide what a user may see)."""
    async def user_view(self, user_id: str, plugin_id: str) -> UserView: ...
    async def versions(self, plugin_id: str) -> list[Version]: ...
    async def reviews(self, plugin_id: str) -> list[Review]: ...
    async def pending(self) -> list[Version]: ...
    async def submissions_of(self, user_id: str) -> list[Version]: ...

    async def submission_failures(self, new: NewVersion) -> list[Failure]:
        """The catalog rules (id_unique, name_unique, version_newer, review_pending,
        plugin_revoked) as they stand now."""
    async def add_submission(self, new: NewVersion) -> list[Failure]:
        """Re-check the catalog rules and record the version as pending_review, atomically;
        the failures (nothing recorded) when a rule fails."""
    async def approve(self, plugin_id: str, version: str, signature: str, key_id: str, reviewer: str,
                      notes: str, now: str) -> Version:
        """Approve that pending version (Conflict if it is no longer pending) and make it the
        catalog's; counts and ratings stay."""
    async def reject(self, plugin_id: str, reviewer: str, reason: str, now: str) -> Version:
        """Reject its pending version (NotFound when none waits)."""
    async def revoke(self, plugin_id: str, reviewer: str, notes: str, now: str) -> Plugin:
        """Hide it from the catalog for good; installations stay, shown as revoked; a pending
        version is rejected."""
    async def import_bundled(self, new: NewVersion, signature: str, key_id: str) -> bool:
        """Add or upgrade a bundled plugin (approved by its shipping); False when the catalog
        already has this version or a newer one, or the plugin was revoked. Never touches counts."""

    async def install(self, user_id: str, plugin_id: str, now: str, *, max_price_cents: int = 0,
                      payment_state: str = "free") -> Installation | None:
        """Install an approved plugin costing at most `max_price_cents` (price and currency
        snapshotted); installing again changes nothing. None when no such plugin is listed."""
    async def uninstall(self, user_id: str, plugin_id: str, now: str) -> bool:
        """False when the plugin does not exist at all; uninstalling twice is fine."""
    async def installed(self, user_id: str) -> list[Installation]: ...
    async def rate(self, user_id: str, plugin_id: str, stars: int, now: str) -> Plugin:
        """Set the user's one rating (NotFound: not listed; Conflict: never installed)."""
    async def package(self, plugin_id: str) -> PackageBytes | None:
        """The approved version's package of a listed plugin."""

    async def signing_key(self, candidate: SigningKey, now: str) -> SigningKey:
        """The server's key; `candidate` becomes it when there is none yet (first use wins)."""


class PluginNotInstalled(errors.Conflict):
    code = "plugin_not_installed"
    title = "The plugin is not installed"


def catalog_failures(new: NewVersion, plugin: Any, pending_version: str | None, version_approved: bool,
                     name_taken: bool) -> list[Failure]:
    """The catalog rules, from what the store read in its transaction: `plugin` (owner_id,
    status, version of the id's row, or None), the version waiting for review, whether this
    version was approved already, whether another plugin has the name."""
    m = new.manifest
    failures = []
    if plugin is not None:
        if plugin["status"] == "revoked":
            failures.append(Failure("plugin_revoked", f"{m['id']} was revoked; it takes no new versions"))
        elif not new.may_update_any and (plugin["owner_id"] is None or plugin["owner_id"] != new.owner_id):
            failures.append(Failure("id_unique", f"the id {m['id']!r} belongs to another plugin"))
        if plugin["version"] is not None and semver_key(m["version"]) <= semver_key(plugin["version"]):
            failures.append(Failure("version_newer", f"version {m['version']} is not newer than the approved "
                                    f"{plugin['version']}"))
    if pending_version is not None:
        failures.append(Failure("review_pending", f"version {pending_version} of {m['id']} is waiting for review; "
                                "submit the next one after its decision"))
    if version_approved and not any(f.check == "version_newer" for f in failures):
        failures.append(Failure("version_newer", f"version {m['version']} was approved already"))
    if name_taken:
        failures.append(Failure("name_unique", f"another plugin is called {m['name']!r}"))
    return failures
