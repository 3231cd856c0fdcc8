"""Billing benchmark (issue 12). Not a test; prints a ratio against a baseline measured in the
same run, because absolute figures drift on shared machines.

Webhook deliveries per second: signed `customer.subscription.updated` events, each distinct and
each applied (signature check on the raw body, the log row written before processing, the event
id recorded with its effects, the user's tier recomputed, in SQLite with synchronous=full),
against a bare aiohttp handler that reads the same bodies and answers the same JSON. Both are
one server process started the same way, driven by the same closed-loop sender from this
process over keep-alive connections; run alternately bare-billing-bare-billing.

    python bench/bench_billing.py [--events 2000] [--connections 16] [--users 50]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SECRET = "whsec_bench"
# The licensed server: settings built in code (licensed mode is not an environment variable).
BILLING_APP = """
import sys
from aiohttp import web
from adiuva_server.app import create_app
from adiuva_server.config import Settings
settings = Settings.from_env({}, data_dir=sys.argv[1], licensed=True, default_tier="free", env="prod",
                             log_level="WARNING", stripe_secret_key="sk_test_bench", stripe_webhook_secret="%s",
                             stripe_api_base="http://127.0.0.1:9",
                             rate_limits={"free": 10**6, "pro": 10**6, "power": 10**6, "team": 10**6},
                             registrations_per_address=10**6)
web.run_app(create_app(settings), host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
""" % SECRET
BARE_APP = """
import sys
from aiohttp import web
async def health(request):
    return web.json_response({"status": "ok"})
async def webhook(request):
    await request.read()
    return web.json_response({"received": True, "outcome": "applied"})
app = web.Application()
app.router.add_get("/api/v1/health", health)
app.router.add_post("/api/v1/billing/webhook", webhook)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


def start(code: str, data_dir: Path) -> tuple[subprocess.Popen, str]:
    port = loadgen.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADIUVA_", "JWT_", "STRIPE_"))}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-c", code, str(data_dir), str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/api/v1/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not start")


def post(url: str, path: str, body: dict, headers: dict[str, str] | None = None) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def get(url: str, path: str, token: str) -> dict:
    req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def signed_requests(url: str, user_ids: list[str], count: int, offset: int) -> list[bytes]:
    """`count` distinct events, each newer than the last for its subscription (all applied)."""
    prices = ("price_pro_monthly", "price_power_monthly", "price_team_monthly")
    t = int(time.time())
    out = []
    for k in range(count):
        i = k % len(user_ids)
        sub = {"id": f"sub_{i}", "object": "subscription", "customer": f"cus_{i}", "status": "active",
               "metadata": {"user_id": user_ids[i]}, "cancel_at_period_end": False,
               "items": {"data": [{"price": {"id": prices[(k // len(user_ids)) % 3]}, "current_period_end": t + 86400}]}}
        event = {"id": f"evt_{offset + k}", "object": "event", "type": "customer.subscription.updated",
                 "created": t - 100_000 + offset + k, "data": {"object": sub}}
        body = json.dumps(event).encode()
        mac = hmac.new(SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        _, _, raw = loadgen.request_bytes(url + "/api/v1/billing/webhook", "POST", {
            "Content-Type": "application/json", "Stripe-Signature": f"t={t},v1={mac}"}, body)
        out.append(raw)
    return out


async def deliver(url: str, requests: list[bytes], connections: int) -> tuple[float, int]:
    """Send every request once over `connections` keep-alive connections; (seconds, non-200s)."""
    host, port = url.rsplit("//", 1)[1].split(":")
    queue = list(reversed(requests))
    bad = 0

    async def worker() -> None:
        nonlocal bad
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while queue:
                writer.write(queue.pop())
                if await loadgen._read_response(reader) != 200:
                    bad += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return time.perf_counter() - t0, bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--users", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        billing, burl = start(BILLING_APP, Path(tmp) / "billing")
        bare, url0 = start(BARE_APP, Path(tmp) / "bare")
        try:
            user_ids = []
            for n in range(args.users):
                token = post(burl, "/api/v1/auth/register",
                             {"email": f"u{n}@example.org", "password": "correct horse battery"})["access_token"]
                user_ids.append(get(burl, "/api/v1/auth/me", token)["id"])
            rates: dict[str, list[float]] = {"bare": [], "billing": []}
            offset = 0
            for name, url in (("bare", url0), ("billing", burl), ("bare", url0), ("billing", burl)):
                reqs = signed_requests(url, user_ids, args.events, offset)
                offset += args.events
                seconds, bad = asyncio.run(deliver(url, reqs, args.connections))
                if bad:
                    raise SystemExit(f"{name}: {bad} deliveries were not answered 200")
                rates[name].append(args.events / seconds)
        finally:
            for proc in (billing, bare):
                proc.terminate()
                proc.wait(10)
        from adiuva_server.db import connect

        conn = connect(Path(tmp) / "billing" / "adiuva.db", readonly=True)
        applied = conn.execute("SELECT count(*) FROM billing_webhook_log WHERE outcome = 'applied'").fetchone()[0]
        conn.close()
        if applied != 2 * args.events:  # every delivery did the whole work, none was a shortcut
            raise SystemExit(f"{applied} of {2 * args.events} deliveries were applied")
    bare_rate, billing_rate = max(rates["bare"]), max(rates["billing"])
    print(f"webhook deliveries/s, {args.events} distinct signed events x2, {args.connections} connections, "
          f"{args.users} users: bare aiohttp {bare_rate:,.0f}, billing {billing_rate:,.0f} "
          f"(runs: bare {', '.join(f'{r:,.0f}' for r in rates['bare'])}; billing {', '.join(f'{r:,.0f}' for r in rates['billing'])})")
    print(f"ratio billing/bare: {billing_rate / bare_rate:.3f}")


if __name__ == "__main__":
    main()
