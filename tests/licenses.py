"""Test licenses: signed with a key pair of the tests' own (never the production key), and a
clock the tests move instead of sleeping."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from adiuva_server.license.format import signed_bytes

TEST_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()  # "wrong key": a real signature, by someone else
T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)  # in the past: settings see these licenses expired


def public_b64(key: Ed25519PrivateKey = TEST_KEY) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_pem(key: Ed25519PrivateKey = TEST_KEY) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def body(now: dt.datetime = T0, *, days: float = 365, **fields) -> dict:
    """A license issued a day before `now`, expiring `days` after `now`."""
    out = {"id": "lic-0001", "licensee": "Example Hosting Ltd", "issued_at": (now - dt.timedelta(days=1)).isoformat(),
           "expires_at": (now + dt.timedelta(days=days)).isoformat(), "features": ["billing", "marketplace"]}
    out.update(fields)
    return {k: v for k, v in out.items() if v is not None}


def signed(license: dict, key: Ed25519PrivateKey = TEST_KEY) -> dict:
    return {"license": license, "signature": base64.b64encode(key.sign(signed_bytes(license))).decode()}


def write(path: Path, doc: dict | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc, indent=2).encode())
    return path


def tampered(doc: dict, **changes) -> dict:
    return {"license": {**doc["license"], **changes}, "signature": doc["signature"]}


class FakeClock:
    """Time stands still until `advance`; sleepers wake when their time has come."""

    def __init__(self, now: dt.datetime = T0) -> None:
        self.t = now
        self._moved = asyncio.Condition()

    def now(self) -> dt.datetime:
        return self.t

    async def sleep(self, seconds: float) -> None:
        deadline = self.t + dt.timedelta(seconds=seconds)
        async with self._moved:
            await self._moved.wait_for(lambda: self.t >= deadline)

    async def advance(self, **delta: float) -> None:
        async with self._moved:
            self.t += dt.timedelta(**delta)
            self._moved.notify_all()
