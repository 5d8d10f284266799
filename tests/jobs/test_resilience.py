"""What must not cost a paid video: overrides, outages, late polls, deploys."""

from __future__ import annotations

import asyncio

import pytest

from nimu_rt.models import utcnow
from nimu_rt.store import create_store
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
from tests.realtime.conftest import wait_until
from tests.support import WAIT_S

TERMINAL = ("completed", "failed", "cancelled")


@pytest.mark.parametrize(
    ("held_in", "target"),
    [
        ("queued", "submitting"),
        ("generating", "uploading"),
        ("generating", "completed"),
    ],
)
async def test_an_override_cannot_do_the_pipelines_work(fast_api, held_in, target):
    """Moving a job forward needs a lease, an operation or a video."""
    api: Api = await fast_api()
    if held_in == "queued":
        await api.pause_queue()
    generation = await submit(api, CLEAR_PROMPT + " [sim:gen=60]")
    gid = generation["id"]
    before = await wait_for(api, gid, status_is(held_in))

    r = await api.client.put(
        f"/api/generations/{gid}/status",
        json={"status": target},
        headers=api.headers("ops", "admin"),
    )

    assert r.status_code == 409, r.text
    assert r.json()["code"] == "invalid_transition"
    assert r.json()["currentStatus"] == held_in
    after = await api.client.get(f"/api/generations/{gid}", headers=api.headers())
    assert after.json()["status"] == held_in
    assert target not in statuses(await events(api, gid))
    if held_in == "generating":
        # The refused command did not disturb the running job.
        assert api.services.runtime.actors
        assert before["attempts"] == after.json()["attempts"] == 1


async def test_a_database_outage_pauses_a_job_instead_of_failing_it(fast_api):
    api: Api = await fast_api()
    prompt = CLEAR_PROMPT + " [sim:gen=1.5]"
    generation = await submit(api, prompt)
    await wait_for(api, generation["id"], status_is("generating"))
    store = api.services.store

    await store.close()  # every query now fails with StoreUnavailable
    # The actor meets the outage at its next write and stops, writing
    # nothing (it could not, and failing a paid job would be wrong).
    await wait_until(lambda: not api.services.runtime.actors, "actor kept going")
    await store.open()  # the database is back: the heartbeat resumes the job

    done = await wait_for(api, generation["id"], status_is(*TERMINAL))
    assert done["status"] == "completed"
    assert done["attempts"] == 1
    assert (await simulator_stats(api))["submissions"]["byPrompt"] == {prompt: 1}


async def test_a_video_finished_while_nobody_polled_is_kept(fast_api):
    """The generating deadline is judged on a fresh answer, not on the clock.

    Polls here are far apart (as after an outage): the operation finished
    long before the deadline but was only seen after it. The paid video is
    stored, not thrown away.
    """
    api: Api = await fast_api(
        {
            "queue": {"generating_deadline_s": 0.5},
            "veo3": {"poll_initial_s": 2.0, "poll_max_s": 2.0},
        }
    )
    generation = await submit(api, CLEAR_PROMPT + " [sim:gen=0.3]")

    done = await wait_for(api, generation["id"], status_is(*TERMINAL))

    assert done["status"] == "completed"


async def test_a_deploy_during_the_paid_submit_keeps_its_operation(fast_api):
    api: Api = await fast_api(
        {"simulator": {"slow_s": 1.5}, "veo3": {"request_timeout_s": 30.0}}
    )
    prompt = CLEAR_PROMPT + " [sim:slow]"
    generation = await submit(api, prompt)
    await wait_for(api, generation["id"], status_is("submitting"))
    # The simulator has the request (and would bill it) before we stop.
    async with asyncio.timeout(WAIT_S):
        while (await simulator_stats(api))["submissions"]["total"] == 0:
            await asyncio.sleep(0.02)

    await api.services.stop()  # what a deploy does to this instance

    store = create_store(api.services.settings)
    await store.open()
    try:
        stored = await store.get_generation(generation["id"])
        job = await store.get_job_by_id(generation["jobId"])
    finally:
        await store.close()
    # The operation's name reached the store before the instance let go, so
    # the next instance polls it instead of failing the job as uncertain.
    assert stored.status == "generating"
    assert job.operation_name is not None
    # And the lease was handed back at once, for another instance to take.
    assert job.lease_expires_at <= utcnow()
