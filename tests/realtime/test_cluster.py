"""Two instances on one PostgreSQL schema: events cross over LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from nimu_rt.events.hub import QUEUE_TOPIC
from tests.conftest import Api
from tests.realtime.conftest import (
    LIFECYCLE,
    note,
    open_ws,
    queued_generation,
    set_progress,
    set_status,
    wait_until,
)
from tests.support import WAIT_S

pytestmark = pytest.mark.parametrize(
    "backend", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
async def pair(api_factory) -> tuple[Api, Api]:
    """Instances A and B of one deployment (same schema, same signing key)."""
    return await api_factory(), await api_factory()


async def test_a_subscriber_on_one_instance_sees_changes_made_on_the_other(pair):
    a, b = pair
    gid = (await queued_generation(a))["id"]
    async with open_ws(b) as ws, open_ws(b) as user_ws:
        assert (await ws.subscribe(f"generation:{gid}"))["seq"] == 3
        await user_ws.subscribe("user:alice")
        expected = []
        for status in LIFECYCLE:
            expected.append((status, (await set_status(a, gid, status))["seq"]))
            if status == "generating":
                expected.append(("progress", await set_progress(a, gid, 50)))
        seen = [await ws.event() for _ in expected]
        assert [(e["seq"], e["data"].get("status", e["type"])) for e in seen] == [
            (seq, what) for what, seq in expected
        ]
        assert [(await user_ws.event())["seq"] for _ in expected] == [
            seq for _, seq in expected
        ]
        # Each event arrived once, not also through a second path.
        assert await ws.until_pong() == []


async def test_a_long_poll_on_one_instance_wakes_for_the_other(pair):
    a, b = pair
    gid = (await queued_generation(a))["id"]
    poll = asyncio.create_task(
        b.client.get(
            f"/api/generations/{gid}",
            params={"waitSeconds": WAIT_S * 2, "sinceSeq": 3},
            headers=b.headers(),
            timeout=WAIT_S * 3,
        )
    )
    await wait_until(lambda: b.services.hub.waiting(gid) == 1, "B never waited")
    await set_progress(a, gid, 12)
    async with asyncio.timeout(WAIT_S):
        r = await poll
    assert (r.status_code, r.json()["progress"]) == (200, 12)


async def test_an_event_too_large_for_notify_travels_by_reference(pair):
    a, b = pair
    gid = (await queued_generation(a))["id"]
    big = "y" * 20000  # NOTIFY payloads must stay under 8000 bytes
    async with open_ws(b) as ws:
        await ws.subscribe(f"generation:{gid}")
        seq_big = await note(a, gid, big)
        seq_small = await note(a, gid, "small")
        first, second = await ws.event(), await ws.event()
        assert (first["seq"], first["data"]) == (seq_big, {"note": big})
        assert (second["seq"], second["data"]) == (seq_small, {"note": "small"})


async def test_a_rolled_back_change_is_never_announced(pair):
    a, b = pair
    gid = (await queued_generation(a))["id"]

    class Abandon(Exception):
        pass

    async with open_ws(b) as ws:
        await ws.subscribe(f"generation:{gid}")
        with pytest.raises(Abandon):
            async with a.services.store.transaction() as tx:
                g = await tx.lock_generation(gid)
                assert g is not None
                await tx.change(g, event_type="progress", progress=99)
                raise Abandon
        seq = await set_progress(a, gid, 3)
        event = await ws.event()
        assert (event["seq"], event["data"]) == (seq, {"progress": 3})
        assert seq == 4


async def test_queue_messages_reach_operators_on_every_instance(pair):
    a, b = pair
    async with open_ws(b, "ops", "admin") as ws:
        await ws.subscribe(QUEUE_TOPIC)
        a.services.hub.publish(QUEUE_TOPIC, "stats", {"queued": 9}, retain=True)
        event = await ws.event()
        assert (event["type"], event["data"]) == ("stats", {"queued": 9})
    assert b.services.hub.retained(QUEUE_TOPIC) == {"stats": {"queued": 9}}
    async with open_ws(b, "ops", "admin") as ws:
        answer = await ws.subscribe(QUEUE_TOPIC)
        assert answer["snapshot"] == {"stats": {"queued": 9}}


async def test_after_the_listen_connection_drops_subscribers_catch_up(pair, pg_url):
    a, b = pair
    gid = (await queued_generation(a))["id"]
    bridge = b.services.bridge
    async with open_ws(b) as ws:
        await ws.subscribe(f"generation:{gid}")
        await set_progress(a, gid, 1)
        assert (await ws.event())["seq"] == 4

        # Kill B's LISTEN connection, then change things right away: these
        # notifications are lost to B, which must catch up from the store.
        pid = bridge.listener_pid
        conn = await asyncpg.connect(pg_url, timeout=WAIT_S)
        try:
            assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await conn.close()
        last = 0
        for i in range(5):
            last = await note(a, gid, f"during the outage {i}")

        seqs = []
        while not seqs or seqs[-1] < last:
            seqs.append((await ws.event())["seq"])
        assert seqs == list(range(5, last + 1))
        await wait_until(lambda: bridge.reconnects >= 1, "B never listened again")
        assert bridge.listener_pid not in (None, pid)

        # And it hears the other instance live again.
        seq = await set_progress(a, gid, 40)
        assert (await ws.event())["seq"] == seq
        assert await ws.until_pong() == []
