"""Per-user storage usage, counted in bytes and kept in the same transaction as the change
that causes it, so usage can never drift from what is stored. The quotas themselves, and the
402 past them, are the tier manager's (tiers.py).

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
    tiers.check_quota(tier, KIND_LIMIT[kind], used, delta, label=f"{kind} storage", unit="bytes")


def room(tier: str, kind: str, used: int) -> int | None:
    """How many bytes `kind` may still grow by under the tier's quota (None: unlimited)."""
    return tiers.room(tier, KIND_LIMIT[kind], used)


def exceeded(tier: str, kind: str, used: int, what: str) -> errors.QuotaExceeded:
    return tiers.quota_exceeded(tier, KIND_LIMIT[kind], used, what, label=f"{kind} storage", unit="bytes")


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


# What each feature charges, recomputed from its rows: records and vectors ("cloud"), desktop
# backups ("backup"). A new feature that calls `apply` adds its source here.
_ACTUAL_USAGE = """
    SELECT user_id, kind, SUM(bytes) AS bytes FROM (
        SELECT user_id, 'cloud' AS kind, size_bytes AS bytes FROM storage_records WHERE checksum IS NOT NULL
        UNION ALL
        SELECT user_id, 'backup', size_bytes FROM storage_backups
        UNION ALL
        SELECT c.user_id, 'cloud', length(i.payload) + 4 * i.dimension
          FROM vector_items i JOIN vector_collections c ON c.id = i.collection_id
    ) GROUP BY user_id, kind
"""


async def drift(db: Any) -> list[tuple[str, str, int, int]]:
    """(user_id, kind, counted, actual) wherever storage_usage disagrees with the rows."""
    rows = await db.fetchall(
        f"""
        WITH actual(user_id, kind, bytes) AS ({_ACTUAL_USAGE})
        SELECT u.user_id, u.kind, u.bytes, COALESCE(a.bytes, 0) FROM storage_usage u
          LEFT JOIN actual a ON a.user_id = u.user_id AND a.kind = u.kind
         WHERE u.bytes != COALESCE(a.bytes, 0)
        UNION ALL
        SELECT a.user_id, a.kind, 0, a.bytes FROM actual a
         WHERE a.bytes != 0 AND NOT EXISTS (
             SELECT 1 FROM storage_usage u WHERE u.user_id = a.user_id AND u.kind = a.kind)
        """
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]
