"""/metrics: Prometheus' text format, behind a bearer token, with bounded labels."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adiuva_server.app import create_app
from adiuva_server.keys import METRICS
from adiuva_server.server_backup import backup_dir, create_backup
from tests.conftest import both_backends, make_settings, register
from tests.fake_llm import FakeLLM, Reply

TOKEN = "metrics-token-" + "x" * 24
SCRAPE = {"Authorization": f"Bearer {TOKEN}"}
RECORDS = "/api/v1/storage/records"


@pytest.fixture
def settings(data_dir):
    return make_settings(data_dir, metrics_token=TOKEN, default_tier="team", login_failures_per_account=3)


async def scrape(client) -> dict[tuple[str, frozenset], float]:
    resp = await client.get("/metrics", headers=SCRAPE)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def routes(samples) -> set[str]:
    return {dict(ls)["route"] for (n, ls), _ in samples.items() if n == "adiuva_http_requests_total"}


async def test_without_a_token_setting_there_is_no_endpoint(aiohttp_client, data_dir):
    client = await aiohttp_client(create_app(make_settings(data_dir)))
    resp = await client.get("/metrics", headers=SCRAPE)
    unknown = await client.get("/nothing-here")
    assert resp.status == unknown.status == 404
    assert (await resp.json())["code"] == (await unknown.json())["code"] == "not_found"


async def test_scraping_needs_the_token_and_a_wrong_one_is_the_same_as_none(client):
    answers = []
    for headers in ({}, {"Authorization": "Bearer " + "y" * len(TOKEN)}, {"Authorization": "Bearer " + TOKEN[:-1]},
                    {"Authorization": "Bearer " + TOKEN + "z"}, {"Authorization": "Basic " + TOKEN},
                    {"Authorization": TOKEN}, {"Authorization": "Bearer"}):
        resp = await client.get("/metrics", headers=headers)
        answers.append((resp.status, resp.headers.get("WWW-Authenticate"), (await resp.json())["code"]))
    assert set(answers) == {(401, 'Bearer realm="metrics"', "unauthorized")}
    samples = await scrape(client)  # the right token
    assert value(samples, "adiuva_http_requests_total", route="/metrics", status="401") == len(answers)


async def test_counters_move_with_requests_and_failed_logins(client):
    before = await scrape(client)
    acct = await register(client)
    for _ in range(3):
        assert (await client.get("/api/v1/auth/me", headers=acct.headers)).status == 200
    wrong = {"email": acct.email, "password": "not the password"}
    statuses = [(await client.post("/api/v1/auth/login", json=wrong)).status for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]  # the account's throttle: 3 failures
    assert (await client.post("/api/v1/auth/refresh", json={"refresh_token": "forged"})).status == 401
    after = await scrape(client)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    me = {"method": "GET", "route": "/api/v1/auth/me"}
    assert moved("adiuva_http_requests_total", status="200", **me) == 3
    assert moved("adiuva_http_request_duration_seconds_count", **me) == 3
    assert 0 < moved("adiuva_http_request_duration_seconds_sum", **me) < 3 * 10
    assert moved("adiuva_http_requests_total", method="POST", route="/api/v1/auth/register", status="201") == 1
    login = "/api/v1/auth/login"
    assert moved("adiuva_auth_failures_total", route=login, code="invalid_credentials") == 3
    assert moved("adiuva_auth_throttled_total", route=login) == 2
    assert moved("adiuva_auth_failures_total", route="/api/v1/auth/refresh") == 1
    assert moved("adiuva_http_requests_total", route=login, status="429") == 2
    assert value(after, "adiuva_http_requests_in_flight") == 1  # the scrape itself


async def test_route_label_is_the_canonical_path_however_many_urls(client):
    acct = await register(client)
    ids = [str(uuid.uuid4()) for _ in range(25)]
    for record_id in ids:
        assert (await client.get(f"{RECORDS}/{record_id}", headers=acct.headers)).status == 404
        assert (await client.get(f"/api/v1/no/such/{record_id}")).status == 404
        assert (await client.request("PROPFIND", f"/api/v1/{record_id}")).status in (404, 405)
    samples = await scrape(client)
    labels = routes(samples)
    assert not any(record_id in label for label in labels for record_id in ids)
    assert value(samples, "adiuva_http_requests_total", route=f"{RECORDS}/{{record_id}}", status="404") == 25
    assert value(samples, "adiuva_http_requests_total", route="unmatched", method="GET", status="404") == 25
    assert value(samples, "adiuva_http_requests_total", route="unmatched", method="other", status="404") == 25
    # Bounded: the label sets are the routes (plus one), whatever URLs were asked for.
    served = {r.resource.canonical for r in client.app.router.routes()}
    assert labels <= served | {"unmatched"}
    series = [ls for (n, ls), _ in samples.items() if n == "adiuva_http_requests_total"]
    assert len(series) < 10


@both_backends  # the totals come from the admin store of either backend
async def test_storage_vectors_and_backup_age_from_the_server(client, settings):
    acct = await register(client)
    data = b"\x01sealed bytes" * 100
    resp = await client.post(RECORDS, params={"table": "notes"}, data=data,
                             headers={**acct.headers, "X-Checksum": hashlib.sha256(data).hexdigest()})
    assert resp.status == 201, await resp.text()
    payload = b"sealed vector"
    vectors = [{"id": f"v{i}", "values": [float(i), 1.0], "payload": "c2VhbGVkIHZlY3Rvcg==",
                "checksum": hashlib.sha256(payload).hexdigest()} for i in range(3)]
    resp = await client.post("/api/v1/storage/vectors/upsert", json={"vectors": vectors}, headers=acct.headers)
    assert resp.status == 200, await resp.text()
    samples = await scrape(client)
    assert value(samples, "adiuva_storage_bytes", kind="records") == len(data)
    assert value(samples, "adiuva_records") == 1 and value(samples, "adiuva_users") == 1
    assert value(samples, "adiuva_vectors") == 3
    assert value(samples, "adiuva_server_backups") == 0
    assert not value(samples, "adiuva_server_backup_age_seconds")  # no archive: no age

    # Within the cache interval a scrape costs no database read (and shows the old totals).
    resp = await client.post(RECORDS, params={"table": "notes"}, data=b"more",
                             headers={**acct.headers, "X-Checksum": hashlib.sha256(b"more").hexdigest()})
    assert resp.status == 201
    assert value(await scrape(client), "adiuva_records") == 1

    await create_backup(settings)  # a real archive, named by its UTC time
    (backup_dir(settings) / "adiuva-20991231T235959Z.tar.partial").write_bytes(b"")  # unfinished: ignored
    await asyncio.sleep(1.1)
    client.app[METRICS].totals_ttl = 0
    samples = await scrape(client)
    assert value(samples, "adiuva_records") == 2
    assert value(samples, "adiuva_storage_bytes", kind="records") == len(data) + 4
    assert value(samples, "adiuva_server_backups") == 1
    assert 1.0 <= value(samples, "adiuva_server_backup_age_seconds") < 120


async def test_llm_calls_and_errors_come_from_the_chat_answers(aiohttp_client, data_dir):
    fake = FakeLLM()
    await fake.start()
    try:
        settings = make_settings(data_dir, metrics_token=TOKEN, ollama_host=fake.url, llm_model="ollama/fake",
                                 llm_router_model="ollama/fake-router", llm_timeout=2.0)
        client = await aiohttp_client(create_app(settings))
        acct = await register(client)
        fake.router = "task_agent"
        fake.script(Reply(text="done"))
        assert (await client.post("/api/v1/chat", json={"message": "hi"}, headers=acct.headers)).status == 200
        fake.script(Reply(status=500))
        assert (await client.post("/api/v1/chat", json={"message": "hi"}, headers=acct.headers)).status == 503
        # Refused before any model is asked: not a call.
        assert (await client.post("/api/v1/chat", json={"nothing": 1}, headers=acct.headers)).status == 422
        samples = await scrape(client)
    finally:
        await fake.stop()
    chat = "/api/v1/chat"
    assert value(samples, "adiuva_llm_calls_total", route=chat) == 2
    assert value(samples, "adiuva_llm_errors_total", route=chat) == 1
    assert value(samples, "adiuva_llm_errors_total", route=chat, code="llm_unavailable") == 1


async def test_each_app_has_its_own_registry(aiohttp_client, tmp_path):
    one = await aiohttp_client(create_app(make_settings(tmp_path / "one", metrics_token=TOKEN)))
    two = await aiohttp_client(create_app(make_settings(tmp_path / "two", metrics_token=TOKEN)))
    assert one.app[METRICS].registry is not two.app[METRICS].registry
    for _ in range(4):
        await one.get("/api/v1/health")
    health = {"route": "/api/v1/health", "status": "200"}
    assert value(await scrape(one), "adiuva_http_requests_total", **health) == 4
    assert value(await scrape(two), "adiuva_http_requests_total", **health) == 0


async def test_a_slow_scrape_read_does_not_stall_other_requests(client, monkeypatch):
    """The totals are read on the database's worker threads: the event loop goes on."""
    import adiuva_server.admin.store as admin_store

    real = admin_store.read_totals

    def slow(conn):
        time.sleep(1.0)
        return real(conn)

    monkeypatch.setattr(admin_store, "read_totals", slow)
    scraping = asyncio.create_task(client.get("/metrics", headers=SCRAPE))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    assert (await client.get("/api/v1/health")).status == 200
    assert time.monotonic() - started < 0.5
    assert not scraping.done()
    assert (await scraping).status == 200
