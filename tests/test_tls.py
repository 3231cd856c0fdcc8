"""`adiuva serve --tls`: a self-signed certificate kept in the data dir, its fingerprint
printed for pinning, stable across restarts; or the admin's own certificate."""

from __future__ import annotations

import hashlib
import ssl
import stat
import os

import aiohttp

from adiuva_server import tls
from tests.conftest import run_cli


async def get_health(url: str, cafile) -> tuple[int, bytes]:
    """Health over TLS, verifying the certificate against `cafile` (hostname 127.0.0.1
    included), and the DER bytes of the certificate the server presented."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/api/v1/health", ssl=ctx) as resp:
            status = resp.status
    host, port = url.split("://")[1].rsplit(":", 1)
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, int(port))))
    return status, der


def printed_fingerprint(output: list[str]) -> str:
    line = next(l for l in output if "fingerprint" in l)
    return line.rsplit(" ", 1)[1].strip()


async def test_self_signed_certificate_is_made_once_and_pinnable(data_dir, server_process):
    server = start_tls(server_process)
    out = server.output
    assert any(f"https://127.0.0.1:{server.port}" in l for l in out)
    cert = data_dir / "tls" / "cert.pem"
    assert stat.S_IMODE(os.stat(data_dir / "tls" / "key.pem").st_mode) == 0o600
    status, der = await get_health(server.url.replace("http:", "https:"), cert)
    assert status == 200
    pin = printed_fingerprint(out)
    assert pin == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    # Plain HTTP on the TLS port is refused.
    async with aiohttp.ClientSession() as http:
        try:
            await http.get(server.url + "/api/v1/health")
        except aiohttp.ClientError:
            pass
        else:
            raise AssertionError("plain HTTP answered on the TLS port")
    assert server.stop() == 0
    again = start_tls(server_process)
    assert printed_fingerprint(again.output) == pin
    assert again.stop() == 0


async def test_own_certificate(tmp_path, data_dir, server_process):
    own = tmp_path / "own"
    own.mkdir()
    cert, key = tls.self_signed(own, [])
    server = start_tls(server_process, "--cert", str(cert), "--key", str(key))
    status, _ = await get_health(server.url.replace("http:", "https:"), cert)
    assert status == 200
    assert printed_fingerprint(server.output) == tls.fingerprint(cert.read_bytes())
    assert not (data_dir / "tls").exists()
    assert server.stop() == 0


def test_bad_tls_arguments(tmp_path, data_dir):
    out = run_cli(data_dir, "serve", "--cert", str(tmp_path / "missing.pem"), "--key", str(tmp_path / "k.pem"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    out = run_cli(data_dir, "serve", "--cert", str(junk), "--key", str(junk), "--port", "0")
    assert out.returncode == 2 and "cannot load TLS certificate" in out.stderr, out.stderr
    out = run_cli(data_dir, "serve", "--cert", str(junk))
    assert out.returncode == 2 and "both a TLS certificate and its key" in out.stderr


def start_tls(server_process, *args):
    server = server_process(extra_args=("--tls", *args))
    # Read the rest of the banner (URLs, then the fingerprint line).
    while not any("fingerprint" in l for l in server.output):
        server.output.append(server.proc.stdout.readline())
    return server
