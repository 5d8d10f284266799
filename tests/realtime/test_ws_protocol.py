"""/ws handshake, auth, topic access, and answers to bad frames."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import InvalidStatus

from nimu_rt.events.hub import QUEUE_TOPIC
from nimu_rt.ids import new_id
from tests.conftest import Api
from tests.realtime.conftest import open_ws, queued_generation
from tests.support import WAIT_S


async def test_topics_of_others_are_refused_as_if_they_did_not_exist(api: Api):
    alices = await queued_generation(api, "alice")
    async with open_ws(api, "bob") as ws:
        # Alice's generation and one that does not exist read the same.
        for gid in (alices["id"], new_id()):
            answer = await ws.subscribe(f"generation:{gid}")
            assert answer == {
                "op": "error",
                "code": "not_found",
                "message": f"no generation {gid}",
                "topic": f"generation:{gid}",
            }
        answer = await ws.subscribe("user:alice")
        assert (answer["op"], answer["code"]) == ("error", "not_found")
        answer = await ws.subscribe(QUEUE_TOPIC)
        assert (answer["op"], answer["code"]) == ("error", "not_found")
        # Bob's own user topic is fine, and none of the refusals leaked.
        assert (await ws.subscribe("user:bob"))["op"] == "subscribed"
        api.services.hub.publish(QUEUE_TOPIC, "stats", {"queued": 1})
        await api.client.post(
            f"/api/generations/{alices['id']}/cancel", headers=api.headers("alice")
        )
        assert await ws.until_pong() == []

    # Operators may watch any generation and the queue.
    async with open_ws(api, "ops", "admin") as ws:
        answer = await ws.subscribe(f"generation:{alices['id']}")
        assert answer["op"] == "subscribed"
        assert answer["snapshot"]["status"] == "cancelled"


async def test_operators_watch_the_coordinators_queue_statistics(api: Api):
    hub = api.services.hub
    async with asyncio.timeout(WAIT_S):
        while "stats" not in hub.retained(QUEUE_TOPIC):
            await asyncio.sleep(0.05)
    async with open_ws(api, "ops", "admin") as ws:
        answer = await ws.subscribe(QUEUE_TOPIC)
        assert (answer["op"], answer["topic"], answer["seq"]) == (
            "subscribed",
            QUEUE_TOPIC,
            None,
        )
        # The last statistics the coordinator published, kept for newcomers:
        # its own name, and an empty queue.
        stats = answer["snapshot"]["stats"]
        assert stats["coordinator"] is not None
        assert stats["depth"]["total"] == 0
        # A generation joins the queue; the next statistics count it. Queue
        # messages are ephemeral: no seq, no generation.
        await queued_generation(api)
        while True:
            event = await ws.event()
            assert (event["type"], event["seq"], event["generationId"]) == (
                "stats",
                None,
                None,
            )
            if event["data"]["depth"]["total"] == 1:
                break
    assert hub.retained(QUEUE_TOPIC)["stats"]["depth"]["total"] == 1


async def test_bad_frames_get_error_frames_and_the_connection_stays(api: Api):
    gid = (await queued_generation(api))["id"]
    async with open_ws(api) as ws:
        cases = [
            ("not json", "malformed_frame", None),
            ("[1, 2]", "invalid_frame", None),
            ('{"op": "shout"}', "invalid_frame", None),
            ('{"op": "subscribe"}', "invalid_frame", None),
            ('{"op": "subscribe", "topic": "x", "sinceseq": 1}', "invalid_frame", "x"),
            ('{"op": "subscribe", "topic": "x", "sinceSeq": -1}', "invalid_frame", "x"),
            ('{"op": "subscribe", "topic": "nope"}', "bad_topic", "nope"),
            ('{"op": "subscribe", "topic": "generation:12"}', "bad_topic", None),
            ('{"op": "unsubscribe", "topic": "user:alice"}', "not_subscribed", None),
            (
                '{"op": "subscribe", "topic": "user:alice", "sinceSeq": 3}',
                "resume_unsupported",
                "user:alice",
            ),
        ]
        for text, code, topic in cases:
            await ws.send_raw(text)
            answer = await ws.recv()
            assert answer["op"] == "error", text
            assert answer["code"] == code, (text, answer)
            assert answer["message"]
            if topic is not None:
                assert answer["topic"] == topic, text

        await ws.send_raw(b'{"op": "ping"}')
        answer = await ws.recv()
        assert (answer["op"], answer["code"]) == ("error", "bad_frame")

        await ws.send_raw(json.dumps({"op": "auth", "token": "x" * 5000}))
        answer = await ws.recv()
        assert (answer["op"], answer["code"]) == ("error", "message_too_large")

        # Still open, still serving.
        assert (await ws.subscribe(f"generation:{gid}"))["op"] == "subscribed"
        assert await ws.until_pong() == []


async def test_unsubscribe_stops_the_events_of_that_topic(api: Api):
    gid = (await queued_generation(api))["id"]
    async with open_ws(api) as ws:
        await ws.subscribe(f"generation:{gid}")
        await ws.send(op="unsubscribe", topic=f"generation:{gid}")
        assert await ws.until_pong() == []
        await api.client.post(f"/api/generations/{gid}/cancel", headers=api.headers())
        assert await ws.until_pong() == []


async def test_subscriptions_per_connection_are_limited(api_factory):
    api = await api_factory({"realtime": {"max_subscriptions": 2}})
    first, second, third = [await queued_generation(api) for _ in range(3)]
    async with open_ws(api) as ws:
        for g in (first, second):
            assert (await ws.subscribe(f"generation:{g['id']}"))["op"] == "subscribed"
        answer = await ws.subscribe(f"generation:{third['id']}")
        assert (answer["op"], answer["code"]) == ("error", "too_many_subscriptions")
        # Subscribing again to a topic it has replaces it: a fresh snapshot.
        again = await ws.subscribe(f"generation:{first['id']}")
        assert again["op"] == "subscribed" and again["snapshot"]["id"] == first["id"]


async def test_auth_by_message(rt_api: Api):
    api = rt_api
    gid = (await queued_generation(api))["id"]
    async with open_ws(api, user=None) as ws:
        answer = await ws.subscribe(f"generation:{gid}")
        assert (answer["op"], answer["code"]) == ("error", "unauthorized")
        await ws.send(op="ping")
        assert (await ws.recv())["op"] == "pong"  # pings need no auth
        await ws.send(op="auth", token=api.token("alice"))
        assert (await ws.subscribe(f"generation:{gid}"))["op"] == "subscribed"
        await ws.send(op="auth", token=api.token("alice"))
        answer = await ws.recv()
        assert (answer["op"], answer["code"]) == ("error", "already_authenticated")


async def test_a_bad_token_in_the_auth_message_closes_with_4501(rt_api: Api):
    async with open_ws(rt_api, user=None) as ws:
        await ws.send(op="auth", token="not-a-jwt")
        answer = await ws.recv()
        assert (answer["op"], answer["code"]) == ("error", "unauthorized")
        code, reason = await ws.closed()
        assert code == 4501
        assert "token" in reason


async def test_no_auth_message_in_time_closes_with_4408(rt_api: Api):
    async with open_ws(rt_api, user=None) as ws:
        code, _ = await ws.closed()
        assert code == 4408


async def test_a_bad_authorization_header_is_refused_at_the_handshake(api: Api):
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(
            api, user=None, additional_headers={"Authorization": "Bearer nope"}
        ):
            pass
    response = refused.value.response
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert json.loads(response.body)["code"] == "unauthorized"


async def test_browser_origins_are_checked(api_factory):
    api = await api_factory(
        {"realtime": {"allowed_origins": ["https://app.example"]}}
    )
    with pytest.raises(InvalidStatus) as refused:
        async with open_ws(api, origin="https://evil.example"):
            pass
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["code"] == "forbidden"

    # The allowlist, the service's own origin, and non-browsers (no Origin).
    for origin in ("https://app.example", api.base_url, None):
        kwargs = {"origin": origin} if origin else {}
        async with open_ws(api, **kwargs) as ws:
            assert (await ws.subscribe("user:alice"))["op"] == "subscribed"
