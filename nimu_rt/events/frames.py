"""The frames of the ``/ws`` protocol: what clients send and what they get.

Every frame is one JSON text message whose ``op`` member names it. Client
frames are decoded by one reusable decoder into tagged structs, so a route
dispatches them with ``match``; unknown members are refused rather than
ignored, so a misspelt ``sinceSeq`` is an error, not a silent full replay.

Client frames::

    {"op": "auth", "token": "<JWT>"}
    {"op": "subscribe", "topic": "generation:<id>", "sinceSeq": 12}
    {"op": "unsubscribe", "topic": "generation:<id>"}
    {"op": "ping"}

Server frames::

    {"op": "subscribed", "topic": ..., "snapshot": {...} | null, "seq": 12 | null}
    {"op": "event", "topic": ..., "generationId": ..., "seq": 13,
     "type": "progress", "data": {"progress": 40}, "at": "2026-...Z"}
    {"op": "reset", "topic": ..., "snapshot": {...}, "seq": 20 | null}
    {"op": "error", "code": "not_found", "message": ..., "topic": ...}
    {"op": "pong"}

This module only defines and encodes frames; what they mean over time (seq,
resume, reset) is the business of :mod:`nimu_rt.events.subscriptions`.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

# Close codes. The browser and Python clients reconnect (and resume with
# sinceSeq) after 1001, 1006, 1011-1014 and 4000-4499; they stop after 1000,
# 1008, 1009 and 4500-4999, which need a change on the client's side first.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL = 1011
CLOSE_RESTART = 1012
# The client read too slowly: its frame buffer overflowed or a write stalled.
CLOSE_SLOW = 4008
# The server lost track of a topic and could not catch up from the store.
CLOSE_RESYNC_FAILED = 4011
# No auth message arrived within realtime.auth_deadline_s.
CLOSE_AUTH_TIMEOUT = 4408
# The token in the auth message is missing, invalid or expired: get a new one.
CLOSE_UNAUTHORIZED = 4501

SeqNumber = Annotated[int, Meta(ge=0, le=2**62)]
TopicName = Annotated[str, Meta(min_length=1, max_length=300)]


class ClientFrame(
    Struct, tag_field="op", rename="camel", forbid_unknown_fields=True, kw_only=True
):
    """Base of the frames a client sends."""


class Auth(ClientFrame, tag="auth", kw_only=True):
    """Authenticate a connection opened without an Authorization header."""

    token: Annotated[str, Meta(min_length=1, max_length=8192)]


class Subscribe(ClientFrame, tag="subscribe", kw_only=True):
    """Start receiving a topic; with ``since_seq``, resume after that seq."""

    topic: TopicName
    since_seq: SeqNumber | None = None


class Unsubscribe(ClientFrame, tag="unsubscribe", kw_only=True):
    """Client op: stop receiving a topic."""

    topic: TopicName


class Ping(ClientFrame, tag="ping", kw_only=True):
    """Application-level ping; browsers cannot see protocol pings."""


ClientFrames = Auth | Subscribe | Unsubscribe | Ping


class ServerFrame(Struct, tag_field="op", rename="camel", kw_only=True):
    """Base of the frames the server sends."""


class Subscribed(ServerFrame, tag="subscribed", kw_only=True):
    """A subscription is active.

    ``snapshot`` is the current state, or null when the subscription resumed
    from ``sinceSeq``: then ``seq`` repeats it and the missed events follow.
    """

    topic: str
    snapshot: Any
    seq: int | None


class EventFrame(ServerFrame, tag="event", kw_only=True):
    """One change. ``seq`` is null for messages that are not stored events."""

    topic: str
    generation_id: str | None
    seq: int | None
    type: str
    data: Any
    at: dt.datetime


class Reset(ServerFrame, tag="reset", kw_only=True):
    """Replace your state with ``snapshot``: the events in between are gone."""

    topic: str
    snapshot: Any
    seq: int | None


class Error(ServerFrame, tag="error", kw_only=True, omit_defaults=True):
    """A refused or malformed client frame; the connection stays open."""

    code: str
    message: str
    topic: str | None = None


class Pong(ServerFrame, tag="pong", kw_only=True):
    """The answer to a client ``ping``."""


_decoder = msgspec.json.Decoder(ClientFrames)
_encoder = msgspec.json.Encoder()


class FrameError(Exception):
    """A client message that is not a valid frame; ``code`` is its wire code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_client_frame(text: str | bytes) -> ClientFrames:
    """Decode one client message; raise :class:`FrameError` when it is bad.

    ``malformed_frame`` means not JSON at all, ``invalid_frame`` a JSON value
    of the wrong shape (the message names the member, as msgspec reports it).
    """
    try:
        return _decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise FrameError("invalid_frame", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise FrameError("malformed_frame", f"not a JSON object: {exc}") from None


def encode_frame(frame: ServerFrame) -> str:
    """The frame as the text of one WebSocket message."""
    return _encoder.encode(frame).decode()
