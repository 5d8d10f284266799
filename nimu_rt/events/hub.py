"""In-process pub/sub by topic: the one place events fan out to connections.

Topics are ``generation:{id}`` (one generation's changes), ``user:{id}``
(every change of one user's generations) and ``queue`` (queue statistics for
operators). Two kinds of messages are published:

- stored events, handed over by the store after each commit
  (:meth:`Hub.publish_events`, registered as a store listener) or by the
  PostgreSQL bridge for commits of other instances. They carry the
  generation's ``seq``, which subscribers use to resume without gaps;
- ephemeral messages (:meth:`Hub.publish`), which are not stored and have no
  seq: queue statistics from the coordinator, for instance.

Publishing never awaits. Each message is encoded once per topic and the same
text is put into the bounded :class:`~nimu_rt.events.outbox.Outbox` of every
subscribed connection, whose own writer task sends it; one slow client can
therefore never delay the others. What a subscriber does with a message
(de-duplication by seq, catching up after a gap) lives in
:mod:`nimu_rt.events.subscriptions`.

The hub does not talk to other instances itself; the bridge
(:mod:`nimu_rt.events.bridge`) feeds it remote events and sets
:attr:`Hub.forward` to carry ephemeral messages out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from nimu_rt.events.frames import CLOSE_RESTART, EventFrame, encode_frame
from nimu_rt.events.outbox import Outbox
from nimu_rt.models import Event, EventType, utcnow

if TYPE_CHECKING:
    from nimu_rt.metrics import Metrics

log = logging.getLogger(__name__)

GENERATION_PREFIX = "generation:"
USER_PREFIX = "user:"
QUEUE_TOPIC = "queue"

# Stored event types whose newer message supersedes an older one still
# waiting in an outbox (latest wins). Status and other changes never drop.
COALESCING_TYPES = frozenset({EventType.PROGRESS, EventType.QUEUE})


def generation_topic(generation_id: str) -> str:
    """The topic of one generation's events."""
    return GENERATION_PREFIX + generation_id


def user_topic(user_id: str) -> str:
    """The topic of every generation of one user."""
    return USER_PREFIX + user_id


class Message:
    """One encoded frame on its way to the subscribers of ``topic``.

    ``key`` is set when a newer message may replace this one in an outbox;
    ``fields`` names the data members it sets, so a replacement that sets
    fewer members does not replace it. ``born`` (``time.perf_counter()``
    when it was made) measures fan-out latency up to the socket write.
    """

    __slots__ = ("topic", "text", "seq", "generation_id", "key", "fields", "born")

    def __init__(
        self,
        topic: str,
        text: str,
        *,
        seq: int | None,
        generation_id: str | None,
        key: Hashable | None,
        fields: frozenset[str],
    ) -> None:
        self.topic = topic
        self.text = text
        self.seq = seq
        self.generation_id = generation_id
        self.key = key
        self.fields = fields
        self.born = time.perf_counter()


def event_message(topic: str, event: Event) -> Message:
    """The frame of a stored event on ``topic``."""
    frame = EventFrame(
        topic=topic,
        generation_id=event.generation_id,
        seq=event.seq,
        type=event.type,
        data=event.data,
        at=event.at,
    )
    key = None
    if event.type in COALESCING_TYPES:
        key = (topic, event.generation_id, event.type)
    return Message(
        topic,
        encode_frame(frame),
        seq=event.seq,
        generation_id=event.generation_id,
        key=key,
        fields=frozenset(event.data),
    )


class Sink(Protocol):
    """What the hub hands messages to: one connection's subscription."""

    def offer(self, message: Message) -> None:
        """Take a message; must not block and must not raise."""

    def resync(self) -> None:
        """Messages may have been missed: catch up from the store."""


# Called with (topic, type, data, retain) for every local ephemeral message.
Forwarder = Callable[[str, str, Any, bool], None]


class Hub:
    """Topic registry and fan-out for one instance.

    It holds no history: subscribers catch up from the store. It keeps only
    the latest *retained* ephemeral message per topic and type (the queue
    statistics), which becomes the snapshot of a new ``queue`` subscriber.
    """

    def __init__(self) -> None:
        self._topics: dict[str, set[Sink]] = {}
        self._outboxes: set[Outbox] = set()
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self._retained: dict[str, dict[str, Any]] = {}
        # Set by the PostgreSQL bridge to carry ephemeral messages to the
        # other instances; None on a single instance.
        self.forward: Forwarder | None = None
        self.closed = False
        # Counts fanned-out messages when set (by Services).
        self.metrics: Metrics | None = None

    # -- subscribers ----------------------------------------------------------------

    def attach(self, topic: str, sink: Sink) -> None:
        """Start handing ``topic``'s messages to ``sink``."""
        self._topics.setdefault(topic, set()).add(sink)

    def detach(self, topic: str, sink: Sink) -> None:
        """Stop handing ``topic``'s messages to ``sink``; no error if absent."""
        sinks = self._topics.get(topic)
        if sinks is not None:
            sinks.discard(sink)
            if not sinks:
                del self._topics[topic]

    def register(self, outbox: Outbox) -> None:
        """Track a connection's outbox so that :meth:`close` can end it."""
        if self.closed:
            outbox.close(CLOSE_RESTART, "the server is shutting down")
        self._outboxes.add(outbox)

    def unregister(self, outbox: Outbox) -> None:
        self._outboxes.discard(outbox)

    def subscriber_count(self, topic: str) -> int:
        return len(self._topics.get(topic, ()))

    @property
    def connection_count(self) -> int:
        return len(self._outboxes)

    # -- publishing -----------------------------------------------------------------

    def publish_events(self, events: Iterable[Event]) -> None:
        """Fan stored events out to their generation and user topics.

        Registered as a store listener, so it runs after each commit of this
        instance; the bridge calls it for other instances' commits. Events
        of one generation must come in seq order for subscribers to take
        them without a store read; a gap makes them catch up from the store.
        """
        for event in events:
            for topic in (
                generation_topic(event.generation_id),
                user_topic(event.user_id),
            ):
                if topic in self._topics:
                    self._fan_out(topic, event_message(topic, event))
                    if self.metrics is not None:
                        self.metrics.published_stored.inc()
            for waiter in self._watchers.get(event.generation_id, ()):
                waiter.set()

    def publish(
        self, topic: str, type: str, data: Any, *, retain: bool = False
    ) -> None:
        """Send an ephemeral message to every subscriber of ``topic``.

        Use it for state that is not stored, e.g. the coordinator's queue
        statistics::

            hub.publish(QUEUE_TOPIC, "stats", {"queued": 3, "running": 2},
                        retain=True)

        ``data`` must be JSON-encodable (builtins or msgspec structs). The
        message has no seq and is not replayed on resume; a waiting message
        of the same topic and type is replaced by a newer one (latest wins).
        With ``retain`` the hub keeps the latest ``data`` per topic and type
        and gives it to new subscribers of the ``queue`` topic as their
        snapshot. With PostgreSQL it reaches every instance. It never
        blocks and does not raise for lack of subscribers.
        """
        self.deliver_ephemeral(topic, type, data, retain=retain)
        if self.forward is not None:
            self.forward(topic, type, data, retain)

    def deliver_ephemeral(
        self, topic: str, type: str, data: Any, *, retain: bool
    ) -> None:
        """Deliver an ephemeral message here only (the bridge's entry)."""
        if retain:
            self._retained.setdefault(topic, {})[type] = msgspec.to_builtins(data)
        if topic not in self._topics:
            return
        frame = EventFrame(
            topic=topic,
            generation_id=None,
            seq=None,
            type=type,
            data=data,
            at=utcnow(),
        )
        message = Message(
            topic,
            encode_frame(frame),
            seq=None,
            generation_id=None,
            key=(topic, None, type),
            fields=frozenset(),
        )
        self._fan_out(topic, message)
        if self.metrics is not None:
            self.metrics.published_ephemeral.inc()

    def retained(self, topic: str) -> dict[str, Any]:
        """The latest retained data of ``topic``, by message type."""
        return dict(self._retained.get(topic, {}))

    def _fan_out(self, topic: str, message: Message) -> None:
        # A copy: a sink may detach itself (or another) while taking it.
        for sink in list(self._topics.get(topic, ())):
            try:
                sink.offer(message)
            except Exception:
                # One broken subscriber must not cost the others the message.
                log.exception(
                    "subscriber failed to take a message",
                    extra={"action": "hub.offer", "topic": topic},
                )

    # -- waiting for a change (long-polling) ----------------------------------------

    @contextmanager
    def watch(self, generation_id: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``generation_id`` may have changed.

        Set by every published stored event of that generation, by a
        resync, and when the hub closes. The caller clears it, reads the
        store, and waits; it tells nothing about what changed.
        """
        waiter = asyncio.Event()
        waiters = self._watchers.setdefault(generation_id, set())
        waiters.add(waiter)
        if self.closed:
            waiter.set()
        try:
            yield waiter
        finally:
            waiters.discard(waiter)
            if not waiters:
                self._watchers.pop(generation_id, None)

    def waiting(self, generation_id: str) -> int:
        """How many long-polls wait for ``generation_id`` right now."""
        return len(self._watchers.get(generation_id, ()))

    # -- recovery and shutdown ------------------------------------------------------

    def resync_all(self) -> None:
        """Tell every subscriber that messages may have been missed.

        The bridge calls it after its LISTEN connection came back: each
        generation subscriber catches up from the store by seq, user and
        queue subscribers get a fresh snapshot, long-polls read again.
        """
        sinks = {sink for sinks in self._topics.values() for sink in sinks}
        log.info(
            "resynchronising %d subscriptions",
            len(sinks),
            extra={"action": "hub.resync"},
        )
        for sink in sinks:
            try:
                sink.resync()
            except Exception:
                log.exception(
                    "subscriber failed to resync", extra={"action": "hub.resync"}
                )
        for waiters in self._watchers.values():
            for waiter in waiters:
                waiter.set()

    def close(self) -> None:
        """Close every connection (1012: reconnect) and wake long-polls.

        Safe to call twice. Connections see their outbox closed and end
        themselves; this does not wait for them.
        """
        if self.closed:
            return
        self.closed = True
        for outbox in list(self._outboxes):
            outbox.close(CLOSE_RESTART, "the server is shutting down")
        for waiters in self._watchers.values():
            for waiter in waiters:
                waiter.set()
