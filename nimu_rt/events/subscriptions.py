"""One connection's subscription to one topic, and how it never misses a seq.

A subscription attaches to the hub *before* it reads the store, and holds the
live messages that arrive while it reads. Once the snapshot or the history is
queued, it releases the held messages, dropping those whose seq it already
sent. No await separates the two steps, so nothing can slip between them:

1. attach to the hub; live messages are now held;
2. read the snapshot (and, to resume, the events after ``sinceSeq``);
3. queue those frames, then the held messages with a larger seq.

Live, a generation subscription takes a message only if its seq is the next
one. A smaller seq is a duplicate (the same event came through the store
listener and the bridge, or through history and live) and is dropped. A
larger one means messages were missed (a notification read by reference
overtaken by a later one, or one lost while the bridge reconnected): the
subscription holds it and catches up from the store, as above.

Resuming replays at most ``history_replay_limit`` events. When the log no
longer starts right after ``sinceSeq`` (pruned) or the gap is longer, the
client gets a ``reset`` with a fresh snapshot instead: never a partial
replay.
"""

from __future__ import annotations

import asyncio
import logging

from nimu_rt.auth import Principal
from nimu_rt.errors import NimuError, NotFound
from nimu_rt.events.frames import (
    CLOSE_INTERNAL,
    CLOSE_RESYNC_FAILED,
    CLOSE_SLOW,
    Error,
    FrameError,
    Reset,
    ServerFrame,
    Subscribed,
    encode_frame,
)
from nimu_rt.events.hub import (
    GENERATION_PREFIX,
    QUEUE_TOPIC,
    USER_PREFIX,
    Hub,
    Message,
    event_message,
)
from nimu_rt.events.outbox import Outbox
from nimu_rt.ids import is_id
from nimu_rt.models import Event, Generation
from nimu_rt.store import Store

log = logging.getLogger(__name__)


class Context:
    """What every subscription of one connection shares."""

    def __init__(
        self,
        *,
        hub: Hub,
        store: Store,
        outbox: Outbox,
        principal: Principal,
        replay_limit: int,
        user_snapshot_size: int,
        send_timeout_s: float,
        conn_id: str,
    ) -> None:
        self.hub = hub
        self.store = store
        self.outbox = outbox
        self.principal = principal
        self.replay_limit = replay_limit
        self.user_snapshot_size = user_snapshot_size
        self.send_timeout_s = send_timeout_s
        self.conn_id = conn_id


class Subscription:
    """Base: a topic delivered to one connection's outbox.

    Subclasses say how to (re)build the subscriber's state (:meth:`_rebuild`)
    and which live messages to take (:meth:`_take`). While a rebuild runs,
    live messages are held (at most the outbox's capacity, beyond which the
    connection is closed as too slow) and replayed through :meth:`_take`
    afterwards.
    """

    def __init__(self, topic: str, ctx: Context) -> None:
        self.topic = topic
        self.ctx = ctx
        # Live messages held while a rebuild runs; None when live.
        self._held: list[Message] | None = []
        self._task: asyncio.Task[None] | None = None
        self._again = False
        self._closed = False

    async def start(self, since_seq: int | None) -> None:
        """Attach, send the first frames, go live.

        Raises :class:`FrameError` or :class:`~nimu_rt.errors.NimuError`
        (e.g. NotFound) when the topic cannot be subscribed; the
        subscription is then detached again.
        """
        self.ctx.hub.attach(self.topic, self)
        try:
            await self._rebuild(since_seq, first=True)
        except BaseException:
            self.ctx.hub.detach(self.topic, self)
            raise
        self._go_live()

    # -- live messages --------------------------------------------------------------

    def offer(self, message: Message) -> None:
        if self._closed:
            return
        if self._held is not None:
            self._held.append(message)
            if len(self._held) > self.ctx.outbox.capacity:
                self.ctx.outbox.close(CLOSE_SLOW, "too slow: held messages overflowed")
            return
        self._take(message)

    def _take(self, message: Message) -> None:
        self._put(message)

    def _put(self, message: Message) -> None:
        self.ctx.outbox.put(message.text, message.key, message.fields, message.born)

    def _put_frame(self, frame: ServerFrame) -> None:
        self.ctx.outbox.put(encode_frame(frame))

    # -- catching up ----------------------------------------------------------------

    def resync(self) -> None:
        """Rebuild from the store; messages may have been missed."""
        if self._closed:
            return
        if self._held is not None:
            # A rebuild is running, and its reads may predate what was
            # missed: run another one after it.
            self._again = True
            return
        self._held = []
        self._spawn_rebuild()

    def _gap(self, message: Message) -> None:
        """``message`` is ahead of what was sent: hold it and catch up."""
        self._held = [message]
        self._spawn_rebuild()

    def _spawn_rebuild(self) -> None:
        self._task = asyncio.create_task(self._rebuild_in_background())

    async def _rebuild_in_background(self) -> None:
        try:
            await self._rebuild(self._resume_point(), first=False)
        except asyncio.CancelledError:
            raise
        except NotFound as exc:
            # The generation is gone (or no longer the caller's).
            self._put_frame(Error(code=exc.code, message=exc.detail, topic=self.topic))
            self.close_now()
            return
        except (NimuError, TimeoutError) as exc:
            log.warning(
                "catching up %s failed: %s",
                self.topic,
                exc,
                extra={"action": "ws.resync_failed", "conn_id": self.ctx.conn_id},
            )
            self.ctx.outbox.close(CLOSE_RESYNC_FAILED, "could not catch up; resume")
            return
        except Exception:
            log.exception(
                "catching up %s failed",
                self.topic,
                extra={"action": "ws.resync_failed", "conn_id": self.ctx.conn_id},
            )
            self.ctx.outbox.close(CLOSE_INTERNAL, "internal error; resume")
            return
        self._go_live()

    def _go_live(self) -> None:
        # Runs right after the rebuild queued its frames, with no await in
        # between: held messages follow them in order.
        if self._again:
            self._again = False
            self._spawn_rebuild()
            return
        held, self._held = self._held or [], None
        for message in held:
            self.offer(message)

    async def _queue_frames(self, frames: list[ServerFrame | Message]) -> None:
        """Wait for room for ``frames``, then queue them (bounded wait).

        Replayed events come as hub messages. They are queued without their
        coalescing key: a replay is complete, every seq in order; only live
        updates waiting for a slow reader are superseded.
        """
        outbox = self.ctx.outbox
        try:
            async with asyncio.timeout(self.ctx.send_timeout_s):
                await outbox.wait_for_room(len(frames))
        except TimeoutError:
            outbox.close(CLOSE_SLOW, "too slow to take the replay")
            return
        for frame in frames:
            if isinstance(frame, Message):
                outbox.put(frame.text)
            else:
                self._put_frame(frame)

    def _resume_point(self) -> int | None:
        return None

    async def _rebuild(self, since_seq: int | None, *, first: bool) -> None:
        raise NotImplementedError

    # -- ending ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close_now(self) -> None:
        """Detach and stop taking messages; a running rebuild is cancelled."""
        self._closed = True
        self.ctx.hub.detach(self.topic, self)
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

    async def close(self) -> None:
        """Detach and wait for a running rebuild to end; safe twice."""
        self.close_now()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)


class GenerationSubscription(Subscription):
    """``generation:{id}``: the snapshot, then every event in seq order.

    The subscriber may see a generation it owns; operators may see any. One
    it may not see is reported exactly like one that does not exist.
    """

    def __init__(self, topic: str, generation_id: str, ctx: Context) -> None:
        super().__init__(topic, ctx)
        self.generation_id = generation_id
        # The seq of the last event queued (or of the snapshot).
        self.last_seq = 0

    def _resume_point(self) -> int | None:
        return self.last_seq

    def _take(self, message: Message) -> None:
        if message.seq is None:
            self._put(message)
        elif message.seq <= self.last_seq:
            return
        elif message.seq > self.last_seq + 1:
            self._gap(message)
        else:
            self.last_seq = message.seq
            self._put(message)

    async def _rebuild(self, since_seq: int | None, *, first: bool) -> None:
        ctx = self.ctx
        generation = await ctx.store.get_generation(self.generation_id)
        if generation is None or not ctx.principal.may_access(generation.user_id):
            raise NotFound(f"no generation {self.generation_id}")
        frames: list[ServerFrame | Message]
        if since_seq is None:
            frames = [
                Subscribed(topic=self.topic, snapshot=generation, seq=generation.seq)
            ]
            last = generation.seq
        else:
            events = await ctx.store.events_after(
                self.generation_id, since_seq, ctx.replay_limit + 1
            )
            if _resumable(since_seq, events, generation, ctx.replay_limit):
                frames = []
                if first:
                    frames.append(
                        Subscribed(topic=self.topic, snapshot=None, seq=since_seq)
                    )
                frames += [event_message(self.topic, e) for e in events]
                last = events[-1].seq if events else since_seq
            else:
                frames = [
                    Reset(topic=self.topic, snapshot=generation, seq=generation.seq)
                ]
                last = generation.seq
        await self._queue_frames(frames)
        self.last_seq = last


def _resumable(
    since_seq: int, events: list[Event], generation: Generation, limit: int
) -> bool:
    """Whether replaying ``events`` brings a client at ``since_seq`` up to date.

    Not when the log no longer starts right after ``since_seq`` (pruned),
    when more than ``limit`` events are missing, or when the client claims a
    seq the generation never reached. In doubt, a reset is always correct.
    """
    if not events:
        return since_seq == generation.seq
    return events[0].seq == since_seq + 1 and len(events) <= limit


class UserSubscription(Subscription):
    """``user:{id}``: the user's recent generations, then all their events.

    The snapshot is ``{"generations": [...]}``, the newest
    ``realtime.user_snapshot_size`` generations, each with its own seq. A
    user topic spans many generations, so ``sinceSeq`` does not apply to it:
    after a reconnect a client subscribes afresh and takes the new snapshot.
    Events carry ``generationId`` and that generation's ``seq``; duplicates
    are dropped per generation, and a gap in a generation of the snapshot
    brings a ``reset`` with a fresh snapshot. Only the user and operators
    may subscribe.
    """

    def __init__(self, topic: str, user_id: str, ctx: Context) -> None:
        super().__init__(topic, ctx)
        self.user_id = user_id
        self._seen: dict[str, int] = {}

    def _take(self, message: Message) -> None:
        gid = message.generation_id
        if gid is None or message.seq is None:
            self._put(message)
            return
        last = self._seen.get(gid)
        if last is not None:
            if message.seq <= last:
                return
            if message.seq > last + 1:
                self._gap(message)
                return
        self._seen[gid] = message.seq
        self._put(message)

    async def _rebuild(self, since_seq: int | None, *, first: bool) -> None:
        generations = await self.ctx.store.list_generations(
            self.user_id, limit=self.ctx.user_snapshot_size
        )
        snapshot = {"generations": generations}
        frame: ServerFrame
        if first:
            frame = Subscribed(topic=self.topic, snapshot=snapshot, seq=None)
        else:
            frame = Reset(topic=self.topic, snapshot=snapshot, seq=None)
        await self._queue_frames([frame])
        self._seen = {g.id: g.seq for g in generations}


class QueueSubscription(Subscription):
    """``queue``: the coordinator's ephemeral queue messages (operators only).

    The snapshot is the latest retained message of each type, e.g.
    ``{"stats": {...}}``; there is no history and no ``sinceSeq``.
    """

    async def _rebuild(self, since_seq: int | None, *, first: bool) -> None:
        snapshot = self.ctx.hub.retained(self.topic)
        frame: ServerFrame
        if first:
            frame = Subscribed(topic=self.topic, snapshot=snapshot, seq=None)
        else:
            frame = Reset(topic=self.topic, snapshot=snapshot, seq=None)
        await self._queue_frames([frame])


def open_subscription(
    topic: str, since_seq: int | None, ctx: Context
) -> Subscription:
    """The subscription ``topic`` names, if the caller may have it.

    Raises :class:`FrameError` ``bad_topic`` for a name that is not a topic,
    ``resume_unsupported`` for ``sinceSeq`` on a user or queue topic, and
    :class:`~nimu_rt.errors.NotFound` for a topic the caller may not see
    (worded as if it did not exist). It does not attach or read anything.
    """
    principal = ctx.principal
    if topic.startswith(GENERATION_PREFIX):
        generation_id = topic[len(GENERATION_PREFIX) :]
        if not is_id(generation_id):
            raise FrameError("bad_topic", "generation topics are generation:<id>")
        return GenerationSubscription(topic, generation_id, ctx)
    if since_seq is not None and (
        topic == QUEUE_TOPIC or topic.startswith(USER_PREFIX)
    ):
        raise FrameError(
            "resume_unsupported",
            "sinceSeq applies to generation topics only; subscribe without it",
        )
    if topic.startswith(USER_PREFIX):
        user_id = topic[len(USER_PREFIX) :]
        if not principal.may_access(user_id):
            raise NotFound(f"no topic {topic}")
        return UserSubscription(topic, user_id, ctx)
    if topic == QUEUE_TOPIC:
        if not principal.is_operator:
            raise NotFound(f"no topic {topic}")
        return QueueSubscription(topic, ctx)
    raise FrameError(
        "bad_topic", "topics are generation:<id>, user:<id> or queue"
    )
