"""The queue coordinator: which queued job runs next, where, and when.

Exactly one instance coordinates at a time (see :mod:`.cluster`). A pass
(:meth:`QueueCoordinator.schedule`):

1. takes back jobs whose lease expired (their instance died or stalled) and
   leases them to a live instance, which resumes them from their persisted
   state;
2. unless the queue is paused, dispatches queued jobs in order — priority,
   then fairness between users, then age (see :mod:`.queries`) — while the
   global limits allow: concurrent Veo 3 operations, submissions per minute,
   and each instance's concurrency;
3. publishes queue positions and estimated start times of the jobs still
   waiting, throttled per job.

Passes run when something happened (a job was queued, a slot was freed: the
:meth:`wake` calls), when a backoff or rate-limit window ends, and every
``queue.tick_s`` as a safety net. Dispatch on an idle queue therefore takes
milliseconds, not a polling interval.

Dispatching writes the job's lease and the generation's move to
``submitting`` in one transaction that first re-checks, with the rows locked,
that the job is still queued: a job cancelled a moment earlier, or
dispatched by a coordinator that did not yet know it lost its role, is never
dispatched twice.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import logging
import math
from collections.abc import Awaitable, Callable

import msgspec

from nimu_rt.config import Settings
from nimu_rt.jobs import queries
from nimu_rt.lifecycle import PROGRESS_SUBMITTING, Action, Status
from nimu_rt.models import EventType, utcnow
from nimu_rt.store.base import Instance, Job, Store

log = logging.getLogger(__name__)

# Names in the queue_controls table.
PAUSED = "paused"
COORDINATOR = "coordinator"
RATE_WINDOW = dt.timedelta(minutes=1)
# Phases that hold a Veo 3 operation (uploading only downloads the result).
OPERATION_PHASES = frozenset({"submitting", "generating"})

# Tells an instance (perhaps this one) that a job was leased to it.
Deliver = Callable[[str, Job], Awaitable[None]]


class QueueCoordinator:
    """Schedules queued jobs onto instances within the global limits."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        deliver: Deliver,
        instance_id: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.deliver = deliver
        self.instance_id = instance_id
        self._wake = asyncio.Event()
        # Dispatch times of new submissions in the last minute (rate limit).
        self._recent: collections.deque[dt.datetime] = collections.deque()
        # generation id -> (position, time it was last published)
        self._published: dict[str, tuple[int | None, dt.datetime]] = {}
        self._mean_cache: tuple[float, dt.datetime] | None = None
        self.passes = 0

    def wake(self, reason: str = "") -> None:
        """Ask for a pass soon; cheap, callable from anywhere in the loop."""
        self._wake.set()

    async def run(self, lost: asyncio.Event) -> None:
        """Coordinate until cancelled or until leadership is ``lost``."""
        queue = self.settings.queue
        async with self.store.transaction() as tx:
            await queries.set_control(tx, COORDINATOR, self.instance_id)
        # A new coordinator does not know what its predecessor dispatched in
        # the last minute; the table does.
        self._recent = collections.deque(
            await queries.dispatched_since(self.store, utcnow() - RATE_WINDOW)
        )
        while not lost.is_set():
            self._wake.clear()
            try:
                next_in = await self.schedule()
            except Exception:
                # A pass that fails (the store went away) is retried on the
                # next tick; coordination itself must not die.
                log.exception("queue pass failed", extra={"action": "queue.pass"})
                next_in = queue.tick_s
            timeout = queue.tick_s if next_in is None else min(queue.tick_s, next_in)
            waiter = asyncio.ensure_future(self._wake.wait())
            loser = asyncio.ensure_future(lost.wait())
            try:
                await asyncio.wait(
                    {waiter, loser}, timeout=max(timeout, 0.0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waiter.cancel()
                loser.cancel()

    # -- one pass -------------------------------------------------------------------

    async def schedule(self) -> float | None:
        """One pass; returns seconds until a timer-driven pass is due, if any."""
        self.passes += 1
        now = utcnow()
        queue = self.settings.queue
        instances = await self._live_instances(now)
        running = await queries.running_jobs(self.store)
        load = collections.Counter(j.lease_owner for j in running)

        # 1. Expired leases go to live instances.
        for job in running:
            if job.lease_expires_at is not None and job.lease_expires_at < now:
                target = self._pick_instance(instances, load)
                if target is not None and await self._lease(job, target, now, True):
                    load[job.lease_owner] -= 1
                    load[target.id] += 1

        # 2. Dispatch, within the limits.
        while self._recent and self._recent[0] < now - RATE_WINDOW:
            self._recent.popleft()
        operations = sum(1 for j in running if j.phase in OPERATION_PHASES)
        waiting = await queries.candidates(self.store, queue.positions_published_max)
        paused = await queries.get_control(self.store, PAUSED) == "true"
        next_in: float | None = None
        dispatched: set[str] = set()
        if not paused:
            for job in waiting:
                if job.available_at > now:
                    wait = (job.available_at - now).total_seconds()
                    next_in = wait if next_in is None else min(next_in, wait)
                    continue
                submits = job.operation_name is None
                if operations >= queue.max_concurrent_operations:
                    break
                if submits and len(self._recent) >= queue.submissions_per_minute:
                    opens = (self._recent[0] + RATE_WINDOW - now).total_seconds()
                    next_in = opens if next_in is None else min(next_in, opens)
                    break
                target = self._pick_instance(instances, load)
                if target is None:
                    break
                if await self._lease(job, target, now, False):
                    dispatched.add(job.id)
                    load[target.id] += 1
                    operations += 1
                    if submits:
                        self._recent.append(now)

        # 3. Positions of the jobs still waiting.
        still = [j for j in waiting if j.id not in dispatched]
        await self._publish_positions(still, instances, paused, now)
        return next_in

    async def _live_instances(self, now: dt.datetime) -> list[Instance]:
        cutoff = now - dt.timedelta(seconds=self.settings.queue.instance_timeout_s)
        return [
            i
            for i in await queries.list_instances(self.store)
            if i.heartbeat_at >= cutoff and not i.draining
        ]

    @staticmethod
    def _pick_instance(
        instances: list[Instance], load: collections.Counter[str | None]
    ) -> Instance | None:
        """The live instance with the most free slots, if any has one."""
        best, best_free = None, 0
        for instance in instances:
            free = instance.concurrency - load[instance.id]
            if free > best_free:
                best, best_free = instance, free
        return best

    async def _lease(
        self, job: Job, target: Instance, now: dt.datetime, takeover: bool
    ) -> bool:
        """Lease ``job`` to ``target``; False if it changed in the meantime."""
        lease = dt.timedelta(seconds=self.settings.queue.lease_s)
        async with self.store.transaction() as tx:
            generation = await tx.lock_generation(job.generation_id)
            current = await tx.lock_job(job.id)
            if generation is None or current is None:
                return False
            if takeover:
                if current.state != "running" or current.lease_expires_at is None:
                    return False
                if current.lease_expires_at >= now:
                    return False  # renewed meanwhile: its owner is alive
                leased = msgspec.structs.replace(
                    current,
                    lease_owner=target.id,
                    lease_expires_at=now + lease,
                    lease_token=current.lease_token + 1,
                    updated_at=now,
                )
                await tx.upsert_job(leased)
            else:
                if current.state != "queued" or generation.status is not Status.QUEUED:
                    return False
                leased = msgspec.structs.replace(
                    current,
                    state="running",
                    phase="submitting",
                    phase_started_at=now,
                    dispatched_at=now,
                    lease_owner=target.id,
                    lease_expires_at=now + lease,
                    lease_token=current.lease_token + 1,
                    updated_at=now,
                )
                await tx.upsert_job(leased)
                await tx.change(
                    generation,
                    action=Action.DISPATCH,
                    attempts=generation.attempts + 1,
                    progress=PROGRESS_SUBMITTING,
                    queue_position=None,
                    estimated_start_at=None,
                )
        self._published.pop(job.generation_id, None)
        log.info(
            "%s job to %s",
            "took over" if takeover else "dispatched",
            target.id,
            extra={
                "action": "queue.takeover" if takeover else "queue.dispatch",
                "job_id": job.id,
                "generation_id": job.generation_id,
                "instance_id": target.id,
            },
        )
        await self.deliver(target.id, leased)
        return True

    async def _publish_positions(
        self,
        waiting: list[Job],
        instances: list[Instance],
        paused: bool,
        now: dt.datetime,
    ) -> None:
        """Store position events for waiting jobs whose position changed.

        The estimate assumes the head of the queue starts as slots free up,
        each slot taking the recent mean run time; it is a hint for people,
        not a promise.
        """
        queue = self.settings.queue
        interval = dt.timedelta(seconds=queue.position_interval_s)
        slots = max(
            1,
            min(
                queue.max_concurrent_operations,
                sum(i.concurrency for i in instances) or 1,
            ),
        )
        run_s = await self._mean_run_s(now)
        changes: list[tuple[Job, int, dt.datetime | None]] = []
        keep = set()
        for position, job in enumerate(waiting, start=1):
            keep.add(job.generation_id)
            last = self._published.get(job.generation_id)
            if last is not None and (last[0] == position or now - last[1] < interval):
                continue
            start_in = math.floor((position - 1) / slots) * run_s
            available = (job.available_at - now).total_seconds()
            estimate = None
            if not paused:
                estimate = now + dt.timedelta(seconds=max(start_in, available, 0.0))
            changes.append((job, position, estimate))
        for gone in set(self._published) - keep:
            del self._published[gone]
        if not changes:
            return
        # One transaction for the batch: a dispatch shifts every position.
        async with self.store.transaction() as tx:
            for job, position, estimate in changes:
                generation = await tx.lock_generation(job.generation_id)
                if generation is None or generation.status is not Status.QUEUED:
                    continue
                if generation.queue_position != position or (
                    (generation.estimated_start_at is None) != (estimate is None)
                ):
                    await tx.change(
                        generation,
                        event_type=EventType.QUEUE,
                        queue_position=position,
                        estimated_start_at=estimate,
                    )
                self._published[job.generation_id] = (position, now)

    async def _mean_run_s(self, now: dt.datetime) -> float:
        """Mean run time of jobs completed in the last hour, cached a while."""
        cached = self._mean_cache
        if cached is not None and now - cached[1] < dt.timedelta(seconds=10):
            return cached[0]
        finished = await queries.finished_since(self.store, now - dt.timedelta(hours=1))
        runs = [j.run_seconds for j in finished if j.outcome == "completed"]
        mean = sum(runs) / len(runs) if runs else self.settings.queue.typical_run_s
        self._mean_cache = (mean, now)
        return mean
