"""The generation routes over real HTTP, on both stores."""

from __future__ import annotations

import asyncio

from tests.conftest import Api

CLEAR_PROMPT = "A red fox trots through a snowy forest at dawn, cinematic tracking shot"


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    doc = response.json()
    assert doc["status"] == status
    assert doc["code"] == code
    assert doc["requestId"] == response.headers["x-request-id"]
    return doc


async def test_a_clear_prompt_goes_straight_to_the_price(api: Api):
    generation = await api.create(prompt=CLEAR_PROMPT)

    assert generation["status"] == "awaiting_confirmation"
    assert generation["finalPrompt"] == CLEAR_PROMPT
    assert generation["clarification"] == {"questions": [], "answers": {}}
    assert generation["costEstimate"] == {
        "usd": 3.2,
        "currency": "USD",
        "model": "veo-3.1-generate-001",
        "resolution": "720p",
        "durationSeconds": 8,
        "generateAudio": True,
        "usdPerSecond": 0.4,
    }
    assert generation["seq"] == 1
    assert generation["userId"] == "alice"


async def test_create_clarify_confirm(api: Api):
    generation = await api.create(prompt="a cat")
    assert generation["status"] == "pending_clarification"
    asked = [q["id"] for q in generation["clarification"]["questions"]]
    assert asked == ["detail", "setting", "style"]

    gid = generation["id"]
    answers = {
        "detail": "A grey cat leaps between two chimneys",
        "setting": "rooftops of Paris at dusk",
        "style": "cinematic, slow motion",
    }
    r = await api.client.post(
        f"/api/generations/{gid}/clarify",
        json={"answers": answers},
        headers=api.headers(),
    )
    assert r.status_code == 200, r.text
    clarified = r.json()
    assert clarified["status"] == "awaiting_confirmation"
    assert clarified["finalPrompt"] == (
        "a cat. Scene: A grey cat leaps between two chimneys."
        " Setting: rooftops of Paris at dusk. Style: cinematic, slow motion."
    )
    assert clarified["clarification"]["answers"] == answers

    r = await api.client.post(
        f"/api/generations/{gid}/confirm",
        json={"acceptedCostUsd": 3.2},
        headers=api.headers(),
    )
    assert r.status_code == 200, r.text
    confirmed = r.json()
    assert confirmed["status"] == "queued"
    assert confirmed["jobId"]

    r = await api.client.get(f"/api/generations/{gid}/events", headers=api.headers())
    events = r.json()["items"]
    assert [(e["seq"], e["type"]) for e in events[:3]] == [
        (1, "created"),
        (2, "status"),
        (3, "status"),
    ]
    # The paused queue may already have published the position.
    assert all(e["type"] == "queue" for e in events[3:])
    assert events[2]["data"]["previousStatus"] == "awaiting_confirmation"
    assert events[2]["data"]["status"] == "queued"


async def test_confirm_below_the_estimate_is_refused_and_changes_nothing(api: Api):
    generation = await api.create(prompt=CLEAR_PROMPT)
    url = f"/api/generations/{generation['id']}"

    r = await api.client.post(
        url + "/confirm", json={"acceptedCostUsd": 3.19}, headers=api.headers()
    )
    doc = assert_problem(r, 409, "cost_not_accepted")
    assert doc["estimateUsd"] == 3.2

    r = await api.client.get(url, headers=api.headers())
    assert r.json()["status"] == "awaiting_confirmation"
    assert r.json()["seq"] == 1


async def test_a_refused_transition_names_the_current_status(api: Api):
    generation = await api.create(prompt="a cat")
    r = await api.client.post(
        f"/api/generations/{generation['id']}/confirm",
        json={"acceptedCostUsd": 10},
        headers=api.headers(),
    )
    doc = assert_problem(r, 409, "invalid_transition")
    assert doc["currentStatus"] == "pending_clarification"


async def test_another_users_generation_is_not_found(api: Api):
    generation = await api.create(user="alice", prompt=CLEAR_PROMPT)
    url = f"/api/generations/{generation['id']}"

    for method, path, body in [
        ("GET", "", None),
        ("GET", "/events", None),
        ("POST", "/clarify", {"answers": {}}),
        ("POST", "/confirm", {"acceptedCostUsd": 100}),
        ("POST", "/cancel", None),
        ("POST", "/retry", None),
    ]:
        r = await api.client.request(
            method, url + path, json=body, headers=api.headers("bob")
        )
        assert_problem(r, 404, "not_found")

    r = await api.client.get("/api/generations", headers=api.headers("bob"))
    assert r.json() == {"items": [], "nextCursor": None}


async def test_idempotency_key_returns_the_first_generation(api: Api):
    headers = {**api.headers(), "Idempotency-Key": "create-1"}
    body = {"prompt": CLEAR_PROMPT}

    first, second = await asyncio.gather(
        api.client.post("/api/generations", json=body, headers=headers),
        api.client.post("/api/generations", json=body, headers=headers),
    )
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]

    r = await api.client.get("/api/generations", headers=api.headers())
    assert len(r.json()["items"]) == 1

    r = await api.client.post(
        "/api/generations", json={"prompt": CLEAR_PROMPT + "!"}, headers=headers
    )
    assert_problem(r, 422, "idempotency_key_reused")
