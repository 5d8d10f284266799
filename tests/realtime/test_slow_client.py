"""A client that stops reading is cut off; the others never wait for it."""

from __future__ import annotations

import pytest
from websockets.exceptions import ConnectionClosed

from tests.realtime.conftest import note, open_ws, queued_generation

# Large events fill the slow client's socket buffers after a few hundred.
PAYLOAD = "x" * 32768
MAX_EVENTS = 2000


async def test_a_client_that_stops_reading_is_cut_off_alone(api_factory):
    api = await api_factory(
        {"realtime": {"subscriber_buffer_frames": 16, "history_replay_limit": 8}}
    )
    gid = (await queued_generation(api))["id"]
    topic = f"generation:{gid}"
    hub = api.services.hub

    # max_queue=1: the slow client's library stops reading the socket as
    # soon as one frame waits unread, and this test never reads it.
    async with open_ws(api, max_queue=1) as slow, open_ws(api) as fast:
        await slow.subscribe(topic)
        await fast.subscribe(topic)
        assert hub.connection_count == 2

        sent: list[int] = []
        while hub.connection_count == 2:
            assert len(sent) < MAX_EVENTS, "the slow client was never cut off"
            sent.append(await note(api, gid, PAYLOAD))
            # The fast client gets every event while the slow one is stuck.
            event = await fast.event()
            assert event["seq"] == sent[-1]
        # It keeps receiving after the slow one is gone.
        sent.append(await note(api, gid, "after"))
        assert (await fast.event())["data"] == {"note": "after"}

        # The slow client now reads what reached its socket, in order, then
        # the close code that tells it to reconnect and resume.
        got: list[int] = []
        try:
            while True:
                got.append((await slow.recv())["seq"])
        except ConnectionClosed:
            pass
        assert slow.conn.close_code == 4008
        assert got == list(range(sent[0], sent[0] + len(got)))
        assert len(got) < len(sent)

    # Resuming from the last seq it saw: it missed more than the replay
    # limit (at least the 16 frames its buffer held), so it gets a reset.
    async with open_ws(api) as again:
        answer = await again.subscribe(topic, since_seq=got[-1] if got else 3)
        assert answer["op"] == "reset"
        assert answer["seq"] == sent[-1]
        assert answer["snapshot"]["seq"] == sent[-1]


async def test_a_write_that_stalls_past_send_timeout_closes_the_connection(
    api_factory, caplog
):
    # A buffer too large to overflow: only the stalled write can end it.
    api = await api_factory(
        {"realtime": {"subscriber_buffer_frames": 100_000, "send_timeout_s": 0.5}}
    )
    gid = (await queued_generation(api))["id"]
    topic = f"generation:{gid}"
    hub = api.services.hub

    async with open_ws(api, max_queue=1) as slow, open_ws(api) as fast:
        await slow.subscribe(topic)
        await fast.subscribe(topic)
        sent = 0
        while hub.connection_count == 2:
            assert sent < MAX_EVENTS, "the stalled client was never cut off"
            seq = await note(api, gid, PAYLOAD)
            sent += 1
            assert (await fast.event())["seq"] == seq
        # The fast client is untouched and still served.
        seq = await note(api, gid, "after")
        assert (await fast.event())["seq"] == seq
        # Reading again, the stalled client gets what was buffered, then
        # the end of the connection.
        with pytest.raises(ConnectionClosed):
            while True:
                await slow.recv()
    assert any(
        getattr(r, "action", None) == "ws.slow" for r in caplog.records
    ), "no ws.slow record"
