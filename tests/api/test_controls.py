"""Lists, snapshots, cancel, retry, the operator override, auth and health."""

from __future__ import annotations

import datetime as dt

import jwt

from tests.api.test_generations import CLEAR_PROMPT, assert_problem
from tests.conftest import Api


async def confirmed(api: Api, user: str = "alice") -> dict:
    generation = await api.create(user=user, prompt=CLEAR_PROMPT)
    r = await api.client.post(
        f"/api/generations/{generation['id']}/confirm",
        json={"acceptedCostUsd": generation["costEstimate"]["usd"]},
        headers=api.headers(user),
    )
    assert r.status_code == 200, r.text
    return r.json()


async def test_list_pages_newest_first_and_filters_by_status(api: Api):
    created = [await api.create(prompt=CLEAR_PROMPT) for _ in range(5)]
    queued = await confirmed(api)

    seen = []
    cursor = None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        r = await api.client.get("/api/generations", params=params,
                                 headers=api.headers())
        page = r.json()
        seen += [g["id"] for g in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == [queued["id"], *reversed([g["id"] for g in created])]

    r = await api.client.get(
        "/api/generations?status=queued,failed", headers=api.headers()
    )
    assert [g["id"] for g in r.json()["items"]] == [queued["id"]]


async def test_snapshot_etag_and_304(api: Api):
    generation = await api.create(prompt=CLEAR_PROMPT)
    url = f"/api/generations/{generation['id']}"

    r = await api.client.get(url, headers=api.headers())
    assert r.headers["etag"] == '"1"'
    r = await api.client.get(url, headers={**api.headers(), "If-None-Match": '"1"'})
    assert r.status_code == 304
    assert r.content == b""

    await api.client.post(url + "/cancel", headers=api.headers())
    r = await api.client.get(url, headers={**api.headers(), "If-None-Match": '"1"'})
    assert r.status_code == 200
    assert r.headers["etag"] == '"2"'


async def test_events_page_after_a_seq(api: Api):
    # Created, then cancelled: exactly two events, whatever the queue does.
    generation = await api.create(prompt=CLEAR_PROMPT)
    await api.client.post(
        f"/api/generations/{generation['id']}/cancel", headers=api.headers()
    )
    url = f"/api/generations/{generation['id']}/events"

    r = await api.client.get(url, params={"sinceSeq": 0, "limit": 1},
                             headers=api.headers())
    page = r.json()
    assert [e["seq"] for e in page["items"]] == [1]
    assert page["nextCursor"] == "1"
    r = await api.client.get(url, params={"sinceSeq": page["nextCursor"]},
                             headers=api.headers())
    page = r.json()
    assert [e["seq"] for e in page["items"]] == [2]
    assert page["nextCursor"] is None


async def test_cancel_then_retry_then_terminal_refusals(api: Api):
    generation = await confirmed(api)
    url = f"/api/generations/{generation['id']}"

    r = await api.client.post(url + "/cancel", headers=api.headers())
    assert r.json()["status"] == "cancelled"
    r = await api.client.post(url + "/cancel", headers=api.headers())
    doc = assert_problem(r, 409, "invalid_transition")
    assert doc["currentStatus"] == "cancelled"

    r = await api.client.post(url + "/retry", headers=api.headers())
    assert r.status_code == 200
    assert r.json()["status"] == "queued"
    assert r.json()["jobId"] == generation["jobId"]

    r = await api.client.post(url + "/retry", headers=api.headers())
    doc = assert_problem(r, 409, "invalid_transition")
    assert doc["currentStatus"] == "queued"


async def test_operator_override_follows_the_table(api: Api):
    generation = await confirmed(api)
    url = f"/api/generations/{generation['id']}/status"
    admin = api.headers("ops", "admin")

    r = await api.client.put(url, json={"status": "failed"}, headers=api.headers())
    assert_problem(r, 403, "forbidden")

    r = await api.client.put(url, json={"status": "completed"}, headers=admin)
    doc = assert_problem(r, 409, "invalid_transition")
    assert doc["currentStatus"] == "queued"

    r = await api.client.put(
        url,
        json={"status": "failed", "reason": "stuck upstream",
              "error": {"code": "upstream_stuck", "message": "Try again later."}},
        headers=admin,
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "failed"
    assert r.json()["error"] == {
        "code": "upstream_stuck",
        "message": "Try again later.",
        "retryable": False,
        "details": None,
    }
    r = await api.client.get(
        f"/api/generations/{generation['id']}/events", headers=api.headers()
    )
    last = r.json()["items"][-1]
    assert last["data"]["reason"] == "stuck upstream"
    assert last["data"]["previousStatus"] == "queued"


async def test_auth_is_required_and_checked(api: Api):
    r = await api.client.get("/api/generations")
    doc = assert_problem(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "Bearer" in doc["detail"]

    r = await api.client.get("/api/generations", headers={"Authorization": "Basic x"})
    assert_problem(r, 401, "unauthorized")

    tampered = api.token()[:-2] + "xx"
    r = await api.client.get(
        "/api/generations", headers={"Authorization": f"Bearer {tampered}"}
    )
    assert_problem(r, 401, "unauthorized")

    secret = api.services.auth._secret
    expired = jwt.encode(
        {"sub": "alice", "exp": dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)},
        secret,
        algorithm="HS256",
    )
    r = await api.client.get(
        "/api/generations", headers={"Authorization": f"Bearer {expired}"}
    )
    doc = assert_problem(r, 401, "unauthorized")
    assert doc["detail"] == "the token has expired"

    unsigned = jwt.encode({"sub": "alice", "exp": 9999999999}, None, algorithm="none")
    r = await api.client.get(
        "/api/generations", headers={"Authorization": f"Bearer {unsigned}"}
    )
    assert_problem(r, 401, "unauthorized")


async def test_health_routes(api: Api):
    r = await api.client.get("/healthz")
    assert r.json() == {"status": "ok"}
    r = await api.client.get("/readyz")
    assert r.json()["status"] == "ready"

    r = await api.client.get("/api/health", headers=api.headers())
    assert_problem(r, 403, "forbidden")

    await api.create(prompt=CLEAR_PROMPT)
    await confirmed(api)
    r = await api.client.get("/api/health", headers=api.headers("ops", "admin"))
    doc = r.json()
    assert doc["store"] == api.services.store.kind
    assert doc["instanceId"] == api.services.instance_id
    assert doc["generationsByStatus"] == {"awaiting_confirmation": 1, "queued": 1}


async def test_readyz_is_503_when_the_store_is_gone(api: Api):
    await api.services.store.close()
    r = await api.client.get("/readyz")
    assert_problem(r, 503, "store_unavailable")
    r = await api.client.get("/healthz")
    assert r.status_code == 200


async def test_request_ids_are_echoed_or_made(api: Api):
    r = await api.client.get("/healthz", headers={"X-Request-ID": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    for bad in ["bad id", "x" * 129]:
        r = await api.client.get("/healthz", headers={"X-Request-ID": bad})
        assert r.headers["x-request-id"] != bad
        assert len(r.headers["x-request-id"]) == 16
