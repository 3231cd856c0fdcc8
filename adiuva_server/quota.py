"""Per-user storage usage, counted in bytes and kept in the same transaction as the change
that causes it, so usage can never drift from what is stored.

kinds: "cloud" (records and vector payloads) and "backup" (database backups).
"""

from __future__ import annotations

from typing import Any

from adiuva_server import errors, tiers

KIND_LIMIT = {"cloud": "cloud_bytes", "backup": "backup_bytes"}


async def usage(conn: Any, user_id: str, kind: str) -> int:
    async with conn.execute("SELECT bytes FROM storage_usage WHERE user_id = ? AND kind = ?", (user_id, kind)) as cur:
        row = await cur.fetchone()
    return row[0] if row else 0


def check(tier: str, kind: str, used: int, delta: int) -> None:
    """Raise QuotaExceeded when adding `delta` bytes to `used` would pass the tier's limit."""
    cap = tiers.limit(tier, KIND_LIMIT[kind])
    if cap is not None and delta > 0 and used + delta > cap:
        raise errors.QuotaExceeded(
            f"{kind} storage quota of the {tier} tier is {cap} bytes; {used} used, {delta} more requested",
            extra={"quota_bytes": cap, "used_bytes": used},
        )


async def apply(conn: Any, user_id: str, tier: str, kind: str, delta: int) -> int:
    """Inside a write transaction: check the quota for a growth of `delta` bytes (negative to
    release) and record it. Returns the new usage."""
    used = await usage(conn, user_id, kind)
    check(tier, kind, used, delta)
    new = max(0, used + delta)
    await conn.execute(
        "INSERT INTO storage_usage (user_id, kind, bytes) VALUES (?, ?, ?) "
        "ON CONFLICT (user_id, kind) DO UPDATE SET bytes = excluded.bytes",
        (user_id, kind, new),
    )
    return new
