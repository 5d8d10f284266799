"""POST /api/tokens: read tokens scoped to named generations or a user topic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jwt
import pytest

from nimu_rt.auth import SCOPED_ISSUER
from tests.conftest import Api
from tests.realtime.conftest import open_ws
from tests.security.conftest import (
    bearer,
    claims,
    confirmed,
    paused_api,
    with_video,
)


@pytest.fixture
def backend() -> str:
    # Scopes are checked before the store is read.
    return "sqlite"


@pytest.fixture
async def api(api_factory: Callable[..., Any]) -> Api:
    return await paused_api(api_factory)


async def mint(api: Api, user: str = "alice", role: str = "user", **body: Any):
    return await api.client.post(
        "/api/tokens", json=body, headers=api.headers(user, role)
    )


async def scoped_token(api: Api, **body: Any) -> str:
    r = await mint(api, **body)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def denied(r: Any) -> None:
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "scope_denied"


async def test_a_user_mints_a_token_for_their_own_generation(api: Api):
    g = await api.create()
    r = await mint(api, generationIds=[g["id"]], userTopic=True)
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    doc = r.json()
    assert doc["userId"] == "alice"
    assert doc["tokenType"] == "Bearer"
    assert doc["scopes"] == [f"generation:{g['id']}", "user:alice"]
    assert doc["expiresInSeconds"] == 600  # auth.scoped_token_ttl_s
    claims_ = jwt.decode(doc["token"], options={"verify_signature": False})
    assert claims_["iss"] == SCOPED_ISSUER and "role" not in claims_


async def test_a_scoped_token_reads_what_it_names(api: Api):
    g = await confirmed(api)
    video = await with_video(api, g["id"])
    token = await scoped_token(api, generationIds=[g["id"]])
    base = f"/api/generations/{g['id']}"
    r = await api.client.get(base, headers=bearer(token))
    assert r.status_code == 200 and r.json()["seq"] == video["seq"]
    r = await api.client.get(base + "/events", headers=bearer(token))
    assert r.status_code == 200 and r.json()["items"][0]["type"] == "created"
    r = await api.client.get(
        base,
        params={"waitSeconds": 0.05, "sinceSeq": video["seq"]},
        headers=bearer(token),
    )
    assert r.status_code == 304, r.text  # long-poll: nothing new
    r = await api.client.get(f"/api/storage/videos/{g['id']}", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert "/api/storage/objects/videos/alice/" in r.json()["url"]


async def test_a_scoped_token_is_refused_everywhere_else(api: Api):
    g = await api.create()
    other = await api.create()
    token = await scoped_token(api, generationIds=[g["id"]])
    h = bearer(token)
    c = api.client
    # Another generation of the same user, and every write or list.
    denied(await c.get(f"/api/generations/{other['id']}", headers=h))
    denied(await c.get(f"/api/generations/{other['id']}/events", headers=h))
    denied(await c.get(f"/api/storage/videos/{other['id']}", headers=h))
    denied(await c.get("/api/generations", headers=h))
    denied(await c.post("/api/generations", json={"prompt": "a cat"}, headers=h))
    usd = g["costEstimate"]["usd"]
    for action, body in [
        ("confirm", {"acceptedCostUsd": usd}),
        ("cancel", None),
        ("retry", None),
        ("clarify", {"answers": {}}),
    ]:
        denied(await c.post(f"/api/generations/{g['id']}/{action}", json=body,
                            headers=h))
    denied(await c.delete(f"/api/storage/videos/{g['id']}", headers=h))
    denied(await c.post("/api/storage/uploads",
                        json={"contentType": "image/png", "sizeBytes": 10}, headers=h))
    denied(await c.post("/api/tokens", json={"userTopic": True}, headers=h))
    denied(await c.get(f"/api/queue/jobs/{g['id']}", headers=h))
    denied(await c.get("/api/queue", headers=h))
    denied(await c.get("/metrics", headers=h))
    # Nothing was written by any of that.
    r = await c.get(f"/api/generations/{g['id']}", headers=api.headers())
    assert r.json()["seq"] == g["seq"] and r.json()["status"] == g["status"]
    listed = (await c.get("/api/generations", headers=api.headers())).json()
    assert {item["id"] for item in listed["items"]} == {g["id"], other["id"]}


async def test_websocket_topics_follow_the_scope(api: Api):
    g = await api.create()
    other = await api.create()
    only_g = await scoped_token(api, generationIds=[g["id"]])
    async with open_ws(api, user=None) as ws:
        await ws.send(op="auth", token=only_g)  # as a browser does
        assert (await ws.subscribe(f"generation:{g['id']}"))["op"] == "subscribed"
        for topic in (f"generation:{other['id']}", "user:alice", "queue"):
            frame = await ws.subscribe(topic)
            assert (frame["op"], frame["code"], frame["topic"]) == (
                "error", "scope_denied", topic
            )
    with_user = await scoped_token(api, userTopic=True)
    async with open_ws(
        api, user=None, additional_headers=bearer(with_user)
    ) as ws:
        assert (await ws.subscribe("user:alice"))["op"] == "subscribed"
        frame = await ws.subscribe(f"generation:{g['id']}")
        assert frame["code"] == "scope_denied"


async def test_only_what_the_owner_owns_can_be_named(api: Api):
    bobs = await api.create(user="bob")
    r = await mint(api, generationIds=[bobs["id"]])
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    r = await mint(api, generationIds=["not-an-id"])
    assert (r.status_code, r.json()["code"]) == (404, "not_found")
    # A user cannot mint for someone else ...
    r = await mint(api, userId="bob", userTopic=True)
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    r = await mint(api, "ops", "admin", userId="bob", userTopic=True)
    assert (r.status_code, r.json()["code"]) == (403, "forbidden")
    # ... a service can, and only for that user's generations.
    r = await mint(api, "web", "service", userId="bob", generationIds=[bobs["id"]])
    assert r.status_code == 201, r.text
    assert r.json()["userId"] == "bob"
    token = r.json()["token"]
    got = await api.client.get(f"/api/generations/{bobs['id']}", headers=bearer(token))
    assert got.status_code == 200
    alices = await api.create()
    r = await mint(api, "web", "service", userId="bob", generationIds=[alices["id"]])
    assert (r.status_code, r.json()["code"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({}, "$"),
        ({"userTopic": True, "ttlSeconds": 3601}, "$.ttlSeconds"),
        ({"userTopic": True, "ttlSeconds": 0}, "$.ttlSeconds"),
        ({"generationIds": ["x" * 300]}, "$.generationIds[0]"),
        ({"userTopic": True, "scope": "admin"}, "$"),
    ],
    ids=["nothing-named", "ttl-over-max", "ttl-zero", "bad-id", "unknown-field"],
)
async def test_bad_requests_mint_nothing(api: Api, body: dict[str, Any], path: str):
    r = await mint(api, **body)
    assert (r.status_code, r.json()["code"]) == (422, "validation_failed")
    assert r.json()["errors"][0]["path"] == path


async def test_forged_or_stale_scoped_tokens_are_refused(api: Api):
    g = await api.create()
    secret = api.services.auth._secret
    scoped = {
        "iss": SCOPED_ISSUER,
        "aud": SCOPED_ISSUER,
        "scope": f"generation:{g['id']}",
    }
    cases = [
        # Expired (the leeway is 30 s).
        (jwt.encode(claims(exp_in_s=-120, **scoped), secret), "expired"),
        # A role smuggled into a scoped token.
        (jwt.encode(claims(role="admin", **scoped), secret), "role"),
        # An empty scope.
        (jwt.encode(claims(**{**scoped, "scope": " "}), secret), "scope"),
        # Signed with another key.
        (jwt.encode(claims(**scoped), "another-secret-long-enough-for-hs256"),
         "not valid"),
    ]
    for token, detail in cases:
        r = await api.client.get(f"/api/generations/{g['id']}", headers=bearer(token))
        assert r.status_code == 401, (detail, r.text)
        assert detail in r.json()["detail"]
