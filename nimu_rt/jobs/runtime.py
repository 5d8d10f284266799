"""This instance's part in running jobs.

:class:`JobRuntime` owns the instance's job actors and its background work:

- a heartbeat that records the instance as alive, renews the leases of its
  jobs, starts actors for jobs leased to it (a missed message is caught here)
  and stops actors whose lease went elsewhere;
- the contest for coordination, and while it holds it, the
  :class:`~nimu_rt.jobs.coordinator.QueueCoordinator` and maintenance;
- routing of cancel and status overrides to the actor that runs the job,
  wherever the request arrived (it implements
  :class:`nimu_rt.generations.JobCommands`).

Shutdown is graceful for the cluster, not for the job: actors stop without
changing their jobs and the leases are released at once, so another instance
resumes them from their persisted state without waiting for expiry.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
from collections.abc import Awaitable
from typing import Any, Literal, TypeVar

import msgspec

from nimu_rt import __version__
from nimu_rt.config import Settings
from nimu_rt.errors import NimuError, NotFound, Unavailable
from nimu_rt.ids import new_id
from nimu_rt.jobs import queries
from nimu_rt.jobs.actor import (
    ActorCommand,
    ActorContext,
    ActorGone,
    JobActor,
)
from nimu_rt.jobs.cluster import (
    LEADER,
    Cluster,
    Command,
    Dispatched,
    Envelope,
    LocalCluster,
    PostgresCluster,
    Reply,
    Wake,
)
from nimu_rt.jobs.commands import Intent, apply_command
from nimu_rt.jobs.coordinator import QueueCoordinator
from nimu_rt.jobs.maintenance import Maintenance
from nimu_rt.lifecycle import RUNNING, Action, Status, action_for, next_status
from nimu_rt.models import ErrorInfo, Event, EventType, Generation, utcnow
from nimu_rt.storage.base import Storage
from nimu_rt.store.base import Instance, Job, Store
from nimu_rt.veo3.client import Veo3Client

log = logging.getLogger(__name__)
T = TypeVar("T")

# Statuses after which the coordinator may have something to do: a job
# joined the queue, or a slot was freed.
_WAKING = frozenset({"queued", "uploading", "completed", "failed", "cancelled"})


class JobRuntime:
    """Actors, heartbeat, coordination and commands of one instance."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        veo3: Veo3Client,
        storage: Storage,
        instance_id: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.instance_id = instance_id
        self.cluster = _make_cluster(settings, store, instance_id)
        self.coordinator = QueueCoordinator(
            settings, store, self._deliver, instance_id
        )
        self.maintenance = Maintenance(settings, store, storage)
        self.actors: dict[str, JobActor] = {}
        self.ctx = ActorContext(
            settings=settings,
            store=store,
            veo3=veo3,
            storage=storage,
            instance_id=instance_id,
            on_exit=self._actor_exited,
        )
        self._replies: dict[str, asyncio.Future[Reply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started_at = utcnow()
        self._running = False

    # -- lifetime -----------------------------------------------------------------

    async def start(self) -> None:
        await self._heartbeat_once()
        await self.cluster.start(self._on_message)
        self.store.add_listener(self._on_events)
        self._running = True
        self._tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="job-heartbeat"),
            asyncio.create_task(self._lead_loop(), name="job-coordination"),
        ]

    async def stop(self) -> None:
        """Hand this instance's jobs back to the cluster; safe to call twice.

        Each step is attempted even when the store is already gone, so that
        no task or connection outlives the instance.
        """
        if not self._running:
            return
        self._running = False
        await self._quietly(
            queries.update_instance(self.store, self.instance_id, draining=True)
        )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        actors = list(self.actors.values())
        await asyncio.gather(*(a.stop() for a in actors), return_exceptions=True)
        try:
            if await self._quietly(self._release_leases()):
                await self._send_quietly(LEADER, Wake(reason="instance stopping"))
        finally:
            await self.cluster.stop()
        await self._quietly(
            self.store.execute("DELETE FROM instances WHERE id = $1", self.instance_id)
        )

    async def _quietly(self, work: Awaitable[T]) -> T | None:
        """Shutdown work that may fail because the store is already gone."""
        try:
            return await work
        except NimuError as exc:
            log.warning("while stopping: %s", exc, extra={"action": "instance.stop"})
            return None

    async def _release_leases(self) -> int:
        now = utcnow()
        released = 0
        for job in await queries.jobs_leased_to(self.store, self.instance_id):
            async with self.store.transaction() as tx:
                await tx.lock_generation(job.generation_id)
                current = await tx.lock_job(job.id)
                if current is None or current.lease_owner != self.instance_id:
                    continue
                await tx.upsert_job(
                    msgspec.structs.replace(current, lease_expires_at=now)
                )
                released += 1
        return released

    # -- heartbeat and leases ---------------------------------------------------------

    @property
    def heartbeat_s(self) -> float:
        queue = self.settings.queue
        return min(queue.lease_s, queue.instance_timeout_s) / 3

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._heartbeat_once()
            except NimuError as exc:
                log.warning("heartbeat failed: %s", exc,
                            extra={"action": "instance.heartbeat"})

    async def _heartbeat_once(self) -> None:
        now = utcnow()
        await queries.register_instance(
            self.store,
            Instance(
                id=self.instance_id,
                host=socket.gethostname(),
                pid=os.getpid(),
                version=__version__,
                started_at=self._started_at,
                heartbeat_at=now,
                concurrency=self.settings.queue.instance_concurrency,
                running=len(self.actors),
            ),
        )
        leased = await queries.jobs_leased_to(self.store, self.instance_id)
        mine = {job.id for job in leased}
        for job_id, actor in list(self.actors.items()):
            if job_id not in mine:
                # Taken over elsewhere: this actor's writes would be refused
                # anyway; stop it now rather than at its next write.
                await actor.stop()
        for job in leased:
            await self._renew(job, now)

    async def _renew(self, job: Job, now: dt.datetime) -> None:
        lease = dt.timedelta(seconds=self.settings.queue.lease_s)
        async with self.store.transaction() as tx:
            await tx.lock_generation(job.generation_id)
            current = await tx.lock_job(job.id)
            if (
                current is None
                or current.state != "running"
                or current.lease_owner != self.instance_id
            ):
                return
            await tx.upsert_job(
                msgspec.structs.replace(current, lease_expires_at=now + lease)
            )
        if current.id not in self.actors and self._running:
            self._start_actor(current)

    # -- coordination -----------------------------------------------------------

    async def _lead_loop(self) -> None:
        while True:
            try:
                async with self.cluster.leadership() as lost:
                    tasks = [
                        asyncio.create_task(self.coordinator.run(lost)),
                        asyncio.create_task(self.maintenance.run(lost)),
                    ]
                    try:
                        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in tasks:
                            task.cancel()
                        await asyncio.gather(*tasks, return_exceptions=True)
            except NimuError as exc:
                log.warning("coordination interrupted: %s", exc,
                            extra={"action": "queue.lead"})
            await asyncio.sleep(self.settings.queue.leader_retry_s)

    def wake_coordinator(self, reason: str = "") -> None:
        """Ask the coordinating instance (maybe this one) for a pass."""
        if self.cluster.is_leader:
            self.coordinator.wake(reason)
        else:
            task = asyncio.create_task(self._send_quietly(LEADER, Wake(reason=reason)))
            task.add_done_callback(lambda _t: None)

    async def _send_quietly(self, to: str, message: Any) -> None:
        try:
            await self.cluster.send(to, message)
        except NimuError as exc:
            # A lost wake-up only delays work until the next tick.
            log.debug("cluster send failed: %s", exc, extra={"action": "cluster.send"})
        except Exception as exc:  # asyncpg raises its own types here
            log.debug("cluster send failed: %r", exc, extra={"action": "cluster.send"})

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            if event.type == EventType.STATUS and event.data.get("status") in _WAKING:
                self.wake_coordinator(str(event.data["status"]))
                return

    async def _deliver(self, instance_id: str, job: Job) -> None:
        if instance_id == self.instance_id:
            self._start_actor(job)
        else:
            await self._send_quietly(instance_id, Dispatched(job_id=job.id))

    # -- actors -----------------------------------------------------------------------

    def _start_actor(self, job: Job) -> JobActor | None:
        if not self._running or job.lease_owner != self.instance_id:
            return None
        actor = self.actors.get(job.id)
        if actor is not None and actor.lease_token == job.lease_token:
            return actor
        if actor is not None:
            # A newer lease of the same job: the old actor is fenced out.
            asyncio.create_task(actor.stop())
        actor = JobActor(self.ctx, job.id, job.generation_id, job.lease_token)
        self.actors[job.id] = actor
        actor.start()
        return actor

    def _actor_exited(self, actor: JobActor) -> None:
        if self.actors.get(actor.job_id) is actor:
            del self.actors[actor.job_id]

    async def _on_message(self, envelope: Envelope) -> None:
        match envelope.message:
            case Dispatched(job_id=job_id):
                job = await self.store.get_job_by_id(job_id)
                if job is not None and job.state == "running":
                    self._start_actor(job)
            case Wake(reason=reason):
                if self.cluster.is_leader:
                    self.coordinator.wake(reason)
            case Command() as command:
                await self._answer(envelope.sender, command)
            case Reply(command_id=command_id) as reply:
                future = self._replies.pop(command_id, None)
                if future is not None and not future.done():
                    future.set_result(reply)

    async def _answer(self, sender: str, command: Command) -> None:
        problem = None
        try:
            await self._local_command(
                command.generation_id,
                command.kind,
                Status(command.status) if command.status else None,
                command.reason,
                command.error,
            )
        except NimuError as exc:
            problem = exc.problem()
        except ActorGone:
            problem = Unavailable("the job changed hands; try again").problem()
        await self._send_quietly(
            sender, Reply(command_id=command.command_id, problem=problem)
        )

    # -- commands (JobCommands) -------------------------------------------------

    async def cancel(self, generation: Generation) -> Generation:
        return await self._command(generation.id, "cancel", None, None, None)

    async def override(
        self,
        generation: Generation,
        status: Status,
        reason: str | None,
        error: ErrorInfo | None,
    ) -> Generation:
        return await self._command(generation.id, "override", status, reason, error)

    async def _command(
        self,
        generation_id: str,
        kind: Literal["cancel", "override"],
        status: Status | None,
        reason: str | None,
        error: ErrorInfo | None,
    ) -> Generation:
        """Apply a command where it belongs: here, or with the job's actor."""
        timeout_s = self.settings.queue.command_timeout_s
        for _ in range(5):
            direct = await self._apply_unless_running(
                generation_id, kind, status, reason, error
            )
            if isinstance(direct, Generation):
                return direct
            job = direct
            try:
                if job.lease_owner == self.instance_id:
                    return await self._local_command(
                        generation_id, kind, status, reason, error
                    )
                return await self._remote_command(
                    job, kind, status, reason, error, timeout_s
                )
            except ActorGone:
                continue  # it just ended or moved: look again
            except TimeoutError:
                taken = await self._take_over(job, kind, status, reason, error)
                if taken is not None:
                    return taken
                raise Unavailable(
                    "the instance running this job did not answer; try again"
                ) from None
        raise Unavailable("the job kept changing hands; try again")

    async def _apply_unless_running(
        self,
        generation_id: str,
        kind: str,
        status: Status | None,
        reason: str | None,
        error: ErrorInfo | None,
    ) -> Generation | Job:
        """Apply to a job no actor runs; else return the running job."""
        async with self.store.transaction() as tx:
            generation = await tx.lock_generation(generation_id)
            if generation is None:
                raise NotFound(f"no generation {generation_id}")
            job = await tx.get_job(generation_id)
            if job is not None:
                job = await tx.lock_job(job.id)
            if job is not None and job.state == "running":
                return job
            action = _action(kind, generation.status, status)
            next_status(generation.status, action)
            command = Intent(reason=reason, error=error)
            _, generation = await apply_command(tx, job, generation, action, command)
            return generation

    async def _local_command(
        self,
        generation_id: str,
        kind: Literal["cancel", "override"],
        status: Status | None,
        reason: str | None,
        error: ErrorInfo | None,
    ) -> Generation:
        job = await self._job_of(generation_id)
        if job is None or job.state != "running":
            # Not running (any more): the caller's loop applies it directly.
            raise ActorGone
        if job.lease_owner != self.instance_id:
            raise ActorGone
        actor = self.actors.get(job.id) or self._start_actor(job)
        if actor is None:
            raise ActorGone
        reply: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        command = ActorCommand(
            kind=kind, reply=reply, status=status, reason=reason, error=error
        )
        return await actor.command(command, self.settings.queue.command_timeout_s)

    async def _remote_command(
        self,
        job: Job,
        kind: Literal["cancel", "override"],
        status: Status | None,
        reason: str | None,
        error: ErrorInfo | None,
        timeout_s: float,
    ) -> Generation:
        command_id = new_id()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[command_id] = future
        try:
            await self.cluster.send(
                job.lease_owner or "",
                Command(
                    command_id=command_id,
                    reply_to=self.instance_id,
                    generation_id=job.generation_id,
                    kind=kind,
                    status=str(status) if status else None,
                    reason=reason,
                    error=error,
                ),
            )
            async with asyncio.timeout(timeout_s):
                reply = await future
        finally:
            self._replies.pop(command_id, None)
        if reply.problem is not None:
            if reply.problem.get("code") == Unavailable.code:
                raise ActorGone
            raise error_from_problem(reply.problem)
        generation = await self.store.get_generation(job.generation_id)
        assert generation is not None
        return generation

    async def _take_over(
        self,
        job: Job,
        kind: str,
        status: Status | None,
        reason: str | None,
        error: ErrorInfo | None,
    ) -> Generation | None:
        """Apply a command to a job whose owner is silent and whose lease ran out.

        Bumping the lease token first fences out the silent owner, should it
        come back.
        """
        now = utcnow()
        async with self.store.transaction() as tx:
            generation = await tx.lock_generation(job.generation_id)
            current = await tx.lock_job(job.id)
            if (
                generation is None
                or current is None
                or current.lease_token != job.lease_token
                or current.lease_expires_at is None
                or current.lease_expires_at >= now
            ):
                return None
            current = msgspec.structs.replace(
                current,
                lease_owner=self.instance_id,
                lease_token=current.lease_token + 1,
            )
            action = _action(kind, generation.status, status)
            next_status(generation.status, action)
            _, generation = await apply_command(
                tx, current, generation, action, Intent(reason=reason, error=error)
            )
            return generation

    async def _job_of(self, generation_id: str) -> Job | None:
        async with self.store.transaction() as tx:
            return await tx.get_job(generation_id)


def _action(kind: str, current: Status, target: Status | None) -> Action:
    if kind == "cancel":
        return Action.CANCEL
    assert target is not None
    return action_for(current, target)


_PROBLEM_MEMBERS = (
    "type", "title", "status", "detail", "code", "instance", "requestId"
)


def error_from_problem(problem: dict[str, Any]) -> NimuError:
    """Rebuild the error another instance answered with, code and all."""
    code = problem.get("code", "internal_error")
    cls: type[NimuError] = NimuError
    stack: list[type[NimuError]] = [NimuError]
    while stack:
        candidate = stack.pop()
        if getattr(candidate, "code", None) == code:
            cls = candidate
            break
        stack.extend(candidate.__subclasses__())
    error = NimuError.__new__(cls)
    extra = {
        k: v
        for k, v in problem.items()
        if k not in _PROBLEM_MEMBERS
    }
    NimuError.__init__(error, problem.get("detail"), **extra)
    return error


def _make_cluster(settings: Settings, store: Store, instance_id: str) -> Cluster:
    if store.kind == "postgres":
        from nimu_rt.store.postgres import PostgresStore

        assert isinstance(store, PostgresStore)
        return PostgresCluster(
            instance_id,
            connect_kwargs=store.connect_kwargs(),
            schema=store.schema,
            pool=lambda: store.pool,
            retry_s=settings.queue.leader_retry_s,
        )
    return LocalCluster(instance_id)


__all__ = ["JobRuntime", "RUNNING"]
