"""The REST fallback: ETag and 304, and long-polling woken by the hub."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import Api
from tests.realtime.conftest import (
    queued_generation,
    set_progress,
    set_status,
    wait_until,
)
from tests.support import WAIT_S


async def test_if_none_match_answers_304_until_something_changes(api: Api):
    gid = (await queued_generation(api))["id"]
    url = f"/api/generations/{gid}"
    r = await api.client.get(url, headers=api.headers())
    assert r.headers["etag"] == '"3"'

    r = await api.client.get(url, headers={**api.headers(), "If-None-Match": '"3"'})
    assert r.status_code == 304
    assert r.headers["etag"] == '"3"'
    assert r.content == b""

    await set_status(api, gid, "submitting")
    r = await api.client.get(url, headers={**api.headers(), "If-None-Match": '"3"'})
    assert r.status_code == 200
    assert r.headers["etag"] == '"4"'
    assert r.json()["status"] == "submitting"


async def test_a_long_poll_returns_as_soon_as_the_generation_changes(api: Api):
    gid = (await queued_generation(api))["id"]
    hub = api.services.hub
    poll = asyncio.create_task(
        api.client.get(
            f"/api/generations/{gid}",
            params={"waitSeconds": WAIT_S * 2, "sinceSeq": 3},
            headers=api.headers(),
            timeout=WAIT_S * 3,
        )
    )
    # Parked on the hub, not reading the database in a loop.
    await wait_until(lambda: hub.waiting(gid) == 1, "the long-poll never waited")
    await set_progress(api, gid, 7)

    async with asyncio.timeout(WAIT_S):
        r = await poll
    assert r.status_code == 200
    assert r.headers["etag"] == '"4"'
    assert (r.json()["seq"], r.json()["progress"]) == (4, 7)
    assert hub.waiting(gid) == 0


async def test_a_long_poll_with_nothing_new_answers_304_after_the_wait(api: Api):
    gid = (await queued_generation(api))["id"]
    r = await api.client.get(
        f"/api/generations/{gid}",
        params={"waitSeconds": 0.2, "sinceSeq": 3},
        headers=api.headers(),
    )
    assert r.status_code == 304
    assert r.headers["etag"] == '"3"'

    # The ETag can stand in for sinceSeq.
    r = await api.client.get(
        f"/api/generations/{gid}",
        params={"waitSeconds": 0.2},
        headers={**api.headers(), "If-None-Match": 'W/"3"'},
    )
    assert r.status_code == 304


async def test_a_long_poll_behind_the_current_seq_answers_at_once(api: Api):
    gid = (await queued_generation(api))["id"]
    for seq in (1, 5):  # behind, and ahead of what the server has
        r = await api.client.get(
            f"/api/generations/{gid}",
            params={"waitSeconds": WAIT_S * 10, "sinceSeq": seq},
            headers=api.headers(),
        )
        assert r.status_code == 200
        assert r.json()["seq"] == 3


async def test_the_wait_is_capped_by_configuration(api_factory):
    api = await api_factory({"realtime": {"longpoll_max_wait_s": 0.2}})
    gid = (await queued_generation(api))["id"]
    r = await api.client.get(
        f"/api/generations/{gid}",
        params={"waitSeconds": 3600, "sinceSeq": 3},
        headers=api.headers(),
    )
    assert r.status_code == 304


async def test_bad_long_poll_requests_are_refused(api: Api):
    gid = (await queued_generation(api))["id"]
    url = f"/api/generations/{gid}"
    for params, path in [
        ({"waitSeconds": "soon", "sinceSeq": 3}, "$query.waitSeconds"),
        ({"waitSeconds": -1, "sinceSeq": 3}, "$query.waitSeconds"),
        ({"waitSeconds": "nan", "sinceSeq": 3}, "$query.waitSeconds"),
        ({"waitSeconds": 5, "sinceSeq": "x"}, "$query.sinceSeq"),
        ({"waitSeconds": 5}, "$query.sinceSeq"),
    ]:
        r = await api.client.get(url, params=params, headers=api.headers())
        assert r.status_code == 422, params
        assert r.json()["code"] == "validation_failed"
        assert r.json()["errors"][0]["path"] == path, params

    # Another user's generation is not found, with or without waiting.
    r = await api.client.get(
        url, params={"waitSeconds": 5, "sinceSeq": 3}, headers=api.headers("bob")
    )
    assert r.status_code == 404


async def test_a_long_poll_whose_client_leaves_is_released(api: Api):
    gid = (await queued_generation(api))["id"]
    hub = api.services.hub
    async with httpx.AsyncClient(base_url=api.base_url, timeout=WAIT_S * 3) as tab:
        poll = asyncio.create_task(
            tab.get(
                f"/api/generations/{gid}",
                params={"waitSeconds": WAIT_S * 2, "sinceSeq": 3},
                headers=api.headers(),
            )
        )
        await wait_until(lambda: hub.waiting(gid) == 1, "the long-poll never waited")
        # The tab closes: its request is abandoned and its connection closed.
        poll.cancel()
        await asyncio.gather(poll, return_exceptions=True)
    await wait_until(lambda: hub.waiting(gid) == 0, "the server kept waiting")
