"""The tier feature matrix (DESIGN.md), in one place. Gates read the user's tier from the
database on every request (the Principal) and check it here."""

from __future__ import annotations

from adiuva_server import errors

GB = 1024**3
UNLIMITED = None

# None means unlimited.
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


def limit(tier: str, name: str) -> int | None:
    return LIMITS[tier][name]


def has_feature(tier: str, feature: str) -> bool:
    return feature in FEATURES[tier]


def require_feature(tier: str, feature: str) -> None:
    if not has_feature(tier, feature):
        raise errors.FeatureNotInTier(f"{feature.replace('_', ' ')} needs the power or team tier; you are on {tier}")
