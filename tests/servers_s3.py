"""A real S3 server for the tests: moto's standalone server (`moto[server]`, a Werkzeug app on a
thread), started once per test session on a free loopback port and spoken to over HTTP by
aiobotocore, as an S3-compatible store in production is. Each test gets a bucket of its own."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass

import pytest

# moto accepts any keys; these only have to be present so botocore signs its requests.
ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Bucket:
    endpoint_url: str
    name: str
    region: str = REGION
    access_key_id: str = ACCESS_KEY
    secret_access_key: str = SECRET_KEY

    def store(self, **kwargs):
        from adiuva_server.storage.s3 import S3BlobStore

        return S3BlobStore(self.name, endpoint_url=self.endpoint_url, region=self.region,
                           access_key_id=self.access_key_id, secret_access_key=self.secret_access_key, **kwargs)


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint) -> S3Bucket:
    """A new, empty bucket on the session's S3 server (made with boto3, which moto brings: a
    plain fixture, usable from sync and async fixtures alike)."""
    import boto3

    bucket = S3Bucket(s3_endpoint, f"test-{uuid.uuid4().hex[:16]}")
    boto3.client("s3", region_name=REGION, endpoint_url=s3_endpoint, aws_access_key_id=ACCESS_KEY,
                 aws_secret_access_key=SECRET_KEY).create_bucket(Bucket=bucket.name)
    return bucket
