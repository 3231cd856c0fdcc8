"""Several server processes sharing one Redis: two app instances (each its own aiohttp server on
a real socket, the same Redis, the same data dir) as the clients of a load balancer see them;
leases, socket slots and change notices between processes; Redis lost at run time; REDIS_URL
wrong or unreachable at start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from adiuva_server.app import create_app
from adiuva_server.cluster import LocalNotifier
from adiuva_server.config import Settings
from adiuva_server.errors import ConfigError
from adiuva_server.keys import AUTH, HASHER, SHARED
from tests.conftest import REPO, make_settings, register, run_cli, set_tier

LIMITS = {"free": 6, "pro": 6, "power": 6, "team": 6}


async def nodes(aiohttp_client, settings, n: int = 2):
    return [await aiohttp_client(create_app(settings)) for _ in range(n)]


def redis_client(url: str):
    from adiuva_server.cluster.redis import connect

    return connect(url)


# -- shared limits --------------------------------------------------------------------------------


async def test_the_per_user_rate_limit_holds_across_nodes(aiohttp_client, data_dir, redis_url):
    a, b = await nodes(aiohttp_client, make_settings(data_dir, redis_url=redis_url, rate_limits=LIMITS))
    account = await register(a)
    statuses = []
    for i in range(10):
        resp = await (a if i % 2 else b).get("/api/v1/auth/me", headers=account.headers)
        statuses.append(resp.status)
        if resp.status == 429:
            assert (await resp.json())["code"] == "rate_limited" and int(resp.headers["Retry-After"]) >= 1
    assert statuses == [200] * 6 + [429] * 4  # one window for the account, whichever node answers
    assert a.server.app[SHARED].backend == "redis"


async def test_300_wrong_passwords_over_two_nodes_check_exactly_the_allowed_number(aiohttp_client, data_dir, redis_url):
    settings = make_settings(data_dir, redis_url=redis_url, login_failures_per_address=20, login_failures_per_account=10)
    a, b = await nodes(aiohttp_client, settings)
    account = await register(a)
    verifies = 0
    for node in (a, b):
        hasher = node.server.app[HASHER]

        async def counted(stored, password, _verify=hasher.verify):
            nonlocal verifies
            verifies += 1
            return await _verify(stored, password)

        hasher.verify = counted
    body = {"email": account.email, "password": "wrong password!"}
    answers = await asyncio.gather(*[(a if i % 2 else b).post("/api/v1/auth/login", json=body) for i in range(300)])
    statuses = sorted(r.status for r in answers)
    assert verifies == 10  # the account's pool for this address, shared by both nodes
    assert statuses == [401] * 10 + [429] * 290
    # Unlocking on one node starts afresh on every node (the throttle generation is in the
    # database); the right password is then checked and refunded.
    await a.server.app[AUTH].unlock(account.email)
    ok = await b.post("/api/v1/auth/login", json={"email": account.email, "password": account.password})
    assert ok.status == 200


async def test_chat_socket_cap_holds_across_nodes(aiohttp_client, data_dir, redis_url):
    a, b = await nodes(aiohttp_client, make_settings(data_dir, redis_url=redis_url, chat_max_sockets=2))
    account = await register(a)
    url = f"/api/v1/chat/stream?token={account.access_token}"
    first = await a.ws_connect(url)
    second = await b.ws_connect(url)
    for node in (a, b):
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await node.ws_connect(url)
        assert err.value.status == 429
    resp = await a.get(url)
    assert resp.status == 429 and (await resp.json())["code"] == "too_many_connections"
    await first.close()
    deadline = time.monotonic() + 5
    while True:  # node a sees the close, then gives the slot back
        try:
            third = await b.ws_connect(url)
            break
        except aiohttp.WSServerHandshakeError:
            assert time.monotonic() < deadline, "the closed socket's slot was never given back"
            await asyncio.sleep(0.02)
    await second.close()
    await third.close()


HOLDER = """
import asyncio, sys
from adiuva_server.cluster.redis import RedisSocketSlots, connect

async def main():
    slots = RedisSocketSlots(connect(sys.argv[1]), ttl=float(sys.argv[2]))
    assert await slots.acquire("chat:u", 2) and await slots.acquire("chat:u", 2)
    print("held", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_socket_slots_of_a_process_killed_with_kill_9_expire(redis_url):
    """A node killed with its sockets open does not lock the account out: its slots are
    leases, renewed while it lives, gone within their TTL once it is dead."""
    from adiuva_server.cluster.redis import RedisSocketSlots

    ttl = 1.0
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, redis_url, str(ttl)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    client = redis_client(redis_url)
    try:
        assert holder.stdout.readline().strip() == "held"
        slots = RedisSocketSlots(client, ttl=ttl)
        assert await slots.acquire("chat:u", 2) is None
        await asyncio.sleep(ttl * 2)  # alive: renewed, still held
        assert await slots.acquire("chat:u", 2) is None
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed = time.monotonic()
        while (slot := await slots.acquire("chat:u", 2)) is None:
            assert time.monotonic() - killed < ttl + 2, "the dead process's slots never expired"
            await asyncio.sleep(0.05)
        await slots.release("chat:u", slot)
        await slots.close()
    finally:
        holder.kill()
        holder.wait()
        await client.aclose()


# -- plans ----------------------------------------------------------------------------------------------

PLAN = {"name": "Weekly", "steps": [{"id": "s1", "kind": "llm", "template_id": "tpl_note_weekly_summary",
                                     "vars": {"message": "my private diary text"}}]}


async def test_a_plan_built_on_one_node_is_there_on_the_other(aiohttp_client, data_dir, redis_url):
    a, b = await nodes(aiohttp_client, make_settings(data_dir, redis_url=redis_url))
    owner, other = await register(a), await register(b, "bob@example.org")
    await set_tier(a, owner.email, "power")
    resp = await a.post("/api/v1/plans", json=PLAN, headers=owner.headers)
    assert resp.status == 201, await resp.text()
    plan = await resp.json()
    got = await b.get(f"/api/v1/plans/playbook/{plan['plan_id']}", headers=owner.headers)
    assert got.status == 200 and await got.json() == plan
    listing = await (await b.get("/api/v1/plans/playbook", headers=owner.headers)).json()
    assert plan["plan_id"] in [p["plan_id"] for p in listing["items"]]
    assert len(listing["items"]) == 3  # the two built-ins and this one
    # Someone else's plan does not exist for you, on any node.
    assert (await b.get(f"/api/v1/plans/playbook/{plan['plan_id']}", headers=other.headers)).status == 404
    # Redis holds it sealed, with a TTL: never the user's words.
    client = redis_client(redis_url)
    try:
        keys = [k async for k in client.scan_iter("adiuva:plans:*")]
        assert len(keys) == 2 and all([0 < await client.pttl(k) <= 24 * 3600 * 1000 for k in keys])
        dumped = b"".join([v for k in keys if k.endswith(b":data") for v in (await client.hgetall(k)).values()])
        assert dumped and b"diary" not in dumped and b"Weekly" not in dumped
    finally:
        await client.aclose()


async def test_redis_plan_store_keeps_the_per_owner_cap(redis_url):
    from adiuva_server.chat.plans import ExecutionPlan
    from adiuva_server.chat.redis_plans import RedisPlanStore

    client = redis_client(redis_url)
    try:
        store = RedisPlanStore(client, "s" * 40, [], per_user=2)
        for i in range(4):
            await store.put("b", ExecutionPlan(plan_id=f"p{i}", name="x", steps=[]))
        await store.put("a", ExecutionPlan(plan_id="q", name="x", steps=[]))
        await store.get("b", "p2")  # used: now the most recent
        await store.put("b", ExecutionPlan(plan_id="p4", name="x", steps=[]))
        assert [p.plan_id for p in await store.list("b")] == ["p2", "p4"]
        assert [p.plan_id for p in await store.list("a")] == ["q"]
        rotated = RedisPlanStore(client, "t" * 40, [])  # another JWT secret: its plans are unreadable
        assert await rotated.list("b") == []
    finally:
        await client.aclose()


# -- leases ----------------------------------------------------------------------------------------------


@pytest.fixture
async def leases(redis_url):
    """RedisLease factory: each call, another process's view (its own connection)."""
    from adiuva_server.cluster.redis import RedisLease

    clients = []

    def another(ttl: float = 30.0) -> RedisLease:
        clients.append(redis_client(redis_url))
        return RedisLease(clients[-1], ttl=ttl)

    yield another
    for c in clients:
        await c.aclose()


async def test_lease_one_holder_at_a_time_and_only_the_owner_releases(leases, redis_url):
    from adiuva_server.cluster.redis import HeldLease

    one, two = leases(), leases()
    held = await one.acquire("job", 0)  # interval 0: nothing kept after the run
    assert held is not None and await two.acquire("job", 0) is None
    await two.release(HeldLease("job", "not-the-token", 0, 0.0))  # a stranger's release changes nothing
    assert await two.acquire("job", 0) is None
    await one.release(held)
    again = await two.acquire("job", 0)
    assert again is not None
    await one.release(held)  # the old holder's second release must not end the new holder's lease
    assert await one.acquire("job", 0) is None
    await two.release(again)


async def test_lease_renewed_while_running_and_taken_over_after_its_holder_dies(leases):
    one, two = leases(ttl=0.3), leases(ttl=0.3)
    held = await one.acquire("job", 0)
    await asyncio.sleep(0.6)  # twice its TTL: renewed meanwhile
    assert await two.acquire("job", 0) is None and not held.lost.is_set()
    held.renewer.cancel()  # its process dies: no more renewals
    await asyncio.sleep(0.4)
    taken = await two.acquire("job", 0)
    assert taken is not None
    await one.release(held)  # too late, and not its lease any more: nothing changes
    assert await one.acquire("job", 0) is None
    await two.release(taken)


async def test_a_run_counts_for_the_rest_of_its_interval_in_the_cluster(leases):
    one, two = leases(), leases()
    held = await one.acquire("job", 0.5)
    await one.release(held)  # done at once: no node runs it again for the next ~0.5 s
    assert await two.acquire("job", 0.5) is None
    await asyncio.sleep(0.6)
    assert await two.acquire("job", 0.5) is not None


async def test_jobs_run_once_per_cluster(leases):
    from adiuva_server.jobs import Jobs

    ran_by: list[str] = []
    nodes_ = {n: Jobs(leases()) for n in ("a", "b", "c")}
    for name, jobs in nodes_.items():
        jobs.every("test-job", 0.3, lambda name=name: asyncio.sleep(0, ran_by.append(name)))
    for jobs in nodes_.values():
        jobs.start()
    await asyncio.sleep(1.0)  # runs at ~0, 0.3, 0.6, 0.9 s: ~4, whichever node's turn
    for jobs in nodes_.values():
        await jobs.stop()
    assert 2 <= len(ran_by) <= 5, ran_by  # once an interval for the cluster, not 3 times


async def test_a_run_whose_lease_is_lost_is_stopped(leases, redis_url):
    """Its lease gone (Redis flushed, or this node cut off past its TTL): the run stops, so two
    nodes never run the job at once."""
    from adiuva_server.jobs import Jobs

    stopped = asyncio.Event()

    async def run() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.set()

    jobs = Jobs(leases(ttl=0.3))
    jobs.every("test-lost", 3600, run)
    jobs.start()
    client = redis_client(redis_url)
    try:
        await asyncio.sleep(0.2)
        assert await client.delete("adiuva:lease:test-lost") == 1
        await asyncio.wait_for(stopped.wait(), 2)
    finally:
        await jobs.stop()
        await client.aclose()


async def test_a_holder_that_cannot_renew_stops_before_its_lease_runs_out(redis_url):
    from adiuva_server.cluster.redis import RedisLease
    from redis.exceptions import ConnectionError as RedisConnectionError

    class Cut(RedisLease):
        cut = False

    client = redis_client(redis_url)
    lease = Cut(client, ttl=0.6)
    renew = lease._renew
    renewed_at = [0.0]

    async def cut_or_renew(*args, **kwargs):
        if lease.cut:
            raise RedisConnectionError("cut off")
        asked = time.monotonic()
        ok = await renew(*args, **kwargs)
        renewed_at[0] = asked
        return ok

    lease._renew = cut_or_renew
    try:
        held = await lease.acquire("job", 0)
        await asyncio.sleep(0.5)
        lease.cut = True
        await asyncio.wait_for(held.lost.wait(), 2)
        assert time.monotonic() < renewed_at[0] + 0.6  # set before the lease could have expired
        assert await client.get("adiuva:lease:job") == held.token.encode()  # and it had not
    finally:
        held.renewer.cancel()
        await client.aclose()


async def test_two_nodes_run_the_storage_sweep_once(aiohttp_client, data_dir, redis_url, monkeypatch):
    from adiuva_server.storage import maintenance

    sweeps = 0
    real = maintenance.sweep

    async def counted(*args, **kwargs):
        nonlocal sweeps
        sweeps += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(maintenance, "sweep", counted)
    a, b = await nodes(aiohttp_client, make_settings(data_dir, redis_url=redis_url))
    for _ in range(100):
        if sweeps:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert sweeps == 1  # at start, on one node only (in-process leases: once per node)
    client = redis_client(redis_url)
    try:
        names = sorted([k.decode() async for k in client.scan_iter("adiuva:lease:*")])
        assert names == ["adiuva:lease:session-purge", "adiuva:lease:storage-sweep"]  # kept for their interval
    finally:
        await client.aclose()


# -- change notices --------------------------------------------------------------------------------------


async def test_notices_reach_the_other_process_and_latency(redis_url):
    from adiuva_server.cluster.redis import RedisNotifier

    publisher_client, subscriber_client = redis_client(redis_url), redis_client(redis_url)
    publisher, subscriber = RedisNotifier(publisher_client), RedisNotifier(subscriber_client)
    heard: list[tuple[str, float]] = []
    arrived = asyncio.Event()

    def on_notice(payload: str) -> None:
        heard.append((payload, time.perf_counter()))
        arrived.set()

    try:
        subscription = await subscriber.subscribe("account", on_notice)
        latencies = []
        for i in range(20):
            arrived.clear()
            sent = time.perf_counter()
            await publisher.publish("account", f'{{"user": "u{i}"}}')
            await asyncio.wait_for(arrived.wait(), 5)
            latencies.append(heard[-1][1] - sent)
        assert [p for p, _ in heard] == [f'{{"user": "u{i}"}}' for i in range(20)]
        latencies.sort()
        print(f"\npublish-to-receive over Redis: median {latencies[10] * 1e3:.2f} ms, max {latencies[-1] * 1e3:.2f} ms")
        assert latencies[10] < 0.5  # generous: a loaded machine
        await publisher.publish("other-topic", "x")
        await subscription.close()
        await publisher.publish("account", "after close")
        await asyncio.sleep(0.2)
        assert len(heard) == 20
    finally:
        await publisher.close()
        await subscriber.close()
        await publisher_client.aclose()
        await subscriber_client.aclose()


async def test_local_notices():
    notifier, heard = LocalNotifier(), []
    subscription = await notifier.subscribe("t", heard.append)
    await notifier.subscribe("t", lambda p: 1 / 0)  # a failing subscriber does not stop the others
    await notifier.publish("t", "one")
    await subscription.close()
    await notifier.publish("t", "two")
    assert heard == ["one"]


# -- Redis lost, wrong, unreachable ------------------------------------------------------------------------


async def test_redis_lost_at_run_time_answers_503_and_recovers(aiohttp_client, data_dir, own_redis):
    from tests.servers_redis import RedisServer

    client = await aiohttp_client(create_app(make_settings(data_dir, redis_url=own_redis.url)))
    account = await register(client)
    assert (await client.get("/api/v1/auth/me", headers=account.headers)).status == 200
    own_redis.kill()
    for method, path, kwargs in (("GET", "/api/v1/auth/me", {"headers": account.headers}),
                                 ("POST", "/api/v1/auth/login", {"json": {"email": account.email, "password": account.password}}),
                                 ("POST", "/api/v1/auth/register", {"json": {"email": "new@example.org", "password": "long enough pw"}})):
        resp = await client.request(method, path, **kwargs)
        assert resp.status == 503, (path, await resp.text())
        assert resp.headers["Content-Type"].startswith("application/problem+json")
        assert (await resp.json())["code"] == "shared_state_unavailable" and int(resp.headers["Retry-After"]) >= 1
    assert (await client.get("/api/v1/health")).status == 200  # nothing shared on this route
    back = RedisServer(data_dir.parent / "redis-again", port=own_redis.port)
    try:
        assert (await client.get("/api/v1/auth/me", headers=account.headers)).status == 200
    finally:
        back.stop()


@pytest.mark.parametrize("url", ["http://localhost:6379", "redis://", "redis://host:port", "redis://h/notadb", "unix://"])
def test_bad_redis_url_is_refused_naming_it(tmp_path, url):
    with pytest.raises(ConfigError, match="REDIS_URL"):
        Settings.from_env({"REDIS_URL": url}, data_dir=tmp_path)


def test_the_password_in_redis_url_is_never_shown(tmp_path):
    settings = Settings.from_env({"REDIS_URL": "redis://:hunter2secret@127.0.0.1:1/0"}, data_dir=tmp_path)
    assert "hunter2secret" not in repr(settings)
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"REDIS_URL": "redis://:hunter2secret@127.0.0.1:notaport/0"}, data_dir=tmp_path)
    assert "hunter2secret" not in str(err.value)


def test_serve_stops_with_exit_2_on_a_bad_or_unreachable_redis(data_dir, redis_url):
    from tests.conftest import free_port

    bad = run_cli(data_dir, "serve", "--port", "0", REDIS_URL="redis//nowhere")
    assert bad.returncode == 2 and "REDIS_URL" in bad.stderr
    dead = f"redis://:hunter2secret@127.0.0.1:{free_port()}/0"
    out = run_cli(data_dir, "serve", "--port", "0", REDIS_URL=dead)
    assert out.returncode == 2 and "REDIS_URL" in out.stderr and "cannot use Redis" in out.stderr, out.stderr
    assert "hunter2secret" not in out.stderr + out.stdout
