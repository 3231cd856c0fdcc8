"""The license file (DESIGN.md, "License file"): its format, and its verification offline.

    {"license": {...}, "signature": "<base64>"}

The signature is Ed25519 over `json.dumps(license, sort_keys=True, separators=(",", ":"))`,
checked against the production public key below or the one in ADIUVA_LICENSE_PUBLIC_KEY. The
production private key never enters this repository: the project keeps it offline and signs
licenses with it there.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

# The project's production key (32 raw bytes, base64). Tests sign with keys of their own and
# name them in ADIUVA_LICENSE_PUBLIC_KEY; a test proves this key refuses their licenses.
PRODUCTION_PUBLIC_KEY = "CvWyQialHpVJfgDF444euKlS/K5J462eVc/7Y5oehNY="

FEATURES = frozenset({"billing", "marketplace", "sso"})
DEFAULT_GRACE_DAYS = 14
MAX_FILE_BYTES = 64 * 1024  # a license is a few hundred bytes; anything bigger is not one
_FIELDS = {"id", "licensee", "issued_at", "expires_at", "features", "max_users", "grace_days"}


class LicenseError(Exception):
    """Why a license file cannot be used. `kind`: malformed, bad_signature, unknown_feature,
    not_yet_valid; the message says it for people, in one sentence."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class License:
    id: str
    licensee: str
    issued_at: dt.datetime  # aware, UTC
    expires_at: dt.datetime
    features: frozenset[str]
    max_users: int | None = None
    grace_days: int = DEFAULT_GRACE_DAYS

    @property
    def grace_ends_at(self) -> dt.datetime:
        return self.expires_at + dt.timedelta(days=self.grace_days)


def signed_bytes(license: dict) -> bytes:
    """The exact bytes the signature covers."""
    return json.dumps(license, sort_keys=True, separators=(",", ":")).encode()


def load_public_key(text: str | None) -> Ed25519PublicKey:
    """The verifying key: `text` as base64 of the 32 raw bytes or as a PEM; empty or None: the
    production key. ValueError (with a message for people) when it is neither."""
    text = (text or "").strip() or PRODUCTION_PUBLIC_KEY
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError:
            raise ValueError("is not a readable PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("is a PEM public key but not an Ed25519 one")
        return key
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be the base64 of 32 raw Ed25519 key bytes, or a PEM") from None
    if len(raw) != 32:
        raise ValueError(f"must be 32 bytes once base64-decoded, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def parse(raw: bytes, key: Ed25519PublicKey) -> License:
    """Verify a license file's bytes and return its contents; LicenseError says why not. The
    signature is checked before any field is trusted; the fields after it."""
    if len(raw) > MAX_FILE_BYTES:
        raise LicenseError("malformed", f"the file is {len(raw)} bytes, too big to be a license")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise LicenseError("malformed", "the file is not JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"license", "signature"}:
        raise LicenseError("malformed", 'the file must be a JSON object with exactly "license" and "signature"')
    body, signature = doc["license"], doc["signature"]
    if not isinstance(body, dict) or not isinstance(signature, str):
        raise LicenseError("malformed", '"license" must be an object and "signature" a base64 string')
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise LicenseError("malformed", "the signature is not base64") from None
    try:
        key.verify(sig, signed_bytes(body))
    except InvalidSignature:
        # Ed25519 cannot tell the two apart: say both, plainly.
        raise LicenseError("bad_signature", "the signature does not match: the license was changed after it was "
                           "signed, or it was signed for another public key (ADIUVA_LICENSE_PUBLIC_KEY)") from None
    return _fields(body)


def _fields(body: dict) -> License:
    unknown = set(body) - _FIELDS
    if unknown:
        raise LicenseError("malformed", f"unknown field(s) {', '.join(sorted(unknown))}")
    for name in ("id", "licensee"):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise LicenseError("malformed", f'"{name}" must be a non-empty string')
    issued, expires = _time(body, "issued_at"), _time(body, "expires_at")
    if expires <= issued:
        raise LicenseError("malformed", '"expires_at" must be after "issued_at"')
    features = body.get("features")
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise LicenseError("malformed", '"features" must be a list of strings')
    if unknown_features := sorted(set(features) - FEATURES):
        raise LicenseError("unknown_feature", f"unknown feature(s) {', '.join(unknown_features)}; this server knows "
                           f"{', '.join(sorted(FEATURES))} (a newer license for a newer server?)")
    max_users = _count(body, "max_users", None, 1)
    grace_days = _count(body, "grace_days", DEFAULT_GRACE_DAYS, 0)
    return License(body["id"], body["licensee"], issued, expires, frozenset(features), max_users, grace_days)


def _time(body: dict, name: str) -> dt.datetime:
    value = body.get(name)
    try:
        parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise LicenseError("malformed", f'"{name}" must be an ISO 8601 date and time, got {value!r}')
    if parsed.tzinfo is None:  # a bare date or local time: read as UTC, as licenses are issued
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _count(body: dict, name: str, default: int | None, lowest: int) -> int | None:
    if name not in body:
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest or value > 10**9:
        raise LicenseError("malformed", f'"{name}" must be a whole number of at least {lowest}, got {value!r}')
    return value
