"""How the instances of a cluster talk: messages and coordinator election.

With SQLite there is one instance, which always coordinates and delivers its
messages to itself (:class:`LocalCluster`). With PostgreSQL
(:class:`PostgresCluster`) messages travel over LISTEN/NOTIFY on a channel
named after the schema, and the coordinator is whoever holds a session
advisory lock (keyed by the schema too, so separate deployments on one server
never contend). When the coordinating process dies its connection closes,
PostgreSQL releases the lock, and another instance takes it within
``queue.leader_retry_s``.

Messages are hints that make the cluster fast, not the source of truth: a
lost NOTIFY (a dropped connection, a restart) only delays work until the next
periodic scan, which reads the state from the tables.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import asyncpg
import msgspec

from nimu_rt.models import ErrorInfo

log = logging.getLogger(__name__)

ALL = "*"
LEADER = "leader"


class Dispatched(msgspec.Struct, tag="dispatched", kw_only=True):
    """A job was leased to the receiving instance: start its actor."""

    job_id: str


class Wake(msgspec.Struct, tag="wake", kw_only=True):
    """Something changed that the coordinator should look at."""

    reason: str = ""


class Command(msgspec.Struct, tag="command", kw_only=True):
    """A user's or operator's command for the actor of a running job."""

    command_id: str
    reply_to: str
    generation_id: str
    kind: Literal["cancel", "override"]
    status: str | None = None
    reason: str | None = None
    error: ErrorInfo | None = None


class Reply(msgspec.Struct, tag="reply", kw_only=True):
    """The outcome of a Command: None, or the problem document of its error."""

    command_id: str
    problem: dict[str, Any] | None = None


Message = Dispatched | Wake | Command | Reply


class Envelope(msgspec.Struct, kw_only=True):
    to: str
    sender: str
    message: Message


Handler = Callable[[Envelope], Awaitable[None]]
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Envelope).decode


class Cluster(abc.ABC):
    """Messages between instances, and who coordinates."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self._inbox: asyncio.Queue[Envelope] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self._handler: Handler | None = None

    async def start(self, handler: Handler) -> None:
        """Begin delivering messages addressed to this instance to ``handler``."""
        self._handler = handler
        self._pump = asyncio.create_task(self._deliver(), name="cluster-inbox")

    async def stop(self) -> None:
        """Stop delivering; safe to call twice."""
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def _deliver(self) -> None:
        assert self._handler is not None
        while True:
            envelope = await self._inbox.get()
            try:
                await self._handler(envelope)
            except Exception:
                # One bad message must not stop delivery of the next.
                log.exception(
                    "cluster message handler failed",
                    extra={"action": "cluster.deliver"},
                )

    def _accept(self, envelope: Envelope) -> None:
        """Queue an arriving envelope if it is meant for this instance."""
        if envelope.to in (ALL, self.instance_id) or (
            envelope.to == LEADER and self.is_leader
        ):
            self._inbox.put_nowait(envelope)

    @abc.abstractmethod
    async def send(self, to: str, message: Message) -> None:
        """Send to one instance id, to ``ALL``, or to the ``LEADER``."""

    @property
    @abc.abstractmethod
    def is_leader(self) -> bool: ...

    @abc.abstractmethod
    def leadership(self) -> Any:
        """An async context manager: waits until this instance coordinates.

        It yields an :class:`asyncio.Event` that is set if leadership is lost,
        and gives leadership up when the block ends.
        """


class LocalCluster(Cluster):
    """A cluster of one: the embedded default."""

    def __init__(self, instance_id: str) -> None:
        super().__init__(instance_id)
        self._leading = False

    async def send(self, to: str, message: Message) -> None:
        self._accept(Envelope(to=to, sender=self.instance_id, message=message))

    @property
    def is_leader(self) -> bool:
        return self._leading

    @asynccontextmanager
    async def leadership(self) -> AsyncIterator[asyncio.Event]:
        self._leading = True
        try:
            yield asyncio.Event()
        finally:
            self._leading = False


def _lock_key(schema: str) -> int:
    digest = hashlib.blake2b(f"nimu-rt:coordinator:{schema}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


class PostgresCluster(Cluster):
    """Instances sharing one PostgreSQL schema."""

    def __init__(
        self,
        instance_id: str,
        *,
        connect_kwargs: dict[str, Any],
        schema: str,
        pool: Callable[[], asyncpg.Pool],
        retry_s: float,
    ) -> None:
        super().__init__(instance_id)
        self._connect_kwargs = connect_kwargs
        self.channel = f"nimu_cluster_{schema}"
        self._lock_key = _lock_key(schema)
        self._pool = pool
        self._retry_s = retry_s
        self._listener: asyncio.Task[None] | None = None
        self._leading = False

    async def start(self, handler: Handler) -> None:
        await super().start(handler)
        connected = asyncio.Event()
        self._listener = asyncio.create_task(
            self._listen(connected), name="cluster-listen"
        )
        # Wait for the first LISTEN so that nothing sent after start() is
        # missed; a failure here surfaces as StoreUnavailable from start.
        done, _ = await asyncio.wait(
            {asyncio.ensure_future(connected.wait()), self._listener},
            timeout=self._connect_kwargs.get("timeout", 10),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if self._listener in done:
            self._listener.result()

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        await super().stop()

    async def _listen(self, connected: asyncio.Event) -> None:
        """Keep one LISTEN connection open, reconnecting when it drops."""
        while True:
            lost = asyncio.Event()
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(**self._connect_kwargs)
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._on_notify)
                if connected.is_set():
                    # Messages may have been lost while disconnected: look
                    # at the tables again.
                    self._inbox.put_nowait(
                        Envelope(
                            to=self.instance_id,
                            sender=self.instance_id,
                            message=Wake(reason="reconnected"),
                        )
                    )
                connected.set()
                await self._watch(conn, lost)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning(
                    "cluster channel lost: %s; reconnecting",
                    exc,
                    extra={"action": "cluster.reconnect"},
                )
            finally:
                if conn is not None and not conn.is_closed():
                    await conn.close(timeout=self._retry_s)
            await asyncio.sleep(self._retry_s)

    async def _watch(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        # A connection can die without a termination callback (a silent
        # network drop), so it is also probed now and then.
        while not lost.is_set():
            try:
                async with asyncio.timeout(self._retry_s * 5):
                    await conn.fetchval("SELECT 1")
            except TimeoutError as exc:
                raise OSError("the LISTEN connection stopped answering") from exc
            try:
                async with asyncio.timeout(self._retry_s * 5):
                    await lost.wait()
            except TimeoutError:
                continue

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            envelope = _decode(payload)
        except msgspec.DecodeError:
            log.warning("unreadable cluster message", extra={"action": "cluster.drop"})
            return
        self._accept(envelope)

    async def send(self, to: str, message: Message) -> None:
        payload = _encode(Envelope(to=to, sender=self.instance_id, message=message))
        await self._pool().execute(
            "SELECT pg_notify($1, $2)", self.channel, payload.decode()
        )

    @property
    def is_leader(self) -> bool:
        return self._leading

    @asynccontextmanager
    async def leadership(self) -> AsyncIterator[asyncio.Event]:
        conn = await self._acquire_lock()
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        watcher = asyncio.create_task(self._hold(conn, lost), name="leader-lock")
        self._leading = True
        log.info(
            "instance %s coordinates the queue",
            self.instance_id,
            extra={"action": "cluster.lead", "instance_id": self.instance_id},
        )
        try:
            yield lost
        finally:
            self._leading = False
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            # Closing the session releases the lock.
            try:
                await conn.close(timeout=self._retry_s)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                conn.terminate()

    async def _acquire_lock(self) -> asyncpg.Connection:
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(**self._connect_kwargs)
                while True:
                    got = await conn.fetchval(
                        "SELECT pg_try_advisory_lock($1)", self._lock_key
                    )
                    if got:
                        return conn
                    await asyncio.sleep(self._retry_s)
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning(
                    "cannot contend for coordination: %s",
                    exc,
                    extra={"action": "cluster.lock"},
                )
                if conn is not None:
                    conn.terminate()
                await asyncio.sleep(self._retry_s)
            except BaseException:
                # Cancelled while waiting its turn (the instance stops).
                if conn is not None:
                    conn.terminate()
                raise

    async def _hold(self, conn: asyncpg.Connection, lost: asyncio.Event) -> None:
        # If the lock's connection stops answering we must assume another
        # instance may take over, and stop coordinating.
        try:
            while not lost.is_set():
                async with asyncio.timeout(self._retry_s * 3):
                    await conn.fetchval("SELECT 1")
                await asyncio.sleep(self._retry_s)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            lost.set()
