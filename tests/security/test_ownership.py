"""Another user's ids are answered as if they did not exist; roles guard ops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import Api
from tests.realtime.conftest import open_ws
from tests.security.conftest import confirmed, paused_api, with_video


@pytest.fixture
async def api(api_factory: Callable[..., Any]) -> Api:
    return await paused_api(api_factory)


async def test_every_generation_and_video_route_hides_other_users_ids(api: Api):
    # Bob has a generation awaiting confirmation, a queued one and one with
    # a stored video; Alice tries every route on each.
    waiting = await api.create(user="bob")
    queued = await confirmed(api, user="bob")
    stored = await confirmed(api, user="bob")
    await with_video(api, stored["id"])
    bob = api.headers("bob")
    before = {
        g["id"]: (await api.client.get(f"/api/generations/{g['id']}", headers=bob))
        .json()
        for g in (waiting, queued, stored)
    }
    alice = api.headers("alice")
    c = api.client
    attempts: list[tuple[str, str, dict[str, Any] | None]] = []
    for g in (waiting, queued, stored):
        base = f"/api/generations/{g['id']}"
        attempts += [
            ("GET", base, None),
            ("GET", base + "?waitSeconds=0.05&sinceSeq=1", None),
            ("GET", base + "/events", None),
            ("POST", base + "/clarify", {"answers": {}}),
            ("POST", base + "/confirm", {"acceptedCostUsd": 100}),
            ("POST", base + "/cancel", None),
            ("POST", base + "/retry", None),
            ("GET", f"/api/storage/videos/{g['id']}", None),
            ("DELETE", f"/api/storage/videos/{g['id']}", None),
        ]
    attempts.append(("GET", f"/api/queue/jobs/{queued['jobId']}", None))
    attempts.append(("POST", "/api/tokens", {"generationIds": [stored["id"]]}))
    for method, url, body in attempts:
        r = await c.request(method, url, json=body, headers=alice)
        assert (r.status_code, r.json()["code"]) == (404, "not_found"), (
            method,
            url,
            r.text,
        )
    # Nothing of Bob's changed: no event but the queue's own position
    # updates, the same status, the video still there.
    for generation_id, snapshot in before.items():
        r = await c.get(
            f"/api/generations/{generation_id}/events",
            params={"sinceSeq": snapshot["seq"]},
            headers=bob,
        )
        assert {e["type"] for e in r.json()["items"]} <= {"queue"}
        r = await c.get(f"/api/generations/{generation_id}", headers=bob)
        for field in ("status", "video", "clarification", "jobId", "error"):
            assert r.json()[field] == snapshot[field]
    r = await c.get(f"/api/storage/videos/{stored['id']}", headers=bob)
    assert r.status_code == 200
    # Alice's list does not show them either.
    r = await c.get("/api/generations", headers=alice)
    assert r.json()["items"] == []


async def test_websocket_topics_of_other_users_do_not_exist(api: Api):
    bobs = await api.create(user="bob")
    async with open_ws(api, user="alice") as ws:
        for topic in (f"generation:{bobs['id']}", "user:bob", "queue"):
            frame = await ws.subscribe(topic)
            assert (frame["op"], frame["code"], frame["topic"]) == (
                "error", "not_found", topic
            )
        # The connection is still fine for Alice's own topic.
        assert (await ws.subscribe("user:alice"))["op"] == "subscribed"


OPERATOR_ROUTES = [
    ("GET", "/api/health", None),
    ("GET", "/api/queue", None),
    ("POST", "/api/queue/pause", None),
    ("POST", "/api/queue/resume", None),
    ("POST", "/api/queue/clear", None),
    ("GET", "/api/queue/workers", None),
    ("POST", "/api/queue/workers", {"instanceId": "x", "drain": True}),
    ("GET", "/metrics", None),
]


async def test_operator_routes_need_the_admin_or_service_role(api: Api):
    g = await confirmed(api)
    routes = [
        *OPERATOR_ROUTES,
        ("PUT", f"/api/generations/{g['id']}/status", {"status": "cancelled"}),
    ]
    for method, url, body in routes:
        r = await api.client.request(method, url, json=body)
        assert (r.status_code, r.json()["code"]) == (401, "unauthorized"), url
        r = await api.client.request(method, url, json=body, headers=api.headers())
        assert (r.status_code, r.json()["code"]) == (403, "forbidden"), url
    # The refused override changed nothing, and the queue is still paused.
    r = await api.client.get(
        f"/api/generations/{g['id']}/events",
        params={"sinceSeq": g["seq"]},
        headers=api.headers(),
    )
    assert {e["type"] for e in r.json()["items"]} <= {"queue"}
    stats = await api.client.get("/api/queue", headers=api.headers("ops", "admin"))
    assert stats.json()["paused"] is True
    # Both operator roles pass.
    for role in ("admin", "service"):
        r = await api.client.get("/api/health", headers=api.headers("ops", role))
        assert r.status_code == 200


async def test_operators_see_any_users_generation(api: Api):
    bobs = await api.create(user="bob")
    r = await api.client.get(
        f"/api/generations/{bobs['id']}", headers=api.headers("ops", "admin")
    )
    assert r.status_code == 200 and r.json()["userId"] == "bob"
