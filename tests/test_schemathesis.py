"""Schemathesis against the served OpenAPI document: every operation, authenticated, with
generated valid and invalid input. No 5xx, no status, content type, header or body outside
what the document says. Bounded (examples per operation) so CI stays well inside its time.

The server is `adiuva serve` in a subprocess on a loopback port, as a user runs it; the
hypothesis-driven client is synchronous, so it cannot share pytest-aiohttp's event loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
    use_after_free,
)

from tests.conftest import cli_env, free_port
from tests.fake_llm import FakeLLM

EXAMPLES = int(os.environ.get("ADIUVA_SCHEMATHESIS_EXAMPLES", "50"))


class FakeLLMThread:
    """The local Ollama stand-in on its own event loop, so chat answers (a 503 is a 5xx too)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.fake = FakeLLM()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self.fake.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.fake.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Served:
    def __init__(self, data_dir: Path, log: Path, llm_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = cli_env(
            data_dir,
            ADIUVA_DEFAULT_TIER="team",
            # Generated traffic is thousands of requests a minute; the limits have their own tests.
            ADIUVA_RATE_LIMITS="free=100000,pro=100000,power=100000,team=100000",
            OLLAMA_HOST=llm_url,
            ADIUVA_LOG_LEVEL="WARNING",
        )
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adiuva_server", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/api/v1/health", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not start:\n" + log.read_text())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("schemathesis")
    llm = FakeLLMThread()
    server = Served(base / "data", base / "server.log", llm.url)
    yield server
    server.stop()
    llm.stop()
    # A 5xx writes a traceback at ERROR; the checks below catch the answer, this the log.
    log = (base / "server.log").read_text()
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="module")
def token(served) -> str:
    resp = requests.post(served.url + "/api/v1/auth/register",
                         json={"email": "fuzz@example.org", "password": "correct horse battery"}, timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()["access_token"]


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(served.url + "/api/v1/openapi.json")


def _operations() -> list[tuple[str, str]]:
    from adiuva_server.app import FEATURES

    # The WebSocket upgrade is documented as a GET but is not an HTTP exchange: test_chat.py drives it.
    cases = []
    for spec in (s for feature in FEATURES for s in feature.specs):
        if spec.full_path == "/api/v1/chat/stream":
            continue
        cases.append((spec.method, spec.full_path, GenerationMode.POSITIVE))
        # Negative input needs a schema to violate: path parameters and headers are free strings.
        if spec.body or spec.query:
            cases.append((spec.method, spec.full_path, GenerationMode.NEGATIVE))
    return cases


@pytest.mark.parametrize(("method", "path", "mode"), _operations(),
                         ids=lambda v: v.value if isinstance(v, GenerationMode) else v)
def test_every_operation_conforms(api_schema, served, token, method, path, mode):
    operation = api_schema[path][method]
    auth = {"Authorization": f"Bearer {token}"}

    @given(case=operation.as_strategy(generation_mode=mode, headers=auth))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def exchange(case):
        # Stateful checks need links between operations that the document does not declare;
        # the rest (no 5xx, status codes, content types, headers, response schemas) all apply.
        case.call_and_validate(base_url=served.url, timeout=30,
                               excluded_checks=[ignored_auth, use_after_free, positive_data_acceptance, negative_data_rejection])

    exchange()
