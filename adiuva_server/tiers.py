"""The tier manager: the feature matrix and quotas of DESIGN.md "Tiers", in one place, and the
gates every feature asks (storage, vectors, agents, batches; plugins and billing next).

A tier is never taken from what a client says: gates are given the caller (the `Principal`
that auth builds from the database on every request, or a stored `User`), or a tier name read
from that caller. Over a quota: 402 `quota_exceeded`; a feature outside the tier: 403
`feature_not_in_tier`.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from adiuva_server import errors

GB = 1024**3
UNLIMITED = None
NAMES = ("free", "pro", "power", "team")  # cheapest first

# Quotas; None means unlimited. Storage in bytes, rate limits in requests a minute (the
# defaults of ADIUVA_RATE_LIMITS).
LIMITS: dict[str, dict[str, int | None]] = {
    "free": {"agents": 3, "active_batches": 2, "cloud_bytes": 0, "backup_bytes": 0, "llm_providers": 1, "rate_per_minute": 20},
    "pro": {"agents": None, "active_batches": 10, "cloud_bytes": 5 * GB, "backup_bytes": 5 * GB, "llm_providers": None, "rate_per_minute": 60},
    "power": {"agents": None, "active_batches": None, "cloud_bytes": 25 * GB, "backup_bytes": 25 * GB, "llm_providers": None, "rate_per_minute": 120},
    "team": {"agents": None, "active_batches": None, "cloud_bytes": None, "backup_bytes": None, "llm_providers": None, "rate_per_minute": 200},
}
FEATURES: dict[str, frozenset[str]] = {
    "free": frozenset(),
    "pro": frozenset(),
    "power": frozenset({"batch_builder", "plugin_marketplace", "sso"}),
    "team": frozenset({"batch_builder", "plugin_marketplace", "sso"}),
}


class HasTier(Protocol):
    @property
    def tier(self) -> str: ...


class Tier(NamedTuple):
    """One row of the matrix. Reads LIMITS and FEATURES when asked (tests may adjust them)."""

    name: str

    def limit(self, quota: str) -> int | None:
        return LIMITS[self.name][quota]

    def has(self, feature: str) -> bool:
        return feature in FEATURES[self.name]

    @property
    def features(self) -> frozenset[str]:
        return FEATURES[self.name]


def get_tier(who: HasTier | str) -> Tier:
    """The caller's tier: `who` is a Principal or a User (read from the database), or the tier
    name one of them carries. ValueError for a name that is not a tier."""
    name = who if isinstance(who, str) else who.tier
    if name not in LIMITS:
        raise ValueError(f"not a tier: {name!r}")
    return Tier(name)


def limit(who: HasTier | str, quota: str) -> int | None:
    return get_tier(who).limit(quota)


def check_feature(who: HasTier | str, feature: str) -> bool:
    return get_tier(who).has(feature)


has_feature = check_feature


def require_feature(who: HasTier | str, feature: str) -> None:
    """403 `feature_not_in_tier` unless the caller's tier includes `feature`."""
    tier = get_tier(who)
    if not tier.has(feature):
        raise errors.FeatureNotInTier(f"{feature.replace('_', ' ')} needs the {_tiers_with(feature)} tier; you are on {tier.name}")


def require_unlimited(who: HasTier | str, quota: str, what: str) -> None:
    """403 `feature_not_in_tier` for something only tiers without a cap on `quota` may do
    (choosing a model, an agent past the free ones)."""
    tier = get_tier(who)
    if tier.limit(quota) is not None:
        lowest = next(n for n in NAMES if LIMITS[n][quota] is None)
        raise errors.FeatureNotInTier(f"{what} needs the {lowest} tier or higher; you are on {tier.name}")


def check_quota(who: HasTier | str, quota: str, used: int, delta: int, *, label: str, unit: str = "") -> None:
    """402 `quota_exceeded` when growing `used` by `delta` would pass the tier's `quota`."""
    cap = get_tier(who).limit(quota)
    if cap is not None and delta > 0 and used + delta > cap:
        raise quota_exceeded(who, quota, used, f"{delta} more requested", label=label, unit=unit)


def room(who: HasTier | str, quota: str, used: int) -> int | None:
    """How much `used` may still grow under the tier's `quota` (None: unlimited)."""
    cap = get_tier(who).limit(quota)
    return None if cap is None else max(0, cap - used)


def quota_exceeded(who: HasTier | str, quota: str, used: int, what: str, *, label: str, unit: str = "") -> errors.QuotaExceeded:
    tier = get_tier(who)
    cap = tier.limit(quota)
    unit = f" {unit}" if unit else ""
    return errors.QuotaExceeded(f"{label} quota of the {tier.name} tier is {cap}{unit}; {used} used, {what}",
                                extra={f"quota{unit.replace(' ', '_')}": cap, f"used{unit.replace(' ', '_')}": used})


def rate_limits() -> dict[str, int]:
    """Requests a minute by tier: the defaults of ADIUVA_RATE_LIMITS."""
    return {name: LIMITS[name]["rate_per_minute"] for name in NAMES}  # type: ignore[misc]


def _tiers_with(feature: str) -> str:
    names = [n for n in NAMES if feature in FEATURES[n]]
    return " or ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " or " + names[-1]
