"""Package signatures: what the server signs at approval and the desktop app verifies.

The scheme (README, "Plugins", repeats it for client authors):

    message   = "adiuva-plugin-v1\\n" + id + "\\n" + version + "\\n" + sha256_hex(package) + "\\n"   (UTF-8)
    signature = Ed25519(server key, message), sent base64 (standard alphabet, padded)

Signing a statement that names the plugin and version, not only the bytes, means a validly
signed package cannot be passed off as another plugin or as another (say, a revoked or older)
version of the same one. `key_id` is the first 16 hex digits of SHA-256 of the raw public key.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SCHEME = "adiuva-plugin-v1"
ALGORITHM = "Ed25519"


def message(plugin_id: str, version: str, checksum: str) -> bytes:
    return f"{SCHEME}\n{plugin_id}\n{version}\n{checksum}\n".encode()


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    key_id: str
    private_raw: bytes
    public_raw: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        private_raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                            serialization.NoEncryption())
        public_raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key_id(public_raw), private_raw, public_raw)

    def __repr__(self) -> str:  # never print the private key
        return f"SigningKey(key_id={self.key_id!r})"

    def sign(self, plugin_id: str, version: str, checksum: str) -> str:
        signature = Ed25519PrivateKey.from_private_bytes(self.private_raw).sign(message(plugin_id, version, checksum))
        return base64.b64encode(signature).decode()

    @property
    def public_pem(self) -> str:
        return Ed25519PublicKey.from_public_bytes(self.public_raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def verify(public_raw: bytes, plugin_id: str, version: str, package: bytes, signature_b64: str) -> bool:
    """What the desktop app does with a downloaded package (and what the tests do)."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        Ed25519PublicKey.from_public_bytes(public_raw).verify(
            signature, message(plugin_id, version, hashlib.sha256(package).hexdigest()))
    except (InvalidSignature, ValueError):
        return False
    return True
