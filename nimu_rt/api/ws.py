"""``/ws``: one WebSocket per browser tab, multiplexed by topic.

The frames are described in :mod:`nimu_rt.events.frames`, the resume rules in
:mod:`nimu_rt.events.subscriptions`, and the close codes in the README
("Real-time"). This module runs one connection:

1. the handshake is refused with a problem+json answer for a browser Origin
   that is not allowed (403) or an Authorization header that does not verify
   (401); tokens are never read from the URL;
2. without an Authorization header the first frame must be ``auth`` within
   ``realtime.auth_deadline_s`` (close 4408), and a bad token closes with 4501;
3. a reader task decodes client frames and answers each, a writer task sends
   the connection's :class:`~nimu_rt.events.outbox.Outbox`; a bad frame gets
   an ``error`` frame and the connection stays open;
4. when the outbox closes (too slow, shutdown, auth) the writer sends the
   close frame with its code, within ``realtime.send_timeout_s``.

A client that has stopped reading for good keeps its socket until the
kernel gives up on it: the close frame cannot reach it, and the ASGI
interface gives no way to abort a transport. Its subscriptions and queued
frames are released at once, so only the socket's own buffers remain.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec
from starlette.responses import Response
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from nimu_rt import logs
from nimu_rt.api.common import AUTH_SCOPE_KEY
from nimu_rt.auth import Principal
from nimu_rt.config import RealtimeSettings, Settings
from nimu_rt.errors import Forbidden, NimuError, ScopeDenied, Unauthorized
from nimu_rt.events.frames import (
    CLOSE_AUTH_TIMEOUT,
    CLOSE_INTERNAL,
    CLOSE_SLOW,
    CLOSE_UNAUTHORIZED,
    Auth,
    Error,
    FrameError,
    Ping,
    Pong,
    ServerFrame,
    Subscribe,
    Unsubscribe,
    decode_client_frame,
    encode_frame,
)
from nimu_rt.events.outbox import Outbox
from nimu_rt.events.subscriptions import Context, Subscription, open_subscription
from nimu_rt.models import encode

log = logging.getLogger(__name__)

# Messages this many times realtime.max_message_bytes are refused by the
# WebSocket layer before they are read whole (close 1009).
PROTOCOL_SIZE_FACTOR = 16

_PONG = encode_frame(Pong())


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn settings for ``/ws``; pass them to every ``uvicorn.Config``.

    The sans-I/O ``websockets`` implementation (uvicorn's default since
    0.50) with permessage-deflate off: compression would cost tens of KiB
    of memory per connection for frames of a few hundred bytes. Protocol
    pings follow ``[realtime]``.
    """
    rt = settings.realtime
    return {
        "ws": "websockets-sansio",
        "ws_per_message_deflate": False,
        "ws_max_size": rt.max_message_bytes * PROTOCOL_SIZE_FACTOR,
        "ws_ping_interval": rt.ping_interval_s,
        "ws_ping_timeout": rt.ping_timeout_s,
        # The request head cap when uvicorn runs its h11 parser; the
        # limits middleware checks it whatever the parser.
        "h11_max_incomplete_event_size": settings.security.max_header_bytes,
    }


async def websocket_endpoint(websocket: WebSocket) -> None:
    """``/ws``: one connection per tab, multiplexed by topic (see the README)."""
    connection = Connection(websocket)
    # Every record of this connection carries its id.
    with logs.bound(conn_id=connection.conn_id):
        await connection.run()


class Connection:
    """One accepted WebSocket: its principal, outbox and subscriptions."""

    def __init__(self, websocket: WebSocket) -> None:
        self.ws = websocket
        services = websocket.app.state.services
        self.settings: RealtimeSettings = services.settings.realtime
        self.services = services
        self.hub = services.hub
        self.conn_id = secrets.token_hex(6)
        self.outbox = Outbox(self.settings.subscriber_buffer_frames)
        self.principal: Principal | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self._auth_timer: asyncio.TimerHandle | None = None
        # When the frame being written started (loop time), None between
        # frames, and the timer that checks it (see _write_loop).
        self._write_started: float | None = None
        self._write_watch: asyncio.TimerHandle | None = None
        self._writer: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def run(self) -> None:
        # 1. Refuse before accepting: the browser then sees a failed
        #    handshake, and the details travel as problem+json.
        try:
            self._check_origin()
            # Verified by the auth middleware, which saw the header.
            outcome = self.ws.scope.get(AUTH_SCOPE_KEY)
            if isinstance(outcome, NimuError):
                raise outcome
            if isinstance(outcome, Principal):
                self.principal = outcome
        except NimuError as exc:
            await self._deny(exc)
            return
        await self.ws.accept()
        self.hub.register(self.outbox)
        if self.services.metrics is not None:
            self.services.metrics.ws_opened.inc()
        log.info(
            "ws connection opened",
            extra={
                "action": "ws.open",
                "conn_id": self.conn_id,
                "user_id": self.principal.user_id if self.principal else None,
            },
        )
        # 2. Without a header, the auth message must come in time.
        if self.principal is None:
            self._auth_timer = asyncio.get_running_loop().call_later(
                self.settings.auth_deadline_s, self._auth_expired
            )
        # 3. Read and write concurrently until either side ends.
        reader = asyncio.create_task(self._read_loop())
        writer = self._writer = asyncio.create_task(self._write_loop())
        self.outbox.on_abort = writer.cancel
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            read_result, write_result = await asyncio.gather(
                reader, writer, return_exceptions=True
            )
            await self._release()
        for result in (read_result, write_result):
            if isinstance(result, Exception) and not isinstance(
                result, WebSocketDisconnect
            ):
                # Logged once here, where the connection ends because of it.
                log.error(
                    "ws connection failed",
                    exc_info=result,
                    extra={"action": "ws.error", "conn_id": self.conn_id},
                )
        client_gone = read_result is None or isinstance(
            write_result, WebSocketDisconnect
        )
        # 4. The server ends the connection: send its close code.
        if not client_gone:
            await self._close_socket()
        log.info(
            "ws connection closed",
            extra={
                "action": "ws.close",
                "conn_id": self.conn_id,
                "code": self.outbox.close_code,
                "reason": self.outbox.close_reason,
            },
        )

    async def _release(self) -> None:
        self.outbox.on_abort = None
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self._write_watch is not None:
            self._write_watch.cancel()
        self.hub.unregister(self.outbox)
        subscriptions = list(self.subscriptions.values())
        self.subscriptions.clear()
        for subscription in subscriptions:
            await subscription.close()

    async def _close_socket(self) -> None:
        code = self.outbox.close_code or CLOSE_INTERNAL
        try:
            async with asyncio.timeout(self.settings.send_timeout_s):
                await self.ws.close(code, self.outbox.close_reason)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            # The client stopped reading or is already gone; nothing more
            # can be said to it.
            pass

    def _check_origin(self) -> None:
        origin = self.ws.headers.get("origin")
        if origin is None:
            return  # not a browser: cross-site hijacking does not apply
        allowed = self.settings.allowed_origins
        if "*" in allowed or origin in allowed:
            return
        own = urlsplit(self.services.settings.base_url)
        if origin == f"{own.scheme}://{own.netloc}":
            return
        parts = urlsplit(origin)
        if parts.netloc and parts.netloc == self.ws.headers.get("host"):
            return  # same origin as the page that served this request
        raise Forbidden(f"origin {origin} may not open /ws")

    async def _deny(self, error: NimuError) -> None:
        log.info(
            "ws handshake refused: %s",
            error.detail,
            extra={"action": "ws.refuse", "conn_id": self.conn_id, "code": error.code},
        )
        doc = error.problem(
            request_id=self.ws.scope.get("nimu.request_id"), instance="/ws"
        )
        response = Response(
            encode(doc),
            status_code=error.status,
            media_type="application/problem+json",
            headers=dict(error.headers()),
        )
        await self.ws.send_denial_response(response)

    def _auth_expired(self) -> None:
        if self.principal is None:
            self.outbox.close(CLOSE_AUTH_TIMEOUT, "no auth message in time")

    # -- writing --------------------------------------------------------------------

    async def _write_loop(self) -> None:
        # A write only waits when the client stopped reading, which is rare;
        # a timeout around every frame would cost a timer per frame per
        # connection. One timer per connection, armed when a write starts
        # and none is pending, checks the write in progress instead (see
        # _check_write); closing the outbox cancels this task.
        outbox = self.outbox
        metrics = self.services.metrics
        loop = asyncio.get_running_loop()
        while True:
            text = await outbox.get()
            if text is None:
                return
            born = outbox.last_born
            self._write_started = started = loop.time()
            if self._write_watch is None:
                self._write_watch = loop.call_at(
                    started + self.settings.send_timeout_s, self._check_write
                )
            await self.ws.send({"type": "websocket.send", "text": text})
            self._write_started = None
            if metrics is not None:
                metrics.frame_written(born, time.perf_counter())

    def _check_write(self) -> None:
        """Close the connection if the write in progress is overdue."""
        self._write_watch = None
        started = self._write_started
        if started is None:
            return
        due = started + self.settings.send_timeout_s
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            # A later write is in progress: check it when it is due.
            self._write_watch = loop.call_at(due, self._check_write)
            return
        log.warning(
            "ws client too slow: a write stalled",
            extra={"action": "ws.slow", "conn_id": self.conn_id},
        )
        # The first close wins: one already draining (after a failed auth)
        # keeps its code, but its stalled write must end all the same.
        self.outbox.close(CLOSE_SLOW, "too slow: a write stalled")
        if self._writer is not None:
            self._writer.cancel()

    def send(self, frame: ServerFrame) -> None:
        self.outbox.put(encode_frame(frame))

    def error(self, code: str, message: str, topic: str | None = None) -> None:
        self.send(Error(code=code, message=message, topic=topic))

    # -- reading --------------------------------------------------------------------

    async def _read_loop(self) -> None:
        """Answer client frames until the client disconnects (returns None)."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self.error("bad_frame", "frames are JSON text messages, not binary")
                continue
            if len(text.encode()) > self.settings.max_message_bytes:
                self.error(
                    "message_too_large",
                    f"messages must be at most {self.settings.max_message_bytes}"
                    " bytes",
                )
                continue
            try:
                frame = decode_client_frame(text)
                await self._handle(frame)
            except FrameError as exc:
                self.error(exc.code, exc.message, _topic_of(text))

    async def _handle(self, frame: Any) -> None:
        match frame:
            case Ping():
                self.outbox.put(_PONG)
            case Auth(token=token):
                await self._authenticate(token)
            case _ if self.principal is None:
                self.error("unauthorized", "send an auth message first")
            case Subscribe(topic=topic, since_seq=since_seq):
                await self._subscribe(topic, since_seq)
            case Unsubscribe(topic=topic):
                await self._unsubscribe(topic)

    async def _authenticate(self, token: str) -> None:
        if self.principal is not None:
            self.error("already_authenticated", "this connection is authenticated")
            return
        try:
            self.principal = await self.services.auth.verify(token)
        except Unauthorized as exc:
            self.error(exc.code, exc.detail)
            self.outbox.close(CLOSE_UNAUTHORIZED, exc.detail, drain=True)
            return
        except NimuError as exc:
            # The identity provider's keys are out of reach: not the token's
            # fault, so the client may try again (4000-4499: reconnect).
            self.error(exc.code, exc.detail)
            self.outbox.close(CLOSE_INTERNAL, exc.detail, drain=True)
            return
        logs.bind(user_id=self.principal.user_id)
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        log.info(
            "ws connection authenticated",
            extra={
                "action": "ws.auth",
                "conn_id": self.conn_id,
                "user_id": self.principal.user_id,
            },
        )

    async def _subscribe(self, topic: str, since_seq: int | None) -> None:
        assert self.principal is not None
        # A subscription that ended itself (its generation vanished) no
        # longer counts.
        for name in [n for n, sub in self.subscriptions.items() if sub.closed]:
            del self.subscriptions[name]
        if topic not in self.subscriptions and (
            len(self.subscriptions) >= self.settings.max_subscriptions
        ):
            self.error(
                "too_many_subscriptions",
                f"at most {self.settings.max_subscriptions} topics per connection",
                topic,
            )
            return
        if not self.principal.allows_topic(topic):
            error = ScopeDenied(f"this token does not cover the topic {topic}")
            self.error(error.code, error.detail, topic)
            return
        ctx = Context(
            hub=self.hub,
            store=self.services.store,
            outbox=self.outbox,
            principal=self.principal,
            replay_limit=self.settings.history_replay_limit,
            user_snapshot_size=self.settings.user_snapshot_size,
            send_timeout_s=self.settings.send_timeout_s,
            conn_id=self.conn_id,
        )
        try:
            subscription = open_subscription(topic, since_seq, ctx)
        except NimuError as exc:
            self.error(exc.code, exc.detail, topic)
            return
        # Subscribing again replaces the subscription: a fresh start.
        previous = self.subscriptions.pop(topic, None)
        if previous is not None:
            await previous.close()
        self.subscriptions[topic] = subscription
        try:
            await subscription.start(since_seq)
        except NimuError as exc:
            self.subscriptions.pop(topic, None)
            await subscription.close()
            self.error(exc.code, exc.detail, topic)
        except BaseException:
            self.subscriptions.pop(topic, None)
            await subscription.close()
            raise

    async def _unsubscribe(self, topic: str) -> None:
        subscription = self.subscriptions.pop(topic, None)
        if subscription is None:
            self.error("not_subscribed", "this connection has no such topic", topic)
            return
        await subscription.close()


def _topic_of(text: str) -> str | None:
    """The topic a refused frame named, when it is readable at all."""
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    topic = value.get("topic") if isinstance(value, dict) else None
    return topic if isinstance(topic, str) and len(topic) <= 300 else None


routes = [WebSocketRoute("/ws", websocket_endpoint)]
