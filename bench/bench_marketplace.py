"""Catalog browsing (issue 13). Not a test; prints ratios against baselines measured in the same
run against the same server, because absolute times drift on shared machines.

p50 latency of GET /api/v1/plugins?sort=rating (token check, live tier gate, one read
transaction for a page of 20 and the total, JSON) with --plugins plugins in the catalog,
against GET /api/v1/health (no auth, no database) and GET /api/v1/auth/me (the same
authentication path without the catalog), alternating health-browse-me three times.

    python bench/bench_marketplace.py [--plugins 200] [--seconds 4] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402

UNLIMITED = "free=10000000,pro=10000000,power=10000000,team=10000000"


def make_catalog(root: Path, n: int) -> None:
    """n plugin folders for the bundled import (the quickest way to a large approved catalog)."""
    for i in range(n):
        folder = root / f"bench-{i:04d}"
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({
            "id": f"bench-{i:04d}", "name": f"Bench Plugin {i:04d}", "version": "1.0.0", "author": "bench",
            "description": f"plugin number {i} for the catalog benchmark", "category": ("Productivity", "Utilities")[i % 2],
            "price_cents": 0, "currency": "EUR", "permissions": ["tasks:read"]}))
        (folder / "index.js").write_text(f"export default {{ n: {i} }};\n")


def call(url: str, payload: dict | None = None, token: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(payload).encode() if payload is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=30) as resp:
        return json.loads(resp.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plugins", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adiuva-bench-market-") as tmp:
        catalog = Path(tmp) / "catalog"
        make_catalog(catalog, args.plugins)
        proc, url = loadgen.start_server(Path(tmp) / "data", ADIUVA_RATE_LIMITS=UNLIMITED,
                                         ADIUVA_PLUGINS_DIR=str(catalog))
        try:
            api = url + "/api/v1"
            token = call(api + "/auth/register", {"email": "bench@example.org", "password": "bench password 1"})["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            page = call(api + "/plugins?sort=rating", token=token)
            assert page["total"] == args.plugins and len(page["items"]) == 20, page["total"]
            targets = {"health": (api + "/health", None), "browse": (api + "/plugins?sort=rating", auth),
                       "me": (api + "/auth/me", auth)}
            runs: dict[str, list[dict]] = {k: [] for k in targets}
            for name, (target, headers) in targets.items():  # warm-up
                asyncio.run(loadgen.run(target, 0.5, args.connections, headers))
            for _ in range(3):
                for name, (target, headers) in targets.items():
                    result = asyncio.run(loadgen.run(target, args.seconds, args.connections, headers))
                    assert result["non_200"] == 0, (name, result)
                    runs[name].append(result)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    p50 = {k: statistics.median(r["p50_ms"] for r in v) for k, v in runs.items()}
    rps = {k: statistics.median(r["rps"] for r in v) for k, v in runs.items()}
    p99 = {k: statistics.median(r["p99_ms"] for r in v) for k, v in runs.items()}
    print(f"catalog of {args.plugins} plugins, {args.connections} connections, {args.seconds:g} s x 3 each")
    for k in targets:
        print(f"  {k:<7} p50 {p50[k]:6.2f} ms  p99 {p99[k]:6.2f} ms  {rps[k]:8.0f} req/s")
    print(f"browse/health p50 ratio: {p50['browse'] / p50['health']:.2f}  "
          f"(browse/me: {p50['browse'] / p50['me']:.2f}; req/s health/browse: {rps['health'] / rps['browse']:.2f})")


if __name__ == "__main__":
    main()
