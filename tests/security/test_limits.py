"""Request limits: body and head size, rate limits, time to answer, frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from websockets.exceptions import ConnectionClosed

from nimu_rt.api.middleware import LimitsMiddleware
from tests.conftest import Api
from tests.realtime.conftest import open_ws
from tests.support import WAIT_S, make_settings, serve

PROMPT = "A red fox trots through a snowy forest at dawn, cinematic tracking shot"


@pytest.fixture
def backend() -> str:
    # Limits act before the store is touched.
    return "sqlite"


async def listed(api: Api, user: str = "alice") -> list[dict[str, Any]]:
    r = await api.client.get("/api/generations", headers=api.headers(user))
    return r.json()["items"]


async def test_a_body_over_the_limit_is_refused_declared_or_streamed(api: Api):
    limit = api.services.settings.server.max_body_bytes
    big = json.dumps({"prompt": PROMPT, "negativePrompt": "x" * limit}).encode()
    headers = {**api.headers(), "Content-Type": "application/json"}
    # Declared in Content-Length: refused before the body is read.
    r = await api.client.post("/api/generations", content=big, headers=headers)
    assert (r.status_code, r.json()["code"]) == (413, "payload_too_large")

    # Chunked, with no length: refused once the bytes read pass the limit.
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    r = await api.client.post("/api/generations", content=chunks(), headers=headers)
    assert (r.status_code, r.json()["code"]) == (413, "payload_too_large")
    # A route that reads no body is covered too.
    r = await api.client.post(
        "/api/generations/x/cancel", content=big, headers=headers
    )
    assert r.status_code == 413
    assert await listed(api) == []
    # Local-storage object uploads have the reference-image limit instead:
    # a larger body gets as far as the link check.
    r = await api.client.put(
        "/api/storage/objects/refs/alice/a.png?exp=1&sig=x",
        content=b"\0" * (limit + 1),
        headers={"Content-Type": "image/png"},
    )
    assert (r.status_code, r.json()["reason"]) == (403, "invalid_signature")


async def test_oversized_headers_get_431(api: Api):
    limit = api.services.settings.security.max_header_bytes
    headers = {**api.headers(), "X-Padding": "p" * limit}
    r = await api.client.get("/api/generations", headers=headers)
    assert (r.status_code, r.json()["code"]) == (431, "headers_too_large")
    assert r.headers["x-content-type-options"] == "nosniff"


RATE = {
    "security": {
        "user_burst": 3,
        "user_rate_per_s": 0.01,
        "ip_burst": 8,
        "ip_rate_per_s": 0.01,
    }
}


async def test_a_burst_over_the_user_limit_gets_429(api_factory: Callable[..., Any]):
    api = await api_factory(RATE)
    remaining = []
    for _ in range(3):
        r = await api.client.post(
            "/api/generations", json={"prompt": PROMPT}, headers=api.headers()
        )
        assert r.status_code == 201
        assert r.headers["ratelimit-limit"] == "3"
        remaining.append(int(r.headers["ratelimit-remaining"]))
    assert remaining == [2, 1, 0]
    r = await api.client.post(
        "/api/generations", json={"prompt": PROMPT}, headers=api.headers()
    )
    assert r.status_code == 429
    problem = r.json()
    assert (problem["code"], problem["limit"]) == ("rate_limited", "user")
    assert r.headers["content-type"] == "application/problem+json"
    # One token comes back after 1 / 0.01 s.
    assert r.headers["retry-after"] == "100"
    assert problem["retryAfterSeconds"] == 100
    assert r.headers["ratelimit-remaining"] == "0"
    assert int(r.headers["ratelimit-reset"]) == 300
    assert len(await listed(api)) == 3  # the refused one created nothing
    # Reads are not limited; other users have their own bucket; operators
    # are not limited at all.
    assert (await api.client.get("/api/generations", headers=api.headers())).is_success
    r = await api.client.post(
        "/api/generations", json={"prompt": PROMPT}, headers=api.headers("bob")
    )
    assert r.status_code == 201
    for _ in range(4):
        r = await api.client.post(
            "/api/queue/pause", headers=api.headers("ops", "admin")
        )
        assert r.status_code == 200 and "ratelimit-limit" not in r.headers


async def test_the_address_limit_counts_every_caller_from_it(
    api_factory: Callable[..., Any],
):
    api = await api_factory(RATE)
    # Unauthenticated and badly authenticated requests count too: they are
    # how a token is guessed.
    statuses = []
    for n in range(8):
        r = await api.client.post(
            "/api/generations",
            json={"prompt": PROMPT},
            headers={"Authorization": f"Bearer guess-{n}"},
        )
        statuses.append(r.status_code)
    assert statuses == [401] * 8
    r = await api.client.post(
        "/api/generations", json={"prompt": PROMPT}, headers=api.headers("carol")
    )
    assert r.status_code == 429
    assert r.json()["limit"] == "ip" and "address" in r.json()["detail"]
    assert await listed(api, "carol") == []


def slow_app() -> Starlette:
    async def stuck(request: Request) -> Response:
        await asyncio.sleep(WAIT_S * 10)
        return Response("never")

    async def trickle(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"tick\n"
                await asyncio.sleep(0.1)

        return StreamingResponse(body(), media_type="text/plain")

    return Starlette(routes=[Route("/stuck", stuck), Route("/trickle", trickle)])


async def test_an_answer_that_does_not_start_in_time_is_a_503(tmp_path: Path):
    settings = make_settings(tmp_path, {"security": {"request_timeout_s": 0.2}})
    app = LimitsMiddleware(slow_app(), settings=settings)
    async with serve(app) as base_url, httpx.AsyncClient(
        base_url=base_url, timeout=WAIT_S
    ) as http:
        r = await http.get("/stuck")
        assert (r.status_code, r.json()["code"]) == (503, "request_timeout")
        # Once the answer has started, streaming it is not cut off.
        r = await http.get("/trickle")
        assert r.status_code == 200 and r.text == "tick\n" * 3


async def test_long_polls_get_their_wait_on_top(api_factory: Callable[..., Any]):
    api = await api_factory(
        {
            "security": {"request_timeout_s": 0.1},
            "realtime": {"longpoll_max_wait_s": 1.0},
        }
    )
    await api.pause_queue()
    g = await api.create()
    r = await api.client.get(
        f"/api/generations/{g['id']}",
        params={"waitSeconds": 0.3, "sinceSeq": g["seq"]},
        headers=api.headers(),
    )
    assert r.status_code == 304


async def test_websocket_messages_over_the_frame_limit_close_1009(
    api_factory: Callable[..., Any],
):
    api = await api_factory({"realtime": {"max_message_bytes": 256}})
    async with open_ws(api) as ws:
        await ws.send_raw("x" * (256 * 16 + 1))
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert (await ws.closed())[0] == 1009
