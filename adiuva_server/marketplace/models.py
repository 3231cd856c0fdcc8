"""Request and response models of the plugin routes (they also generate the OpenAPI document)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adiuva_server.marketplace.revenue import Developer, Earnings, Purchase
from adiuva_server.marketplace.store import Installation, Plugin, Review, Version

MAX_PAGE = 10**6


class PluginQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: str | None = Field(default=None, max_length=40, description="e.g. Productivity (case-insensitive)")
    q: str | None = Field(default=None, max_length=100, description="words in the name, description or author")
    page: int = Field(default=1, ge=1, le=MAX_PAGE, description="20 plugins a page")
    sort: Literal["rating", "installs", "newest"] = "rating"


class PluginOut(BaseModel):
    id: str
    name: str
    description: str
    version: str
    author: str
    category: str
    price_cents: int = Field(description="0: free")
    currency: str
    permissions: list[str]
    bundled: bool
    install_count: int
    average_rating: float | None = Field(description="1 to 5, two decimals; null before the first rating")
    rating_count: int
    listed_at: str

    @classmethod
    def of(cls, p: Plugin) -> PluginOut:
        return cls(id=p.id, name=p.name, description=p.description, version=p.version or "", author=p.author,
                   category=p.category, price_cents=p.price_cents, currency=p.currency, permissions=p.permissions,
                   bundled=p.bundled, install_count=p.install_count, average_rating=p.average_rating,
                   rating_count=p.rating_count, listed_at=p.listed_at or "")


class PluginPage(BaseModel):
    items: list[PluginOut]
    page: int
    total: int


class PackageInfo(BaseModel):
    checksum: str = Field(description="SHA-256 of the package bytes, hex")
    size_bytes: int
    signature: str = Field(description="Ed25519, base64; see GET /plugins/signing-key and README 'Plugins'")
    key_id: str


class PluginDetail(PluginOut):
    manifest: dict[str, Any]
    package: PackageInfo
    installed: bool = Field(description="installed by the caller")
    my_rating: int | None = Field(description="the caller's stars, if they rated it")


class InstallationOut(BaseModel):
    plugin_id: str
    name: str
    version: str
    status: Literal["installed", "revoked", "awaiting_payment"] = Field(
        description="revoked: the server withdrew the plugin; the app should disable it")
    price_cents: int = Field(description="the price when it was installed")
    currency: str
    payment_state: Literal["free", "pending", "paid", "refunded"]
    installed_at: str
    checkout_url: str | None = Field(default=None, description="awaiting_payment (the answer to an install of a "
                                     "paid plugin): the Stripe Checkout page where the user pays; the plugin is "
                                     "installed when Stripe confirms the payment")
    purchase_id: str | None = None

    @classmethod
    def of(cls, i: Installation) -> InstallationOut:
        status = "revoked" if i.revoked else i.state
        return cls(plugin_id=i.plugin_id, name=i.name, version=i.version or "", status=status,
                   price_cents=i.price_cents, currency=i.currency, payment_state=i.payment_state,
                   installed_at=i.installed_at, checkout_url=i.checkout_url, purchase_id=i.purchase_id)


class InstalledList(BaseModel):
    items: list[InstallationOut]


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    stars: int = Field(ge=1, le=5, strict=True)


class RatingOut(BaseModel):
    plugin_id: str
    stars: int
    average_rating: float | None
    rating_count: int


class SigningKeyOut(BaseModel):
    algorithm: Literal["Ed25519"]
    scheme: str = Field(description="the signed message's version tag; README 'Plugins' gives the format")
    key_id: str = Field(description="first 16 hex digits of SHA-256 of the raw public key")
    public_key: str = Field(description="the 32 raw bytes of the public key, base64")
    public_key_pem: str


class SubmissionOut(BaseModel):
    submission_id: str
    plugin_id: str
    version: str
    status: Literal["pending_review", "approved", "rejected"]
    name: str
    checksum: str
    size_bytes: int
    submitted_by: str
    submitted_at: str
    reviewer: str | None
    notes: str | None
    reviewed_at: str | None
    manifest: dict[str, Any]

    @classmethod
    def of(cls, v: Version) -> SubmissionOut:
        return cls(submission_id=v.submission_id, plugin_id=v.plugin_id, version=v.version, status=v.status,
                   name=str(v.manifest.get("name", "")), checksum=v.checksum, size_bytes=v.size_bytes,
                   submitted_by=v.submitted_by, submitted_at=v.submitted_at, reviewer=v.reviewer, notes=v.notes,
                   reviewed_at=v.reviewed_at, manifest=v.manifest)


class SubmissionList(BaseModel):
    items: list[SubmissionOut]


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    notes: str = Field(default="", max_length=2000)


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000, pattern=r"\S")


class RevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    notes: str = Field(default="", max_length=2000)


class ReviewOut(BaseModel):
    version: str | None
    decision: Literal["approved", "rejected", "revoked"]
    reviewer: str
    notes: str
    decided_at: str

    @classmethod
    def of(cls, r: Review) -> ReviewOut:
        return cls(version=r.version, decision=r.decision, reviewer=r.reviewer, notes=r.notes, decided_at=r.decided_at)


class AdminPluginOut(BaseModel):
    id: str
    name: str
    status: Literal["unlisted", "approved", "revoked"]
    version: str | None = Field(description="the approved version")
    owner_id: str | None
    install_count: int
    rating_count: int
    average_rating: float | None
    versions: list[SubmissionOut]
    reviews: list[ReviewOut]


# -- revenue (licensed mode) ---------------------------------------------------------------------


class EarningsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    since: dt.date | None = Field(default=None, alias="from", description="first day (YYYY-MM-DD, UTC); "
                                  "default: the first of the month of `to`")
    until: dt.date | None = Field(default=None, alias="to", description="last day, included; default: today")


class AdminEarningsQuery(EarningsQuery):
    developer: str | None = Field(default=None, max_length=320, description="a developer's email; default: all, "
                                  "and the operator's own plugins")


class EarningsItem(BaseModel):
    developer: str | None = Field(description="the developer's email; null: the operator's own plugins")
    plugin_id: str
    currency: str
    sales: int
    refunds: int
    gross_cents: int = Field(description="what buyers paid, less refunds")
    fee_cents: int = Field(description="the platform's 30 %, rounded half up per sale")
    developer_cents: int = Field(description="gross - fee: what was transferred to the developer")

    @classmethod
    def of(cls, e: Earnings) -> EarningsItem:
        return cls(developer=e.email, plugin_id=e.plugin_id, currency=e.currency, sales=e.sales, refunds=e.refunds,
                   gross_cents=e.gross_cents, fee_cents=e.fee_cents, developer_cents=e.developer_cents)


class EarningsTotal(BaseModel):
    currency: str
    gross_cents: int
    fee_cents: int
    developer_cents: int


class EarningsOut(BaseModel):
    developer: str | None
    from_: dt.date = Field(alias="from", description="first day of the period")
    to: dt.date = Field(description="last day of the period, included")
    items: list[EarningsItem]
    totals: list[EarningsTotal] = Field(description="per currency (amounts in different currencies never add)")

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    @classmethod
    def of(cls, report) -> EarningsOut:
        totals: dict[str, list[int]] = {}
        for e in report.items:
            t = totals.setdefault(e.currency, [0, 0, 0])
            t[0] += e.gross_cents
            t[1] += e.fee_cents
            t[2] += e.developer_cents
        return cls(developer=report.developer, from_=report.since, to=report.until,
                   items=[EarningsItem.of(e) for e in report.items],
                   totals=[EarningsTotal(currency=c, gross_cents=g, fee_cents=f, developer_cents=d)
                           for c, (g, f, d) in sorted(totals.items())])


class PurchaseOut(BaseModel):
    id: str
    user_id: str | None
    plugin_id: str
    state: Literal["pending", "paid", "refunded", "expired"]
    price_cents: int
    currency: str
    fee_cents: int
    developer_cents: int
    developer_id: str | None
    destination: str | None = Field(description="the developer's Stripe connected account; null: no transfer")
    payment_intent: str | None
    created_at: str
    paid_at: str | None
    refunded_at: str | None

    @classmethod
    def of(cls, p: Purchase) -> PurchaseOut:
        return cls(id=p.id, user_id=p.user_id, plugin_id=p.plugin_id, state=p.state, price_cents=p.price_cents,
                   currency=p.currency, fee_cents=p.fee_cents, developer_cents=p.developer_cents,
                   developer_id=p.developer_id, destination=p.destination, payment_intent=p.payment_intent,
                   created_at=p.created_at, paid_at=p.paid_at, refunded_at=p.refunded_at)


class PurchaseList(BaseModel):
    items: list[PurchaseOut]


class DeveloperOut(BaseModel):
    user_id: str
    email: str
    stripe_account: str
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, d: Developer) -> DeveloperOut:
        return cls(user_id=d.user_id, email=d.email, stripe_account=d.stripe_account, created_at=d.created_at,
                   updated_at=d.updated_at)
