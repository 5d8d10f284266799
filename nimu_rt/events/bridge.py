"""Events across instances: PostgreSQL LISTEN/NOTIFY feeding each hub.

Design:

- **Where NOTIFY is sent.** Inside the transaction that writes the event,
  in the same statement as the event's INSERT (the store calls
  :meth:`PostgresBridge.notification` for each event). PostgreSQL delivers a
  notification only when, and if, its transaction commits, and in commit
  order, so no instance ever hears of a change that was rolled back, and a
  change is never committed without its notification.
- **Channel.** One per schema (``nimu_events_<schema>``), so that instances
  of different deployments (or test schemas) on one server do not hear each
  other.
- **Payload.** The event itself when its JSON fits NOTIFY's limit (under
  8000 bytes); otherwise a reference (generation id and seq) that the
  receiving instances read back from the store.
- **Own events.** Each bridge stamps its notifications with a random origin
  token and ignores those that carry its own: the local store listener has
  already handed them to the hub, without the round trip. Should both copies
  arrive, subscribers drop the second by seq anyway.
- **Ephemeral messages** (:meth:`Hub.publish`) are sent by a background task
  through the pool, latest-wins per topic and type; one too large for NOTIFY
  stays on its instance (and is logged).
- **A dropped LISTEN connection** is noticed by asyncpg's termination callback
  or by a periodic ``SELECT 1``, and opened again with capped exponential
  backoff. Notifications sent meanwhile are lost, so once it listens again
  the hub resynchronises every subscriber from the store (by seq).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from typing import Any

import asyncpg
import msgspec

from nimu_rt.config import RealtimeSettings
from nimu_rt.events.hub import Hub
from nimu_rt.models import Event
from nimu_rt.store.postgres import PostgresStore, translate_errors

log = logging.getLogger(__name__)

# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more.
NOTIFY_MAX_BYTES = 7999
_FIRST_RETRY_S = 0.1


class Ephemeral(msgspec.Struct, kw_only=True):
    """A message that is not stored, as it crosses to other instances."""

    topic: str
    type: str
    data: Any
    retain: bool = False


class Notification(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One NOTIFY payload: exactly one of ``event``, ``ref``, ``ephemeral``."""

    origin: str
    event: Event | None = None
    # (generation id, seq) of an event too large to travel by value.
    ref: tuple[str, int] | None = None
    ephemeral: Ephemeral | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Notification).decode


def channel_name(schema: str) -> str:
    """The NOTIFY channel of ``schema``; at most 63 bytes, PostgreSQL's limit."""
    name = f"nimu_events_{schema}"
    if len(name) > 63:
        name = "nimu_events_" + hashlib.sha256(schema.encode()).hexdigest()[:32]
    return name


class PostgresBridge:
    """Connects one instance's hub to every other instance on the schema.

    It owns one dedicated LISTEN connection and two tasks (the supervisor
    that keeps it open, and the sender of ephemeral messages). It does not
    deliver anything to sockets itself; it feeds the :class:`Hub`.

    Only events written through this store while the bridge runs are
    announced: a process that writes to the database without a started
    bridge (a one-off script) is heard by nobody, and subscribers elsewhere
    see its events only when a later event makes them catch up by seq. So
    work that writes during shutdown must stop before :meth:`close`.
    """

    def __init__(
        self, store: PostgresStore, hub: Hub, settings: RealtimeSettings
    ) -> None:
        self.store = store
        self.hub = hub
        self.settings = settings
        self.channel = channel_name(store.schema)
        self.origin = secrets.token_hex(8)
        # Times the LISTEN connection was opened again after a drop.
        self.reconnects = 0
        self._conn: asyncpg.Connection | None = None
        self._listening = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outgoing: dict[tuple[str, str], Ephemeral] = {}
        self._outgoing_ready = asyncio.Event()
        self._reads: set[asyncio.Task[None]] = set()

    @property
    def listener_pid(self) -> int | None:
        """The server process id of the LISTEN connection (for operators)."""
        return None if self._conn is None else self._conn.get_server_pid()

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Start listening; waits (bounded) until the first LISTEN is active.

        If it cannot listen within the database connect timeout the
        instance still starts, logs a warning and keeps trying; until then
        it only sees its own events.
        """
        self.store.notifier = self.notification
        self.hub.forward = self._forward
        self._supervisor = asyncio.create_task(self._supervise())
        self._sender = asyncio.create_task(self._send_ephemeral())
        try:
            async with asyncio.timeout(self.store.connect_timeout_s):
                await self._listening.wait()
        except TimeoutError:
            log.warning(
                "not listening for other instances' events yet",
                extra={"action": "bridge.start", "channel": self.channel},
            )

    async def close(self) -> None:
        """Stop listening and sending; safe to call twice."""
        self._closing = True
        if self.store.notifier == self.notification:
            self.store.notifier = None
        if self.hub.forward == self._forward:
            self.hub.forward = None
        tasks = [t for t in (self._supervisor, self._sender) if t is not None]
        tasks += list(self._reads)
        self._supervisor = self._sender = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._drop_connection()

    # -- sending --------------------------------------------------------------------

    def notification(self, event: Event) -> tuple[str, str]:
        """The channel and payload announcing ``event`` (called by the store)."""
        payload = _encode(Notification(origin=self.origin, event=event))
        if len(payload) > NOTIFY_MAX_BYTES:
            payload = _encode(
                Notification(origin=self.origin, ref=(event.generation_id, event.seq))
            )
        return self.channel, payload.decode()

    def _forward(self, topic: str, type: str, data: Any, retain: bool) -> None:
        # Latest wins: only the newest message of a topic and type is sent.
        self._outgoing[(topic, type)] = Ephemeral(
            topic=topic, type=type, data=data, retain=retain
        )
        self._outgoing_ready.set()

    async def _send_ephemeral(self) -> None:
        while True:
            await self._outgoing_ready.wait()
            self._outgoing_ready.clear()
            batch, self._outgoing = self._outgoing, {}
            for message in batch.values():
                payload = _encode(Notification(origin=self.origin, ephemeral=message))
                if len(payload) > NOTIFY_MAX_BYTES:
                    log.warning(
                        "ephemeral %s message on %s is too large for NOTIFY (%d"
                        " bytes); only this instance delivers it",
                        message.type,
                        message.topic,
                        len(payload),
                        extra={"action": "bridge.too_large", "topic": message.topic},
                    )
                    continue
                try:
                    async with translate_errors():
                        await self.store.pool.execute(
                            "SELECT pg_notify($1, $2)",
                            self.channel,
                            payload.decode(),
                            timeout=self.store.command_timeout_s,
                        )
                except Exception as exc:
                    log.warning(
                        "could not send an ephemeral %s message: %s",
                        message.type,
                        exc,
                        extra={"action": "bridge.send_failed", "topic": message.topic},
                    )

    # -- receiving ------------------------------------------------------------------

    def _on_notify(
        self, conn: Any, pid: int, channel: str, payload: str
    ) -> None:
        try:
            note = _decode(payload)
        except msgspec.DecodeError as exc:
            log.warning(
                "ignored a malformed notification: %s",
                exc,
                extra={"action": "bridge.malformed", "channel": channel},
            )
            return
        if note.origin == self.origin:
            return
        if note.event is not None:
            self.hub.publish_events([note.event])
        elif note.ref is not None:
            task = asyncio.create_task(self._read_back(*note.ref))
            self._reads.add(task)
            task.add_done_callback(self._reads.discard)
        elif note.ephemeral is not None:
            e = note.ephemeral
            self.hub.deliver_ephemeral(e.topic, e.type, e.data, retain=e.retain)

    async def _read_back(self, generation_id: str, seq: int) -> None:
        # Later notifications may overtake this read; subscribers put the
        # events back in order (a gap makes them catch up from the store).
        try:
            events = await self.store.events_after(generation_id, seq - 1, 1)
        except Exception as exc:
            log.warning(
                "could not read event %s of %s: %s",
                seq,
                generation_id,
                exc,
                extra={"action": "bridge.read_failed", "generation_id": generation_id},
            )
            return
        self.hub.publish_events(events)

    # -- the LISTEN connection ------------------------------------------------------

    async def _supervise(self) -> None:
        retry_s = _FIRST_RETRY_S
        opened_before = False
        while not self._closing:
            try:
                await self._listen()
                if opened_before:
                    self.reconnects += 1
                    log.info(
                        "listening again on %s",
                        self.channel,
                        extra={"action": "bridge.reconnect", "channel": self.channel},
                    )
                    # Whatever was notified while we were away is lost.
                    self.hub.resync_all()
                opened_before = True
                retry_s = _FIRST_RETRY_S
                await self._watch_connection()
                log.warning(
                    "LISTEN connection closed",
                    extra={"action": "bridge.lost", "channel": self.channel},
                )
            except Exception as exc:
                # Whatever broke, the bridge must keep trying: without it
                # this instance hears nothing from the others.
                log.warning(
                    "LISTEN connection failed: %r",
                    exc,
                    extra={"action": "bridge.lost", "channel": self.channel},
                )
            self._listening.clear()
            await self._drop_connection()
            if self._closing:
                return
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, self.settings.bridge_retry_max_s)

    async def _listen(self) -> None:
        kwargs = self.store.connect_kwargs()
        kwargs["server_settings"] = {
            **kwargs["server_settings"],
            "application_name": "nimu-rt-listen",
        }
        self._lost.clear()
        self._conn = await asyncpg.connect(**kwargs)
        self._conn.add_termination_listener(lambda _conn: self._lost.set())
        await self._conn.add_listener(self.channel, self._on_notify)
        self._listening.set()

    async def _watch_connection(self) -> None:
        # asyncpg reports a closed connection, but a half-open TCP one only
        # shows when a query times out: check it now and then.
        assert self._conn is not None
        interval_s = self.settings.bridge_check_interval_s
        while True:
            try:
                async with asyncio.timeout(interval_s):
                    await self._lost.wait()
                return
            except TimeoutError:
                pass
            await self._conn.fetchval("SELECT 1", timeout=interval_s)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
