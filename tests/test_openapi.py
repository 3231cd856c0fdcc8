"""The OpenAPI document is generated from the routes and models the server really uses."""

from __future__ import annotations

import json

from openapi_spec_validator import OpenAPIV31SpecValidator

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
        # The admin console's HTML pages (adiuva_server/console) are not part of the API.
        and not (route.resource.canonical == "/admin" or route.resource.canonical.startswith("/admin/"))
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


async def test_document_is_valid_openapi_31_and_tells_what_the_server_does(client):
    doc = await (await client.get("/api/v1/openapi.json")).json()
    assert [str(e) for e in OpenAPIV31SpecValidator(doc).iter_errors()] == []
    paths = doc["paths"]
    post_record = paths["/api/v1/storage/records"]["post"]
    assert {p["name"]: p["required"] for p in post_record["parameters"] if p["in"] == "header"} == {"X-Checksum": True}
    put_backup = paths["/api/v1/backup"]["put"]
    assert all(p["required"] for p in put_backup["parameters"] if p["name"].startswith("X-Backup-"))
    for path in ("/api/v1/storage/records/{record_id}", "/api/v1/backup", "/api/v1/backup/{backup_id}"):
        assert "304" in paths[path]["get"]["responses"], path
    assert "400" in paths["/api/v1/auth/register"]["post"]["responses"]
    assert [p["name"] for p in paths["/api/v1/chat/stream"]["get"]["parameters"]] == ["token"]
