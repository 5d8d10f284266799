"""The per-connection frame buffer: what a slow reader gets, and when it ends."""

from __future__ import annotations

import asyncio

from nimu_rt.events.outbox import Outbox


async def drain(outbox: Outbox) -> list[str]:
    frames = []
    while len(outbox):
        frame = await asyncio.wait_for(outbox.get(), 1)
        assert frame is not None
        frames.append(frame)
    return frames


async def test_a_newer_progress_replaces_the_waiting_one_and_keeps_order():
    outbox = Outbox(capacity=8)
    progress = ("generation:g", "g", "progress")
    outbox.put("p10", progress, frozenset({"progress"}))
    outbox.put("status generating")
    outbox.put("p20", progress, frozenset({"progress"}))
    outbox.put("p30", progress, frozenset({"progress"}))
    # The latest progress, after the status it followed: seq order holds.
    assert await drain(outbox) == ["status generating", "p30"]
    assert not outbox.closed


async def test_an_update_that_says_less_does_not_replace_one_that_says_more():
    outbox = Outbox(capacity=8)
    key = ("user:u", "g", "queue")
    outbox.put("q1", key, frozenset({"queuePosition", "estimatedStartAt"}))
    outbox.put("q2", key, frozenset({"queuePosition"}))
    assert await drain(outbox) == ["q1", "q2"]


async def test_status_frames_never_drop_a_full_buffer_closes_with_4008():
    outbox = Outbox(capacity=3)
    for i in range(3):
        outbox.put(f"status {i}")
    assert not outbox.closed
    outbox.put("status 3")
    assert outbox.close_code == 4008
    # Nothing more is written: the client resumes from the store instead.
    assert await asyncio.wait_for(outbox.get(), 1) is None


async def test_coalescing_never_counts_against_the_limit():
    outbox = Outbox(capacity=2)
    key = ("generation:g", "g", "progress")
    for p in range(1000):
        outbox.put(f"p{p}", key, frozenset({"progress"}))
    assert not outbox.closed
    assert await drain(outbox) == ["p999"]


async def test_a_drained_close_sends_what_was_queued_first():
    outbox = Outbox(capacity=4)
    outbox.put("error: bad token")
    outbox.close(4501, "the token is not valid", drain=True)
    outbox.put("ignored after close")
    assert await asyncio.wait_for(outbox.get(), 1) == "error: bad token"
    assert await asyncio.wait_for(outbox.get(), 1) is None
    assert (outbox.close_code, outbox.close_reason) == (4501, "the token is not valid")


async def test_a_replay_waits_for_room_instead_of_overflowing():
    outbox = Outbox(capacity=4)
    for i in range(3):
        outbox.put(f"live {i}")
    waiting = asyncio.create_task(outbox.wait_for_room(3))
    await asyncio.sleep(0)
    assert not waiting.done()  # only one frame fits
    assert await asyncio.wait_for(outbox.get(), 1) == "live 0"
    await asyncio.sleep(0)
    assert not waiting.done()
    assert await asyncio.wait_for(outbox.get(), 1) == "live 1"
    await asyncio.wait_for(waiting, 1)
    for i in range(3):
        outbox.put(f"replayed {i}")
    assert not outbox.closed
    assert len(outbox) == 4
