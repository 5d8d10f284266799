"""/ws over real sockets: snapshot, live events, resume without gaps, reset."""

from __future__ import annotations

import asyncio

from tests.conftest import Api
from tests.realtime.conftest import (
    note,
    open_ws,
    prune,
    queued_generation,
    set_progress,
    set_status,
)


async def test_snapshot_then_every_event_of_a_whole_generation(api: Api):
    generation = await queued_generation(api)
    gid = generation["id"]
    topic = f"generation:{gid}"

    async with open_ws(api) as ws:
        subscribed = await ws.subscribe(topic)
        assert subscribed["op"] == "subscribed"
        assert subscribed["topic"] == topic
        assert subscribed["seq"] == 3
        assert subscribed["snapshot"]["status"] == "queued"
        assert subscribed["snapshot"]["seq"] == 3

        # Each change is seen live before the next one is made.
        seen = []
        for status, progress in [
            ("submitting", 2),
            ("generating", 40),
            ("uploading", 90),
            ("completed", None),
        ]:
            await set_status(api, gid, status)
            event = await ws.event()
            assert (event["type"], event["data"]["status"]) == ("status", status)
            seen.append(event)
            if progress is not None:
                await set_progress(api, gid, progress)
                event = await ws.event()
                assert (event["type"], event["data"]) == (
                    "progress",
                    {"progress": progress},
                )
                seen.append(event)

    assert [e["seq"] for e in seen] == list(range(4, 4 + len(seen)))
    assert {e["topic"] for e in seen} == {topic}
    assert {e["generationId"] for e in seen} == {gid}
    assert seen[0]["data"]["previousStatus"] == "queued"
    r = await api.client.get(f"/api/generations/{gid}", headers=api.headers())
    assert r.json()["seq"] == seen[-1]["seq"]
    assert r.json()["status"] == "completed"


async def test_resume_after_a_disconnect_has_no_gap_and_no_duplicate(api: Api):
    gid = (await queued_generation(api))["id"]
    topic = f"generation:{gid}"

    async with open_ws(api) as ws:
        await ws.subscribe(topic)
        await set_status(api, gid, "submitting")
        await set_progress(api, gid, 2)
        last_seen = (await ws.event())["seq"]
        assert (await ws.event())["seq"] == last_seen + 1
        last_seen += 1

    # Changes made while nobody listens.
    await set_status(api, gid, "generating")
    await set_progress(api, gid, 30)
    await note(api, gid, "while away")
    missed_to = await set_progress(api, gid, 55)

    async with open_ws(api) as ws:
        answer = await ws.subscribe(topic, since_seq=last_seen)
        assert answer == {
            "op": "subscribed",
            "topic": topic,
            "snapshot": None,
            "seq": last_seen,
        }
        replayed = [await ws.event() for _ in range(missed_to - last_seen)]
        assert [e["seq"] for e in replayed] == list(range(last_seen + 1, missed_to + 1))
        assert [e["type"] for e in replayed] == [
            "status",
            "progress",
            "updated",
            "progress",
        ]
        assert replayed[2]["data"] == {"note": "while away"}

        # Then live, and nothing twice.
        live_seq = await set_status(api, gid, "uploading")
        rest = await ws.until_pong()
        assert [(e["seq"], e["type"]) for e in rest] == [(live_seq["seq"], "status")]


async def test_resume_while_events_keep_coming_is_gapless(api: Api):
    # History is read while new events are committed: the subscriber must
    # hold live events during the read and drop the ones it replayed.
    gid = (await queued_generation(api))["id"]
    topic = f"generation:{gid}"
    for i in range(5):
        await note(api, gid, f"before {i}")

    async def writer() -> int:
        last = 0
        for i in range(40):
            last = await note(api, gid, f"during {i}")
        return last

    async with open_ws(api) as ws:
        writing = asyncio.create_task(writer())
        answer = await ws.subscribe(topic, since_seq=4)
        assert answer["op"] == "subscribed" and answer["seq"] == 4
        last = await writing
        seqs = []
        while not seqs or seqs[-1] < last:
            seqs.append((await ws.event())["seq"])
        assert seqs == list(range(5, last + 1))
        assert await ws.until_pong() == []


async def test_reset_with_a_fresh_snapshot_when_history_was_pruned(api: Api):
    gid = (await queued_generation(api))["id"]
    topic = f"generation:{gid}"
    await set_status(api, gid, "submitting")
    await set_status(api, gid, "generating")
    current = await set_progress(api, gid, 20)  # seq 6
    await prune(api, gid, up_to_seq=4)

    async with open_ws(api) as ws:
        # Events 4.. are needed but 4 is gone: no partial replay.
        reset = await ws.subscribe(topic, since_seq=3)
        assert reset["op"] == "reset"
        assert reset["seq"] == current
        assert reset["snapshot"]["status"] == "generating"
        assert reset["snapshot"]["progress"] == 20
        assert reset["snapshot"]["seq"] == current
        # Live events continue after the reset.
        await set_progress(api, gid, 25)
        assert (await ws.event())["seq"] == current + 1

    async with open_ws(api) as ws:
        # History from 4 on is still there: a normal resume.
        answer = await ws.subscribe(topic, since_seq=4)
        assert answer["op"] == "subscribed" and answer["snapshot"] is None
        assert [(await ws.event())["seq"] for _ in range(3)] == [5, 6, 7]

    async with open_ws(api) as ws:
        # A seq the generation never reached (another database?): reset.
        reset = await ws.subscribe(topic, since_seq=100)
        assert reset["op"] == "reset" and reset["seq"] == current + 1


async def test_a_resume_further_behind_than_the_replay_limit_resets(api_factory):
    api = await api_factory({"realtime": {"history_replay_limit": 3}})
    gid = (await queued_generation(api))["id"]
    for i in range(4):
        last = await note(api, gid, str(i))  # seqs 3..6

    async with open_ws(api) as ws:
        reset = await ws.subscribe(f"generation:{gid}", since_seq=3)
        assert reset["op"] == "reset" and reset["seq"] == last
        assert await ws.until_pong() == []
    async with open_ws(api) as ws:
        answer = await ws.subscribe(f"generation:{gid}", since_seq=4)
        assert answer["op"] == "subscribed"
        assert [(await ws.event())["seq"] for _ in range(3)] == [5, 6, 7]


async def test_the_user_topic_carries_every_generation_of_the_user(api: Api):
    first = await queued_generation(api)
    async with open_ws(api) as ws:
        subscribed = await ws.subscribe("user:alice")
        assert subscribed["op"] == "subscribed" and subscribed["seq"] is None
        snapshot = subscribed["snapshot"]["generations"]
        assert [(g["id"], g["seq"]) for g in snapshot] == [(first["id"], 3)]

        second = await api.create(prompt="A lighthouse in a storm, wide aerial shot")
        created = await ws.event()
        assert created["type"] == "created"
        assert created["generationId"] == second["id"]
        assert created["seq"] == 1
        assert created["data"]["prompt"] == second["prompt"]
        await set_status(api, first["id"], "submitting")
        status = await ws.event()
        assert (status["generationId"], status["seq"]) == (first["id"], 4)

        # Another user's changes never show up here.
        await api.create(user="bob", prompt="A bob's own video of a quiet harbour")
        assert await ws.until_pong() == []
