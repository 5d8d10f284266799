"""The live half of the Python client: follow one generation over ``/ws``.

:func:`follow` yields an :class:`Update` for the snapshot and for every event,
with the generation's state after it. When the connection drops (network,
server restart, or the server cutting off a reader that fell behind) it
reconnects with jittered exponential backoff and resubscribes with the last
seq it yielded, so the caller sees every event once, in order. After a
``reset`` (history no longer available) it yields the fresh snapshot with
``reset=True``.

It stops by itself when the generation reaches a terminal status (unless told
not to), raises :class:`StreamClosed` for a close code that asks it to stop
(e.g. 4501, the token is no longer valid), :class:`~nimu_rt.client.rest.ApiError`
for a refused handshake or subscription, and
:class:`~nimu_rt.client.rest.ServiceUnreachable` when no connection could be
made for ``give_up_after_s``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from nimu_rt.client.rest import ApiError, ServiceUnreachable
from nimu_rt.errors import NimuError
from nimu_rt.events.frames import Error as ErrorFrame
from nimu_rt.events.frames import EventFrame, Pong, Reset, Subscribed
from nimu_rt.lifecycle import TERMINAL
from nimu_rt.models import Event, EventType, Generation

log = logging.getLogger(__name__)

_frames = msgspec.json.Decoder(Subscribed | EventFrame | Reset | ErrorFrame | Pong)
_encode = msgspec.json.Encoder().encode

# Close codes after which reconnecting (and resuming) is the right move.
_RECONNECT_CODES = frozenset({1001, 1005, 1006, 1011, 1012, 1013, 1014})


def reconnects_after(code: int | None) -> bool:
    """Whether a client should reconnect after close code ``code``."""
    return code is None or code in _RECONNECT_CODES or 4000 <= code < 4500


class StreamClosed(NimuError):
    """The server closed the stream with a code that means "stop"."""

    code = "stream_closed"

    def __init__(self, close_code: int | None, reason: str) -> None:
        super().__init__(f"closed with {close_code}: {reason}")
        self.close_code = close_code
        self.reason = reason


class Update(msgspec.Struct, kw_only=True):
    """The generation after one step; ``event`` is None for a snapshot."""

    generation: Generation
    event: Event | None = None
    # True when the server replaced the state because events were lost.
    reset: bool = False


class Feed:
    """An async iterator of :class:`Update`; close it (or use ``async with``)."""

    def __init__(self, updates: AsyncGenerator[Update, None]) -> None:
        self._updates = updates

    def __aiter__(self) -> AsyncIterator[Update]:
        return self

    async def __anext__(self) -> Update:
        return await self._updates.__anext__()

    async def aclose(self) -> None:
        """Close the connection; safe to call twice."""
        await self._updates.aclose()

    async def __aenter__(self) -> Feed:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def follow(
    ws_url: str,
    token: str,
    generation_id: str,
    *,
    since: Generation | None = None,
    stop_at_terminal: bool = True,
    open_timeout_s: float = 10.0,
    first_backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
    give_up_after_s: float = 60.0,
) -> Feed:
    """Follow ``generation_id``; see the module docstring.

    With ``since`` (a snapshot the caller already holds) it resumes after
    its seq instead of starting with a snapshot.
    """
    return Feed(
        _follow(
            ws_url,
            token,
            generation_id,
            since=since,
            stop_at_terminal=stop_at_terminal,
            open_timeout_s=open_timeout_s,
            first_backoff_s=first_backoff_s,
            max_backoff_s=max_backoff_s,
            give_up_after_s=give_up_after_s,
        )
    )


async def _follow(
    ws_url: str,
    token: str,
    generation_id: str,
    *,
    since: Generation | None,
    stop_at_terminal: bool,
    open_timeout_s: float,
    first_backoff_s: float,
    max_backoff_s: float,
    give_up_after_s: float,
) -> AsyncGenerator[Update, None]:
    topic = f"generation:{generation_id}"
    state = since
    failing_since: float | None = None
    attempt = 0
    while True:
        try:
            async with connect(
                ws_url,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                open_timeout=open_timeout_s,
                max_size=16 * 1024 * 1024,
            ) as ws:
                request: dict[str, Any] = {"op": "subscribe", "topic": topic}
                if state is not None:
                    request["sinceSeq"] = state.seq
                await ws.send(_encode(request).decode())
                async for raw in ws:
                    try:
                        frame = _frames.decode(raw)
                    except msgspec.ValidationError:
                        continue  # a frame newer than this client: skip it
                    update: Update | None = None
                    match frame:
                        case Subscribed(snapshot=snapshot) | Reset(snapshot=snapshot):
                            failing_since, attempt = None, 0
                            if snapshot is not None:
                                state = msgspec.convert(snapshot, Generation)
                                reset = isinstance(frame, Reset)
                                update = Update(generation=state, reset=reset)
                        case EventFrame(topic=t, seq=seq) if t == topic and seq:
                            if state is None or seq <= state.seq:
                                continue
                            event = _event(frame, state.user_id)
                            state = apply_event(state, event)
                            update = Update(generation=state, event=event)
                        case ErrorFrame(topic=t, code=code, message=message) if (
                            t in (topic, None)
                        ):
                            raise ApiError(
                                404 if code == "not_found" else 400,
                                {"code": code, "detail": message},
                            )
                    if update is not None:
                        yield update
                        if stop_at_terminal and update.generation.status in TERMINAL:
                            return
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else ""
            if not reconnects_after(code):
                raise StreamClosed(code, reason) from None
            log.info(
                "stream closed with %s; resuming",
                code,
                extra={"action": "client.reconnect", "generation_id": generation_id},
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status < 500:
                raise _refused(status, exc.response.body) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            log.info(
                "cannot reach %s: %r",
                ws_url,
                exc,
                extra={"action": "client.unreachable", "generation_id": generation_id},
            )
        # Back off before the next attempt, and give up after a while.
        now = time.monotonic()
        if failing_since is None:
            failing_since = now
        elif now - failing_since > give_up_after_s:
            raise ServiceUnreachable(
                f"no connection to {ws_url} for {give_up_after_s:g} s"
            )
        delay_s = min(max_backoff_s, first_backoff_s * 2**attempt)
        attempt += 1
        await asyncio.sleep(delay_s * random.uniform(0.5, 1.0))


def apply_event(state: Generation, event: Event) -> Generation:
    """The generation after ``event``: its data overwrites those fields.

    Members of the data that are not generation fields (``previousStatus``,
    a ``reason``) are ignored.
    """
    if event.type == EventType.CREATED:
        doc = dict(event.data)
    else:
        doc = msgspec.to_builtins(state)
        doc.update(event.data)
    doc["seq"] = event.seq
    doc["updatedAt"] = msgspec.to_builtins(event.at)
    return msgspec.convert(doc, Generation)


def _event(frame: EventFrame, user_id: str) -> Event:
    return Event(
        generation_id=frame.generation_id or "",
        user_id=user_id,
        seq=frame.seq or 0,
        type=frame.type,
        data=frame.data if isinstance(frame.data, dict) else {},
        at=frame.at,
    )


def _refused(status: int, body: bytes | None) -> ApiError:
    try:
        problem = msgspec.json.decode(body or b"{}")
    except msgspec.DecodeError:
        problem = {}
    if not isinstance(problem, dict):
        problem = {}
    problem.setdefault("detail", f"the handshake was refused with {status}")
    return ApiError(status, problem)
