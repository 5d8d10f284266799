"""Job actors end to end: the Veo 3 simulator over HTTP, real stored videos.

Each test confirms generations through the REST API, lets the coordinator
dispatch them and the actors run them, and checks what a user sees.
"""

from __future__ import annotations

import asyncio
import io

import av
import httpx
import pytest

from tests.conftest import Api
from tests.jobs.conftest import (
    CLEAR_PROMPT,
    events,
    simulator_stats,
    status_is,
    statuses,
    submit,
    wait_for,
)
from tests.realtime.conftest import open_ws
from tests.support import WAIT_S

TERMINAL = ("completed", "failed", "cancelled")


async def test_a_generation_runs_to_a_playable_video(fast_api):
    api: Api = await fast_api()
    created = await api.create(prompt=CLEAR_PROMPT)
    gid = created["id"]
    async with open_ws(api) as ws:
        subscribed = await ws.subscribe(f"generation:{gid}")
        assert subscribed["snapshot"]["status"] == "awaiting_confirmation"
        r = await api.client.post(
            f"/api/generations/{gid}/confirm",
            json={"acceptedCostUsd": 3.2},
            headers=api.headers(),
        )
        assert r.status_code == 200
        live = []
        while not live or live[-1]["data"].get("status") != "completed":
            live.append(await ws.event())

    # Over the WebSocket: every event after the snapshot, in order, no gaps.
    assert [e["seq"] for e in live] == list(range(2, 2 + len(live)))
    history = await events(api, gid)
    assert statuses(history) == [
        "queued", "submitting", "generating", "uploading", "completed",
    ]
    progress = [e["data"]["progress"] for e in history if "progress" in e["data"]]
    assert progress == sorted(progress)
    assert progress[-1] == 100

    generation = await wait_for(api, gid, status_is("completed"))
    assert generation["attempts"] == 1
    assert generation["error"] is None
    video = generation["video"]
    assert (video["width"], video["height"]) == (114, 64)  # 16:9, short side 64
    assert video["durationSeconds"] == pytest.approx(8.0, abs=0.1)
    assert video["hasAudio"] is True

    # The stored video plays: fetch it through its signed URL and decode it.
    r = await api.client.get(f"/api/storage/videos/{gid}", headers=api.headers())
    assert r.status_code == 200, r.text
    async with httpx.AsyncClient(timeout=WAIT_S) as plain:
        body = (await plain.get(r.json()["url"])).content
    assert len(body) == video["sizeBytes"]
    with av.open(io.BytesIO(body)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
    assert frames == 8 * 24

    # Paid for exactly once.
    stats = await simulator_stats(api)
    assert stats["submissions"]["byPrompt"] == {CLEAR_PROMPT: 1}


async def test_the_job_view_and_queue_stats_follow_the_job(fast_api):
    api: Api = await fast_api()
    generation = await submit(api)
    done = await wait_for(api, generation["id"], status_is("completed"))

    r = await api.client.get(
        f"/api/queue/jobs/{done['jobId']}", headers=api.headers()
    )
    view = r.json()
    assert (view["state"], view["status"], view["outcome"]) == (
        "finished", "completed", "completed",
    )
    assert view["attempts"] == 1
    assert view["timings"]["dispatchedAt"] >= view["timings"]["queuedAt"]
    assert "instanceId" not in view  # operators only
    r = await api.client.get(
        f"/api/queue/jobs/{done['jobId']}", headers=api.headers("bob")
    )
    assert r.status_code == 404

    r = await api.client.get("/api/queue", headers=api.headers("ops", "admin"))
    stats = r.json()
    assert stats["throughput"]["completedLastHour"] == 1
    assert stats["successRate"] == 1.0
    assert stats["spendUsd"]["total"] == pytest.approx(3.2)
    assert stats["depth"]["total"] == 0
    assert stats["coordinator"] == api.services.instance_id
    r = await api.client.get("/api/queue", headers=api.headers())
    assert r.status_code == 403


@pytest.mark.parametrize("phase", ["queued", "submitting", "generating", "uploading"])
async def test_cancel_in_each_phase(fast_api, phase):
    api: Api = await fast_api(
        {
            # Held submits and a slow download keep the job in its phase.
            "simulator": {"slow_s": 30.0},
            "veo3": {"request_timeout_s": 60.0},
            "storage": {"part_size_bytes": 5 * 1024 * 1024},
        }
    )
    prompt = {
        "queued": CLEAR_PROMPT,
        "submitting": CLEAR_PROMPT + " [sim:slow]",
        "generating": CLEAR_PROMPT + " [sim:gen=60]",
        "uploading": CLEAR_PROMPT + " [sim:bytes=30000000] [sim:rate=3000000]",
    }[phase]
    if phase == "queued":
        await api.pause_queue()
    generation = await submit(api, prompt)
    gid = generation["id"]
    await wait_for(api, gid, status_is(phase))
    if phase == "uploading":
        # Wait until parts are being written, so there is something to abort.
        await wait_for(api, gid, lambda g: g["progress"] > 85 or g["video"])

    r = await api.client.post(f"/api/generations/{gid}/cancel", headers=api.headers())

    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    history = await events(api, gid)
    assert statuses(history)[-1] == "cancelled"
    assert statuses(history)[-2] == phase
    job = await api.services.store.get_job_by_id(generation["jobId"])
    assert (job.state, job.outcome, job.lease_owner) == ("finished", "cancelled", None)
    # Nothing half-written is left behind, and no actor is still at work.
    storage = api.services.storage
    assert await storage.list_uploads() == []
    assert [o async for o in storage.iter_objects("videos/")] == []
    assert api.services.runtime.actors == {}


async def test_retryable_failures_back_off_and_then_succeed(fast_api):
    api: Api = await fast_api({"veo3": {"retry_attempts": 1}})
    prompt = CLEAR_PROMPT + " [sim:503@submit*2]"
    generation = await submit(api, prompt)

    done = await wait_for(api, generation["id"], status_is(*TERMINAL))

    assert done["status"] == "completed"
    assert done["attempts"] == 3
    history = await events(api, generation["id"])
    assert statuses(history) == [
        "queued",
        "submitting", "queued",
        "submitting", "queued",
        "submitting", "generating", "uploading", "completed",
    ]
    requeues = [e for e in history if e["data"].get("status") == "queued"][1:]
    assert {e["data"]["error"]["code"] for e in requeues} == {"veo3_unavailable"}
    stats = await simulator_stats(api)
    assert stats["submissions"]["byPrompt"] == {prompt: 1}


async def test_retries_end_after_max_attempts(fast_api):
    api: Api = await fast_api(
        {"veo3": {"retry_attempts": 1}, "queue": {"max_attempts": 2}}
    )
    prompt = CLEAR_PROMPT + " [sim:503@submit*10]"
    generation = await submit(api, prompt)

    done = await wait_for(api, generation["id"], status_is(*TERMINAL))

    assert done["status"] == "failed"
    assert done["attempts"] == 2
    assert done["error"]["code"] == "veo3_unavailable"
    assert done["error"]["retryable"] is True
    assert "gave up after 2 attempts" in done["error"]["message"]
    # Refused before acceptance: nothing was ever paid for.
    assert (await simulator_stats(api))["submissions"]["total"] == 0


async def test_a_safety_filtered_result_fails_with_the_reasons(fast_api):
    api: Api = await fast_api()
    prompt = CLEAR_PROMPT + " [sim:safety]"
    generation = await submit(api, prompt)

    done = await wait_for(api, generation["id"], status_is(*TERMINAL))

    assert done["status"] == "failed"
    error = done["error"]
    assert error["code"] == "veo3_safety_filtered"
    assert "not charged" in error["message"]
    assert error["details"]["reasons"]
    assert done["attempts"] == 1  # not retried by itself
    assert done["video"] is None

    # The user may try again: a new submission, fresh attempts.
    r = await api.client.post(
        f"/api/generations/{generation['id']}/retry", headers=api.headers()
    )
    assert r.json()["status"] == "queued"
    again = await wait_for(
        api,
        generation["id"],
        lambda g: g["status"] == "failed" and g["seq"] > done["seq"],
    )
    assert again["attempts"] == 1
    assert (await simulator_stats(api))["submissions"]["byPrompt"] == {prompt: 2}


async def test_a_failed_operation_is_final_or_resubmitted_by_its_code(fast_api):
    api: Api = await fast_api({"queue": {"max_attempts": 2}})
    invalid = CLEAR_PROMPT + " [sim:error=3]"
    internal = CLEAR_PROMPT + " [sim:error=13]"
    first = await submit(api, invalid)
    second = await submit(api, internal)

    final = await wait_for(api, first["id"], status_is(*TERMINAL))
    transient = await wait_for(api, second["id"], status_is(*TERMINAL))

    assert (final["status"], final["attempts"]) == ("failed", 1)
    assert final["error"]["code"] == "veo3_operation_failed"
    # Google does not bill a failed operation: INTERNAL is submitted again.
    assert (transient["status"], transient["attempts"]) == ("failed", 2)
    stats = await simulator_stats(api)
    assert stats["submissions"]["byPrompt"] == {invalid: 1, internal: 2}


@pytest.mark.parametrize("marker", ["[sim:500]", "[sim:malformed]"])
async def test_an_ambiguous_submit_is_never_sent_twice(fast_api, marker):
    api: Api = await fast_api()
    prompt = f"{CLEAR_PROMPT} {marker}"
    generation = await submit(api, prompt)

    done = await wait_for(api, generation["id"], status_is(*TERMINAL))

    assert done["status"] == "failed"
    assert done["error"]["code"] == "submission_uncertain"
    assert done["error"]["retryable"] is True
    assert (await simulator_stats(api))["submissions"]["byPrompt"] == {prompt: 1}


@pytest.mark.parametrize(
    ("phase", "marker", "deadline_s", "code"),
    [
        ("submitting", "[sim:slow]", 0.5, "submission_uncertain"),
        ("generating", "[sim:gen=60]", 0.5, "generation_timeout"),
        # Long enough for a 5 MiB part or two to be stored, which must then
        # be discarded.
        ("uploading", "[sim:bytes=30000000] [sim:rate=4000000]", 3.5,
         "uploading_timeout"),
    ],
)
async def test_a_phase_past_its_deadline_ends_the_job(
    fast_api, phase, marker, deadline_s, code
):
    api: Api = await fast_api(
        {
            "queue": {f"{phase}_deadline_s": deadline_s, "max_attempts": 1},
            "simulator": {"slow_s": 30.0},
            "veo3": {"request_timeout_s": 60.0},
            "storage": {"part_size_bytes": 5 * 1024 * 1024},
        }
    )
    generation = await submit(api, f"{CLEAR_PROMPT} {marker}")

    done = await wait_for(api, generation["id"], status_is(*TERMINAL))

    assert done["status"] == "failed"
    assert done["error"]["code"] == code
    history = await events(api, generation["id"])
    assert statuses(history)[-2] == phase
    if phase == "uploading":
        assert max(e["data"].get("progress", 0) for e in history) > 85
    assert await api.services.storage.list_uploads() == []
    assert [o async for o in api.services.storage.iter_objects("videos/")] == []


async def test_pause_resume_and_clear_over_http(fast_api):
    api: Api = await fast_api()
    admin = api.headers("ops", "admin")
    await api.pause_queue()
    waiting = [await submit(api, user=f"user{n}") for n in range(3)]
    for g in waiting:
        queued = await wait_for(
            api, g["id"], lambda g: g["queuePosition"] is not None, user=g["userId"]
        )
        assert queued["status"] == "queued"
    r = await api.client.get("/api/queue", headers=admin)
    assert (r.json()["paused"], r.json()["depth"]["total"]) == (True, 3)

    r = await api.client.post("/api/queue/resume", headers=admin)
    assert r.json()["paused"] is False
    first = await wait_for(
        api, waiting[0]["id"], status_is("completed"), user="user0"
    )
    assert first["status"] == "completed"

    # Clear cancels what still waits and leaves the rest alone.
    await api.pause_queue()
    late = [await submit(api, user="user9") for _ in range(2)]
    r = await api.client.post("/api/queue/clear", headers=admin)
    assert r.json()["cancelled"] == 2
    for g in late:
        r = await api.client.get(
            f"/api/generations/{g['id']}", headers=api.headers("user9")
        )
        assert r.json()["status"] == "cancelled"


async def test_workers_can_be_listed_and_drained(fast_api):
    api: Api = await fast_api()
    admin = api.headers("ops", "admin")
    me = api.services.instance_id
    # With PostgreSQL the instance takes the coordinator's lock just after it
    # started; wait for that.
    async with asyncio.timeout(WAIT_S):
        while True:
            r = await api.client.get("/api/queue/workers", headers=admin)
            [worker] = r.json()["items"]
            if worker["coordinator"]:
                break
            await asyncio.sleep(0.05)
    assert (worker["id"], worker["alive"], worker["coordinator"]) == (me, True, True)

    r = await api.client.post(
        "/api/queue/workers",
        json={"instanceId": me, "drain": True, "concurrency": 3},
        headers=admin,
    )
    [worker] = r.json()["items"]
    assert (worker["draining"], worker["concurrency"]) == (True, 3)
    generation = await submit(api)
    waiting = await wait_for(
        api, generation["id"], lambda g: g["queuePosition"] is not None
    )
    assert waiting["status"] == "queued"

    await api.client.post(
        "/api/queue/workers", json={"instanceId": me, "drain": False}, headers=admin
    )
    await wait_for(api, generation["id"], status_is("completed"))

    r = await api.client.post(
        "/api/queue/workers", json={"instanceId": "nobody"}, headers=admin
    )
    assert (r.status_code, r.json()["code"]) == (404, "not_found")


async def test_maintenance_removes_what_retention_no_longer_covers(fast_api):
    import datetime as dt

    api: Api = await fast_api({"queue": {"retention_days": 1}})
    old = await submit(api)
    done = await wait_for(api, old["id"], status_is("completed"))
    keys = [done["video"]["key"], done["video"]["thumbnailKey"]]
    storage = api.services.storage
    assert all([await storage.head(k) for k in keys])
    kept = await api.create(prompt=CLEAR_PROMPT)  # not terminal: kept

    removed = await api.services.runtime.maintenance.run_once(
        now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
    )

    assert (removed["generations"], removed["objects"]) == (1, 2)
    assert [await storage.head(k) for k in keys] == [None, None]
    r = await api.client.get(f"/api/generations/{old['id']}", headers=api.headers())
    assert r.status_code == 404
    r = await api.client.get(f"/api/generations/{kept['id']}", headers=api.headers())
    assert r.status_code == 200
