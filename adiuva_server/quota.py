"""Per-user storage quotas on usage counted in bytes. The counting itself is each storage
store's (storage/store.py `charge` on SQLite, storage/postgres.py `charge` on PostgreSQL), kept in
the same transaction as the change that causes it, so usage can never drift from what is stored;
the stores' `usage_drift` proves it. The quotas themselves, and the 402 past them, are the tier
manager's (tiers.py).

kinds: "cloud" (records and vector payloads) and "backup" (database backups).
"""

from __future__ import annotations

from adiuva_server import errors, tiers

KIND_LIMIT = {"cloud": "cloud_bytes", "backup": "backup_bytes"}


def check(tier: str, kind: str, used: int, delta: int) -> None:
    """Raise QuotaExceeded when adding `delta` bytes to `used` would pass the tier's limit."""
    tiers.check_quota(tier, KIND_LIMIT[kind], used, delta, label=f"{kind} storage", unit="bytes")


def room(tier: str, kind: str, used: int) -> int | None:
    """How many bytes `kind` may still grow by under the tier's quota (None: unlimited)."""
    return tiers.room(tier, KIND_LIMIT[kind], used)


def exceeded(tier: str, kind: str, used: int, what: str) -> errors.QuotaExceeded:
    return tiers.quota_exceeded(tier, KIND_LIMIT[kind], used, what, label=f"{kind} storage", unit="bytes")
