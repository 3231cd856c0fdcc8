"""The OpenAPI document is generated from the routes and models the server really uses."""

from __future__ import annotations

import json

from tests.conftest import run_cli


async def test_every_route_is_documented(client):
    resp = await client.get("/api/v1/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    served = {
        (route.resource.canonical, route.method)
        for route in client.app.router.routes()
        if route.method not in ("HEAD", "*")
    }
    assert served == documented


async def test_document_matches_the_validation(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    register = doc["paths"]["/api/v1/auth/register"]["post"]
    ref = register["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert schema["properties"]["password"]["maxLength"] == 1024
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"email", "password"}
    # What the schema says is what the server enforces.
    resp = await client.post("/api/v1/auth/register", json={"email": "a@b.c", "password": "p" * 1025})
    assert resp.status == 422
    assert "201" in register["responses"] and "422" in register["responses"]
    me = doc["paths"]["/api/v1/auth/me"]["get"]
    assert me["security"] == [{"bearer": []}] and "401" in me["responses"]
    assert doc["paths"]["/api/v1/health"]["get"]["security"] == []


async def test_cli_prints_the_same_document(client, data_dir):
    served = await (await client.get("/api/v1/openapi.json")).json()
    out = run_cli(data_dir, "openapi")
    assert out.returncode == 0
    assert json.loads(out.stdout) == served
