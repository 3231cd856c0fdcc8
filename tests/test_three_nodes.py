"""Three `adiuva serve` processes on one PostgreSQL, one S3 bucket and one Redis, with clients
spread across them as behind a load balancer: tokens valid on every node, one global rate limit,
an upload on one node read byte-identical on another, a CLI tier change and a disabled account
counted on the very next request on every node, vector search equal to a float64 brute force
from any node, `kill -9` of a node under concurrent uploads losing no acknowledged upload, and
PostgreSQL restarted under load: clean 503s with Retry-After meanwhile, recovery after."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os

import aiohttp
import numpy as np
import pytest

from tests.cluster import Node
from tests.conftest import run_cli

SECRET = "one-secret-for-every-node-of-the-cluster"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def cluster_env(pg_url, s3_bucket, redis_url) -> dict[str, str]:
    return {"DATABASE_URL": pg_url, "S3_BUCKET": s3_bucket.name, "S3_ENDPOINT_URL": s3_bucket.endpoint_url,
            "S3_REGION": s3_bucket.region, "AWS_ACCESS_KEY_ID": s3_bucket.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3_bucket.secret_access_key, "REDIS_URL": redis_url, "JWT_SECRET": SECRET,
            "ADIUVA_DEFAULT_TIER": "team", "ADIUVA_ENV": "test"}


@pytest.fixture
async def nodes(cluster_env, tmp_path):
    started = [Node(tmp_path / f"node{i}", **cluster_env) for i in range(3)]
    try:
        await asyncio.gather(*(n.wait_ready() for n in started))
        yield started
    finally:
        for n in started:
            n.kill()
        for i, n in enumerate(started):  # shown when the test fails
            print(f"--- node {i} ---\n{n.output[-6000:]}")


class Client:
    """A desktop app whose requests a load balancer spreads round-robin over the nodes."""

    def __init__(self, http: aiohttp.ClientSession, nodes: list[Node]) -> None:
        self.http, self.nodes = http, nodes
        self._next = itertools.cycle(range(len(nodes)))
        self.headers: dict[str, str] = {}

    def node(self, i: int | None = None) -> Node:
        return self.nodes[next(self._next) if i is None else i]

    async def call(self, method: str, path: str, *, node: int | None = None, **kw) -> tuple[int, dict | bytes, dict]:
        headers = {**self.headers, **kw.pop("headers", {})}
        async with self.http.request(method, self.node(node).api + path, headers=headers, **kw) as r:
            body = await r.read()
            kind = r.headers.get("Content-Type", "")
            parsed = __import__("json").loads(body) if "json" in kind and body else body
            return r.status, parsed, dict(r.headers)

    async def register(self, email: str, node: int = 0) -> None:
        status, body, _ = await self.call("POST", "/auth/register", node=node,
                                          json={"email": email, "password": "correct horse battery"})
        assert status == 201, body
        self.headers = {"Authorization": f"Bearer {body['access_token']}"}


async def test_three_nodes_serve_one_cluster(nodes, cluster_env, tmp_path):
    async with aiohttp.ClientSession() as http:
        ada = Client(http, nodes)
        await ada.register("ada@example.org", node=0)
        for i in range(3):  # one token, every node
            status, me, _ = await ada.call("GET", "/auth/me", node=i)
            assert status == 200 and me["email"] == "ada@example.org"

        # An upload on one node, read back byte-identical on the others.
        data = os.urandom(1024 * 1024 + 7)
        status, meta, _ = await ada.call("POST", "/storage/records", node=1, params={"table": "notes"}, data=data,
                                         headers={"X-Checksum": sha(data)})
        assert status == 201, meta
        for i in (0, 2):
            status, body, headers = await ada.call("GET", f"/storage/records/{meta['id']}", node=i)
            assert status == 200 and body == data and headers["X-Checksum"] == sha(data)

        # Vectors written through one node, searched from each: equal to a float64 brute force.
        rng = np.random.default_rng(7)
        xs = rng.standard_normal((300, 24)).astype(np.float32)
        for start in range(0, 300, 100):
            items = [{"id": f"v{j}", "values": [float(v) for v in xs[j]],
                      "payload": base64.b64encode(b"sealed").decode(), "checksum": sha(b"sealed")}
                     for j in range(start, start + 100)]
            status, body, _ = await ada.call("POST", "/storage/vectors/upsert", node=start // 100,
                                             json={"vectors": items, "metric": "l2"})
            assert status == 200, body
        for i in range(3):
            q = rng.standard_normal(24).astype(np.float32)
            want = [f"v{j}" for j in np.argsort(np.linalg.norm(xs.astype(np.float64) - q, axis=1), kind="stable")[:10]]
            status, body, _ = await ada.call("POST", "/storage/vectors/search", node=i,
                                             json={"values": [float(v) for v in q], "top_k": 10})
            assert status == 200 and [m["id"] for m in body["matches"]] == want

        # A tier changed with the CLI counts on the very next request on every node.
        done = await asyncio.to_thread(run_cli, tmp_path / "admin", "user", "set-tier", "ada@example.org", "pro",
                                       **cluster_env)
        assert done.returncode == 0, done.stderr
        for i in range(3):
            assert (await ada.call("GET", "/auth/me", node=i))[1]["tier"] == "pro"

        # One rate limit for the whole cluster: free is 20 requests a minute, wherever they land.
        bob = Client(http, nodes)
        await bob.register("bob@example.org", node=2)
        done = await asyncio.to_thread(run_cli, tmp_path / "admin", "user", "set-tier", "bob@example.org", "free",
                                       **cluster_env)
        assert done.returncode == 0, done.stderr
        answers = [await bob.call("GET", "/auth/me") for _ in range(30)]
        statuses = [a[0] for a in answers]
        assert statuses.count(200) == 20 and statuses.count(429) == 10, statuses
        assert all(int(a[2]["Retry-After"]) > 0 for a in answers if a[0] == 429)

        # A disabled account stops on every node at once.
        done = await asyncio.to_thread(run_cli, tmp_path / "admin", "user", "disable", "ada@example.org", **cluster_env)
        assert done.returncode == 0, done.stderr
        for i in range(3):  # its token stops working, and it cannot sign in again
            status, body, _ = await ada.call("GET", "/auth/me", node=i)
            assert status == 401 and body["code"] == "invalid_token", body
            status, body, _ = await ada.call("POST", "/auth/login", node=i,
                                             json={"email": "ada@example.org", "password": "correct horse battery"})
            assert status == 403 and body["code"] == "account_disabled", body


async def test_kill_9_of_a_node_under_uploads_loses_no_acknowledged_upload(nodes):
    async with aiohttp.ClientSession() as http:
        ada = Client(http, nodes)
        await ada.register("ada@example.org", node=0)
        bodies = [os.urandom(200_000 + i) for i in range(40)]
        acked: dict[str, bytes] = {}

        async def upload(body: bytes) -> None:
            try:
                status, meta, _ = await ada.call("POST", "/storage/records", node=0, params={"table": "notes"},
                                                 data=body, headers={"X-Checksum": sha(body)})
            except aiohttp.ClientError:
                return  # cut off by the kill: never acknowledged
            if status == 201:
                acked[meta["id"]] = body

        tasks = [asyncio.ensure_future(upload(b)) for b in bodies]
        while len(acked) < 8:
            await asyncio.sleep(0.02)
        nodes[0].kill()  # SIGKILL with uploads in flight
        await asyncio.gather(*tasks)
        for rid, body in acked.items():
            for i in (1, 2):
                status, got, _ = await ada.call("GET", f"/storage/records/{rid}", node=i)
                assert status == 200 and got == body


async def test_postgresql_restarted_under_load_is_503_then_recovers(nodes, postgres_server):
    async with aiohttp.ClientSession() as http:
        ada = Client(http, nodes)
        await ada.register("ada@example.org", node=0)
        assert (await ada.call("GET", "/auth/me"))[0] == 200
        await asyncio.to_thread(postgres_server.halt)
        try:
            answers = [await ada.call("GET", "/auth/me") for _ in range(6)]
            for status, body, headers in answers:
                assert status == 503 and body["code"] == "database_unavailable", body
                assert int(headers["Retry-After"]) > 0
        finally:
            await asyncio.to_thread(postgres_server.resume)
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # every node reconnects on its own
            statuses = [(await ada.call("GET", "/auth/me", node=i))[0] for i in range(3)]
            if statuses == [200, 200, 200]:
                break
            assert asyncio.get_running_loop().time() < deadline, statuses
            await asyncio.sleep(0.5)
