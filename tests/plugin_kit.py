"""Plugin folders and packages for the marketplace tests, and the desktop app's verification
written from README's scheme alone (not with the server's own code)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from adiuva_server.marketplace.checks import build_package

API = "/api/v1"


def manifest(**overrides) -> dict:
    m = {"id": "focus-timer", "name": "Focus Timer", "description": "Pomodoro timers on tasks.", "version": "1.0.0",
         "author": "Grace", "category": "Productivity", "price_cents": 0, "currency": "EUR",
         "permissions": ["tasks:read"], "main": "index.js"}
    m.update(overrides)
    return {k: v for k, v in m.items() if v is not None}


def plugin_folder(root: Path, files: dict[str, bytes | str] | None = None, **overrides) -> Path:
    m = manifest(**overrides)
    folder = root / f"{m.get('id', 'plugin')}-{m.get('version', 'x')}-{len(list(root.glob('*')))}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(m))
    for name, data in (files if files is not None else {"index.js": "export default {};\n"}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return folder


def package(root: Path, files: dict[str, bytes | str] | None = None, **overrides) -> bytes:
    return build_package(plugin_folder(root, files, **overrides))


def raw_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A hand-made package (for what build_package would never write)."""
    import gzip

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(buf.getvalue())


def tar_file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def readme_verify(public_key_b64: str, plugin_id: str, version: str, package_bytes: bytes, signature_b64: str) -> bool:
    """README 'Plugins': Ed25519 over "adiuva-plugin-v1\\n{id}\\n{version}\\n{sha256 hex}\\n"."""
    digest = hashlib.sha256(package_bytes).hexdigest()
    msg = f"adiuva-plugin-v1\n{plugin_id}\n{version}\n{digest}\n".encode()
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    try:
        key.verify(base64.b64decode(signature_b64), msg)
    except InvalidSignature:
        return False
    return True


async def submit(client, headers: dict, data: bytes, path: str = "/admin/plugins"):
    return await client.post(API + path, data=data, headers={**headers, "Content-Type": "application/octet-stream"})
