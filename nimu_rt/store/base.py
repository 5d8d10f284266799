"""The store interface: the only place state lives.

Two implementations share it: :mod:`nimu_rt.store.postgres` (production and
clusters) and :mod:`nimu_rt.store.sqlite` (the embedded default). One contract
test suite runs against both.

All writes happen inside :meth:`Store.transaction`. A transaction changes a
generation with :meth:`Transaction.change`, which validates the lifecycle
action, bumps the generation's ``seq`` and appends the event that describes
the change, so a state change and its event are committed together or not at
all. Events are handed to the store's listeners only after the commit
succeeded; a listener never sees an event that was rolled back.
"""

from __future__ import annotations

import abc
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from nimu_rt.lifecycle import Action, Status, next_status
from nimu_rt.models import Event, EventType, Generation, Record, utcnow
from nimu_rt.storage.base import UploadState

log = logging.getLogger(__name__)

EventListener = Callable[[list[Event]], Awaitable[None] | None]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Python field name -> wire name, for building event data from a change.
_WIRE_NAMES = {f.name: f.encode_name for f in msgspec.structs.fields(Generation)}


class IdempotencyRecord(Record, kw_only=True):
    """A create request remembered under its ``Idempotency-Key``."""

    user_id: str
    key: str
    request_hash: str
    generation_id: str
    created_at: dt.datetime


class Job(Record, kw_only=True):
    """The queue's view of a confirmed generation.

    A generation has at most one job; ``retry`` re-queues the same job. While
    ``state`` is ``running`` the job is leased to one instance
    (``lease_owner``) until ``lease_expires_at``; ``lease_token`` grows with
    every lease, and every write of a running job checks it, so an actor
    whose lease was taken over can no longer change anything.
    """

    id: str
    generation_id: str
    user_id: str
    priority: int = 0
    # queued | running | finished
    state: str = "queued"
    # Earliest time the job may be dispatched (backoff after a retryable error).
    available_at: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    queued_at: dt.datetime | None = None
    dispatched_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    # completed | failed | cancelled, once finished
    outcome: str | None = None
    # The running phase: submitting | generating | uploading.
    phase: str | None = None
    phase_started_at: dt.datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    lease_token: int = 0
    # Set just before the paid submit call; with no operation_name after a
    # crash it means "maybe submitted", and the job must not submit again.
    submit_started_at: dt.datetime | None = None
    # The Veo 3 operation of this attempt, persisted before waiting on it.
    operation_name: str | None = None
    operation_started_at: dt.datetime | None = None
    # Multipart upload progress, so a restarted actor resumes the upload.
    upload: UploadState | None = None
    # Time spent running, summed over attempts, for queue statistics.
    run_seconds: float = 0.0


class Instance(Record, kw_only=True):
    """A running nimu-rt process, as it last reported itself."""

    id: str
    host: str
    pid: int
    version: str
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    concurrency: int
    draining: bool = False
    running: int = 0


class Migration(msgspec.Struct, frozen=True):
    """One versioned SQL file of a dialect."""

    version: int
    name: str
    sql: str


def load_migrations(dialect: str) -> list[Migration]:
    """The versioned SQL files of one dialect, oldest first."""
    found = []
    for path in sorted((MIGRATIONS_DIR / dialect).glob("*.sql")):
        number, _, rest = path.stem.partition("_")
        found.append(Migration(int(number), rest, path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"{dialect} migrations are not numbered 1..n: {versions}")
    return found


class Transaction(abc.ABC):
    """One atomic unit of writes. Obtain it from :meth:`Store.transaction`."""

    def __init__(self) -> None:
        # Events written in this transaction, published after commit.
        self.events: list[Event] = []

    # -- generations -----------------------------------------------------

    @abc.abstractmethod
    async def lock_generation(self, generation_id: str) -> Generation | None:
        """Read a generation and hold its row until the transaction ends."""

    @abc.abstractmethod
    async def insert_generation(self, generation: Generation) -> None: ...

    @abc.abstractmethod
    async def _write_generation(self, generation: Generation, prior_seq: int) -> bool:
        """Replace the stored row if its seq is still ``prior_seq``."""

    @abc.abstractmethod
    async def _insert_event(self, event: Event) -> None: ...

    async def create(self, generation: Generation) -> Generation:
        """Insert a new generation with its first event (``created``, seq 1)."""
        generation = msgspec.structs.replace(generation, seq=1)
        await self.insert_generation(generation)
        event = Event(
            generation_id=generation.id,
            user_id=generation.user_id,
            seq=1,
            type=EventType.CREATED,
            data=msgspec.to_builtins(generation),
            at=generation.created_at,
        )
        await self._insert_event(event)
        self.events.append(event)
        return generation

    async def change(
        self,
        generation: Generation,
        *,
        action: Action | None = None,
        event_type: str | None = None,
        extra: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Generation:
        """Write ``fields`` and the event describing them; return the new state.

        With ``action``, the status moves as the lifecycle table says (or
        :class:`~nimu_rt.errors.InvalidTransition` is raised and nothing is
        written) and the event is a ``status`` event carrying
        ``previousStatus``. ``extra`` adds members to the event data that are
        not generation fields (e.g. a reason). ``generation`` must have been
        read with :meth:`lock_generation` in this transaction.
        """
        if action is not None:
            fields["status"] = next_status(generation.status, action)
        now = utcnow()
        updated = msgspec.structs.replace(
            generation, **fields, seq=generation.seq + 1, updated_at=now
        )
        data = {_WIRE_NAMES[k]: msgspec.to_builtins(v) for k, v in fields.items()}
        if action is not None:
            data["previousStatus"] = str(generation.status)
        if extra:
            data.update(extra)
        if not await self._write_generation(updated, generation.seq):
            # Only reachable if a caller skipped lock_generation: another
            # writer got there first, and writing would lose its change.
            raise RuntimeError(f"generation {generation.id} changed under us")
        event = Event(
            generation_id=generation.id,
            user_id=generation.user_id,
            seq=updated.seq,
            type=event_type or (EventType.STATUS if action else EventType.UPDATED),
            data=data,
            at=now,
        )
        await self._insert_event(event)
        self.events.append(event)
        return updated

    # -- plain SQL ------------------------------------------------------------

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query written for PostgreSQL ($1 parameters).

        The SQLite store rewrites the few PostgreSQL-only spellings (numbered
        parameters, FOR UPDATE); queries shared by both stores keep to that.
        """

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""

    # -- idempotency and jobs ----------------------------------------------

    @abc.abstractmethod
    async def insert_idempotency(self, record: IdempotencyRecord) -> bool:
        """Remember a key; False if the user already used it."""

    @abc.abstractmethod
    async def get_idempotency(
        self, user_id: str, key: str
    ) -> IdempotencyRecord | None: ...

    async def upsert_job(self, job: Job) -> None:
        await self.execute(UPSERT_JOB, *job_row(job))

    async def get_job(self, generation_id: str) -> Job | None:
        rows = await self.fetch(
            "SELECT doc FROM jobs WHERE generation_id = $1", generation_id
        )
        return decode_job(rows[0][0]) if rows else None

    async def lock_pair(
        self, generation_id: str
    ) -> tuple[Generation | None, Job | None]:
        """A generation and its job, both locked: the generation row first.

        Every writer that needs both rows takes them through here, in this
        order, so two writers wait for each other instead of deadlocking.
        """
        generation = await self.lock_generation(generation_id)
        if generation is None:
            return None, None
        rows = await self.fetch(
            "SELECT doc FROM jobs WHERE generation_id = $1 FOR UPDATE", generation_id
        )
        return generation, decode_job(rows[0][0]) if rows else None

    async def lock_job(self, job_id: str) -> Job | None:
        """Read a job by id and hold its row until the transaction ends."""
        rows = await self.fetch("SELECT doc FROM jobs WHERE id = $1 FOR UPDATE", job_id)
        return decode_job(rows[0][0]) if rows else None

    async def lock_user(self, user_id: str) -> None:
        """Wait for, then hold until the end, the lock of ``user_id``.

        Serialises checks that read many rows of one user and no single row
        lock covers (the daily spend cap). Here it does nothing: SQLite's
        BEGIN IMMEDIATE already runs one writer at a time. Lock it after the
        generation row, as every caller does, so that no two orders meet.
        """


class Store(abc.ABC):
    """Where every generation, event and job is kept."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener`` with the events of every committed transaction."""
        self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        """Stop calling ``listener``; a listener never added is ignored."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect. Raises StoreUnavailable if the database cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; safe to call twice."""

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations; return the versions applied."""

    @abc.abstractmethod
    async def pending_migrations(self) -> list[int]: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless a round trip to the database works."""

    @abc.abstractmethod
    def _begin(self) -> Any:
        """An async context manager yielding a Transaction; commits on exit."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A transaction; its events reach the listeners after it commits."""
        async with self._begin() as tx:
            yield tx
        if tx.events:
            await self._publish(tx.events)

    async def _publish(self, events: list[Event]) -> None:
        for listener in self._listeners:
            try:
                result = listener(events)
                if result is not None:
                    await result
            except Exception:
                # The write is committed; a failing listener must not turn it
                # into an error for the caller. Subscribers resume from the
                # event log, so nothing is lost.
                log.exception("event listener failed", extra={"action": "publish"})

    # -- reads ---------------------------------------------------------------

    @abc.abstractmethod
    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a read-only query outside any transaction (see Transaction)."""

    @abc.abstractmethod
    async def execute(self, sql: str, *args: Any) -> int:
        """One statement in a transaction of its own; rows changed."""

    async def get_job_by_id(self, job_id: str) -> Job | None:
        rows = await self.fetch("SELECT doc FROM jobs WHERE id = $1", job_id)
        return decode_job(rows[0][0]) if rows else None

    @abc.abstractmethod
    async def get_generation(self, generation_id: str) -> Generation | None: ...

    @abc.abstractmethod
    async def list_generations(
        self,
        user_id: str,
        *,
        statuses: Iterable[Status] = (),
        before_id: str | None = None,
        limit: int = 20,
    ) -> list[Generation]:
        """The user's generations, newest first, older than ``before_id``."""

    @abc.abstractmethod
    async def events_after(
        self, generation_id: str, since_seq: int, limit: int = 1000
    ) -> list[Event]:
        """Events with ``seq > since_seq``, in order, at most ``limit``."""

    @abc.abstractmethod
    async def counts_by_status(self) -> dict[str, int]: ...


_job_decoder = msgspec.json.Decoder(Job)
_encode = msgspec.json.Encoder().encode


def decode_job(doc: str | bytes) -> Job:
    """A job from its stored JSON document."""
    return _job_decoder.decode(doc)


def as_utc(value: Any) -> dt.datetime | None:
    """A time column as an aware UTC datetime, whichever store returned it."""
    if value is None or isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC) if value else None
    return dt.datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


UPSERT_JOB = """
INSERT INTO jobs (id, generation_id, user_id, priority, state, available_at,
    created_at, updated_at, doc, queued_at, dispatched_at, finished_at, outcome,
    phase, lease_owner, lease_expires_at, lease_token, submit_started_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
    $18)
ON CONFLICT (id) DO UPDATE SET priority = excluded.priority,
    state = excluded.state, available_at = excluded.available_at,
    updated_at = excluded.updated_at, doc = excluded.doc,
    queued_at = excluded.queued_at, dispatched_at = excluded.dispatched_at,
    finished_at = excluded.finished_at, outcome = excluded.outcome,
    phase = excluded.phase, lease_owner = excluded.lease_owner,
    lease_expires_at = excluded.lease_expires_at,
    lease_token = excluded.lease_token,
    submit_started_at = excluded.submit_started_at
"""


def job_row(job: Job) -> tuple[Any, ...]:
    """The column values of a job, in UPSERT_JOB's order."""
    return (
        job.id,
        job.generation_id,
        job.user_id,
        job.priority,
        job.state,
        job.available_at,
        job.created_at,
        job.updated_at,
        _encode(job).decode(),
        job.queued_at,
        job.dispatched_at,
        job.finished_at,
        job.outcome,
        job.phase,
        job.lease_owner,
        job.lease_expires_at,
        job.lease_token,
        job.submit_started_at,
    )
