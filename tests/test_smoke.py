async def test_health(client):
    resp = await client.get("/api/v1/health")
    assert resp.status == 200
    assert (await resp.json())["status"] == "ok"


async def test_me(client, account):
    resp = await client.get("/api/v1/auth/me", headers=account.headers)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["email"] == "ada@example.org" and body["tier"] == "team"
