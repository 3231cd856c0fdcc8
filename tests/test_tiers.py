"""The tier manager (tiers.py): DESIGN.md's matrix, its gates, and the rule that a tier is read
from the database, never taken from the client."""

from __future__ import annotations

import hashlib

import pytest

from adiuva_server import errors, tiers
from adiuva_server.auth.service import Principal
from adiuva_server.config import Settings
from tests.conftest import register, set_tier

GB = tiers.GB


def test_the_matrix_is_designs():
    # DESIGN.md "Tiers", row by row (None: unlimited).
    rows = {
        "agents": (3, None, None, None),
        "active_batches": (2, 10, None, None),
        "cloud_bytes": (0, 5 * GB, 25 * GB, None),
        "backup_bytes": (0, 5 * GB, 25 * GB, None),
        "llm_providers": (1, None, None, None),
        "rate_per_minute": (20, 60, 120, 200),
    }
    for quota, values in rows.items():
        assert tuple(tiers.get_tier(n).limit(quota) for n in tiers.NAMES) == values, quota
    for feature in ("batch_builder", "plugin_marketplace", "sso"):
        assert [tiers.check_feature(n, feature) for n in tiers.NAMES] == [False, False, True, True]
    assert Settings.from_env({}, data_dir="/nonexistent").rate_limits == tiers.rate_limits()


def test_gates():
    ada = Principal("u1", "ada@example.org", "pro", False, "2026-01-01T00:00:00Z")
    assert tiers.get_tier(ada) == tiers.Tier("pro") and tiers.get_tier(ada).features == frozenset()
    with pytest.raises(ValueError):
        tiers.get_tier("platinum")
    with pytest.raises(errors.FeatureNotInTier) as refused:
        tiers.require_feature(ada, "plugin_marketplace")
    assert refused.value.status == 403 and refused.value.code == "feature_not_in_tier"
    assert refused.value.detail == "plugin marketplace needs the power or team tier; you are on pro"
    tiers.require_feature(ada._replace(tier="power"), "plugin_marketplace")
    tiers.check_quota(ada, "cloud_bytes", 5 * GB - 10, 10, label="cloud storage", unit="bytes")
    with pytest.raises(errors.QuotaExceeded) as over:
        tiers.check_quota(ada, "cloud_bytes", 5 * GB - 10, 11, label="cloud storage", unit="bytes")
    assert over.value.status == 402 and over.value.code == "quota_exceeded"
    assert over.value.extra == {"quota_bytes": 5 * GB, "used_bytes": 5 * GB - 10}
    assert tiers.room(ada, "cloud_bytes", GB) == 4 * GB and tiers.room("team", "cloud_bytes", 10**15) is None
    with pytest.raises(errors.FeatureNotInTier, match="choosing a model needs the pro tier or higher; you are on free"):
        tiers.require_unlimited("free", "llm_providers", "choosing a model")


async def test_the_tier_is_the_databases_not_the_clients(client, account):
    """A client cannot talk itself into a tier (a header naming one is ignored; the token carries
    none; request bodies refuse unknown fields); a change made in the database counts on the very next request of the same token."""
    data = b"opaque"
    headers = {**account.headers, "X-Checksum": hashlib.sha256(data).hexdigest(), "X-Tier": "team"}
    resp = await client.post("/api/v1/storage/records?table=notes", data=data, headers=headers)
    assert resp.status == 201  # team, the homelab default
    await set_tier(client, account.email, "free")
    resp = await client.post("/api/v1/storage/records?table=notes", data=data, headers=headers)
    assert resp.status == 402 and (await resp.json())["code"] == "quota_exceeded"
    spec = {"name": "Digest", "steps": [{"id": "s1", "kind": "llm", "template_id": "tpl_note_weekly_summary"}]}
    resp = await client.post("/api/v1/plans", json=spec, headers={**account.headers, "X-Tier": "team"})
    assert resp.status == 403 and (await resp.json())["code"] == "feature_not_in_tier"
    me = await (await client.get("/api/v1/auth/me", headers=account.headers)).json()
    assert me["tier"] == "free"
