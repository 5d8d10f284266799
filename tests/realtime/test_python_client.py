"""The Python client against the real service: REST calls and a feed that
resumes by itself after the network drops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from nimu_rt.client import ApiError, NimuClient
from tests.conftest import Api
from tests.realtime.conftest import note, queued_generation, set_progress, set_status
from tests.realtime.proxy import TcpProxy
from tests.support import WAIT_S


@pytest.fixture
async def proxy(api: Api) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy(api.base_url)
    yield proxy
    await proxy.close()


async def test_rest_calls_create_clarify_confirm_get(api: Api):
    async with NimuClient(api.base_url, api.token("alice")) as client:
        generation = await client.create("a cat", resolution="720p")
        assert generation.status == "pending_clarification"
        answers = {q.id: "a grey cat on a roof at dusk, cinematic" for q in
                   generation.clarification.questions}
        generation = await client.clarify(generation.id, answers)
        assert generation.status == "awaiting_confirmation"
        assert generation.cost_estimate is not None

        with pytest.raises(ApiError) as refused:
            await client.confirm(generation.id, 0.01)
        assert (refused.value.status, refused.value.code) == (409, "cost_not_accepted")

        generation = await client.confirm(generation.id, generation.cost_estimate.usd)
        assert generation.status == "queued"
        # The (paused) queue publishes its place in line next.
        generation = await client.get(
            generation.id, since_seq=generation.seq, wait_s=WAIT_S
        )
        assert generation is not None
        assert generation.queue_position == 1
        assert (await client.get(generation.id)).seq == generation.seq
        # Unchanged since the seq we hold: nothing to decode.
        assert await client.get(generation.id, since_seq=generation.seq) is None
        assert (
            await client.get(generation.id, since_seq=generation.seq, wait_s=0.2)
            is None
        )
        history = [e async for e in client.events(generation.id)]
        assert [e.seq for e in history] == [1, 2, 3, 4]


async def test_the_feed_resumes_by_itself_after_the_network_drops(
    api: Api, proxy: TcpProxy
):
    gid = (await queued_generation(api))["id"]
    base_url = await proxy.start()
    updates = []
    async with NimuClient(base_url, api.token("alice")) as client:
        feed = client.follow(gid)
        async with asyncio.timeout(WAIT_S * 3), feed:
            first = await anext(feed)
            assert (first.event, first.generation.status) == (None, "queued")
            await set_status(api, gid, "submitting")
            updates.append(await anext(feed))

            # The network fails; things happen meanwhile.
            proxy.refusing = True
            proxy.cut()
            await set_status(api, gid, "generating")
            await set_progress(api, gid, 30)
            await note(api, gid, "while offline")
            await set_progress(api, gid, 60)
            proxy.refusing = False

            # The feed reconnects, replays what it missed, then goes live.
            for _ in range(4):
                updates.append(await anext(feed))
            await set_status(api, gid, "uploading")
            await set_status(api, gid, "completed")
            updates += [u async for u in feed]  # ends at the terminal status

    assert proxy.accepted >= 2
    assert [u.event.seq for u in updates] == list(range(4, 11))
    assert [u.event.type for u in updates] == [
        "status", "status", "progress", "updated", "progress", "status", "status"
    ]
    assert [u.generation.progress for u in updates][2:5] == [30, 30, 60]
    final = updates[-1].generation
    r = await api.client.get(f"/api/generations/{gid}", headers=api.headers())
    assert final.status == "completed"
    assert (final.seq, final.progress) == (r.json()["seq"], r.json()["progress"])


async def test_the_feed_reports_what_it_may_not_follow(api: Api):
    gid = (await queued_generation(api, "alice"))["id"]
    async with NimuClient(api.base_url, api.token("bob")) as client:
        with pytest.raises(ApiError) as refused:
            async with asyncio.timeout(WAIT_S):
                await anext(client.follow(gid))
        assert refused.value.code == "not_found"
    async with NimuClient(api.base_url, "not-a-token") as client:
        with pytest.raises(ApiError) as refused:
            async with asyncio.timeout(WAIT_S):
                await anext(client.follow(gid))
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")
