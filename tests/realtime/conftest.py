"""Helpers for the real-time tests: WebSocket clients and a generation driver.

Here a generation is driven through its lifecycle by hand, one step at a
time: status and progress changes are written through a store transaction,
exactly as an actor would. The queue is paused
so that no actor runs the job meanwhile; the real pipeline seen over the
WebSocket is tested in tests/jobs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from nimu_rt.lifecycle import action_for
from tests.conftest import Api
from tests.support import WAIT_S

CLEAR_PROMPT = "A red fox trots through a snowy forest at dawn, cinematic tracking shot"
LIFECYCLE = ["submitting", "generating", "uploading", "completed"]


def ws_url(api: Api) -> str:
    return api.base_url.replace("http://", "ws://", 1) + "/ws"


class Ws:
    """A real WebSocket client speaking the /ws protocol, every wait bounded."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    async def send(self, **frame: Any) -> None:
        await self.conn.send(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.conn.send(data)

    async def recv(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            return json.loads(await self.conn.recv())

    async def subscribe(self, topic: str, since_seq: int | None = None) -> dict:
        """Send subscribe; return the answer (subscribed, reset or error)."""
        frame: dict[str, Any] = {"op": "subscribe", "topic": topic}
        if since_seq is not None:
            frame["sinceSeq"] = since_seq
        await self.send(**frame)
        return await self.recv()

    async def until_pong(self) -> list[dict[str, Any]]:
        """Every frame before the answer to a ping sent now (a barrier)."""
        await self.send(op="ping")
        frames = []
        while (frame := await self.recv())["op"] != "pong":
            frames.append(frame)
        return frames

    async def event(self) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["op"] == "event", frame
        return frame

    async def closed(self) -> tuple[int | None, str]:
        """Read until the server closes; its close code and reason."""
        async with asyncio.timeout(WAIT_S):
            await self.conn.wait_closed()
        return self.conn.close_code, self.conn.close_reason or ""


@asynccontextmanager
async def open_ws(
    api: Api,
    user: str | None = "alice",
    role: str = "user",
    **connect_kwargs: Any,
) -> AsyncIterator[Ws]:
    """A connection authenticated by header (``user=None``: no header)."""
    headers = dict(connect_kwargs.pop("additional_headers", {}) or {})
    if user is not None:
        headers["Authorization"] = f"Bearer {api.token(user, role)}"
    async with connect(
        ws_url(api),
        additional_headers=headers,
        compression=None,
        open_timeout=WAIT_S,
        close_timeout=WAIT_S,
        **connect_kwargs,
    ) as conn:
        yield Ws(conn)


async def queued_generation(api: Api, user: str = "alice") -> dict[str, Any]:
    """A generation confirmed and waiting in the paused queue (seq 3).

    Returned once the coordinator published its place in line (seq 3), so
    that no event of the queue's arrives in the middle of a test.
    """
    created = await api.create(user=user, prompt=CLEAR_PROMPT)
    r = await api.client.post(
        f"/api/generations/{created['id']}/confirm",
        json={"acceptedCostUsd": created["costEstimate"]["usd"]},
        headers=api.headers(user),
    )
    assert r.status_code == 200, r.text
    confirmed = r.json()
    r = await api.client.get(
        f"/api/generations/{created['id']}",
        params={"waitSeconds": WAIT_S, "sinceSeq": confirmed["seq"]},
        headers=api.headers(user),
    )
    assert r.status_code == 200, r.text
    assert r.json()["queuePosition"] is not None
    return r.json()


async def set_status(api: Api, generation_id: str, status: str) -> dict[str, Any]:
    """Move the generation to ``status`` as the pipeline does; the new state.

    Written through the store by the lifecycle table (only the pipeline may
    move a job forward; the operators' override route refuses it).
    """
    async with api.services.store.transaction() as tx:
        g = await tx.lock_generation(generation_id)
        assert g is not None
        g = await tx.change(g, action=action_for(g.status, status))
    return msgspec.to_builtins(g)


async def set_progress(api: Api, generation_id: str, progress: int) -> int:
    """Write a progress change as an actor does; returns its seq."""
    async with api.services.store.transaction() as tx:
        g = await tx.lock_generation(generation_id)
        assert g is not None
        g = await tx.change(g, event_type="progress", progress=progress)
    return g.seq


async def note(api: Api, generation_id: str, text: str) -> int:
    """Write an ``updated`` event that carries ``text``; returns its seq."""
    async with api.services.store.transaction() as tx:
        g = await tx.lock_generation(generation_id)
        assert g is not None
        g = await tx.change(g, event_type="updated", extra={"note": text})
    return g.seq


async def prune(api: Api, generation_id: str, up_to_seq: int) -> None:
    """Delete events up to ``up_to_seq``, as history pruning would."""
    store = api.services.store
    sql = "DELETE FROM generation_events WHERE generation_id = {} AND seq <= {}"
    async with store.transaction() as tx:
        if store.kind == "postgres":
            await tx.conn.execute(sql.format("$1", "$2"), generation_id, up_to_seq)
        else:
            await tx._exec(sql.format("?", "?"), (generation_id, up_to_seq))


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Wait (bounded by WAIT_S) for a condition only the server can see."""
    async with asyncio.timeout(WAIT_S):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


@pytest.fixture
def api_factory(api_factory: Callable[..., Any]) -> Callable[..., Any]:
    """The shared factory, with the queue paused in every app it starts."""

    async def start(overrides: dict[str, Any] | None = None) -> Api:
        api = await api_factory(overrides)
        await api.pause_queue()
        return api

    return start


@pytest.fixture
async def api(api_factory: Callable[..., Any]) -> Api:
    return await api_factory()


@pytest.fixture
async def rt_api(api_factory: Callable[..., Any]) -> Api:
    """The app with short real-time deadlines, on the current backend."""
    return await api_factory({"realtime": {"auth_deadline_s": 0.5}})
