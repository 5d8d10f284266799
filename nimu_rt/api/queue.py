"""Routes of ``/api/queue``: the operators' view and controls of the queue.

Everything here needs the admin or service role, except the job view, which
a user may read for their own jobs.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import msgspec
from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nimu_rt.api.common import json_response, operator, principal, read_body, services
from nimu_rt.api.schemas import Body
from nimu_rt.errors import NotFound
from nimu_rt.ids import is_id
from nimu_rt.jobs import queries
from nimu_rt.jobs.commands import Intent, apply_command, discard_upload
from nimu_rt.jobs.queries import COORDINATOR, PAUSED
from nimu_rt.jobs.stats import queue_stats
from nimu_rt.lifecycle import Action, Status
from nimu_rt.models import ErrorInfo, Record, utcnow
from nimu_rt.store.base import Instance


class WorkerBody(Body, kw_only=True):
    """The body of ``POST /api/queue/workers``."""

    instance_id: str
    # Stop giving this instance new jobs (its running jobs finish), or undo.
    drain: bool | None = None
    concurrency: Annotated[int, Meta(ge=0, le=10_000)] | None = None


class ClearResult(Record, kw_only=True):
    """How many queued jobs ``POST /api/queue/clear`` cancelled."""

    cancelled: int


class JobTimings(Record, kw_only=True):
    """When a job was queued, dispatched and finished; wait and run time."""

    queued_at: dt.datetime | None
    available_at: dt.datetime | None
    dispatched_at: dt.datetime | None
    finished_at: dt.datetime | None
    wait_seconds: float | None
    run_seconds: float


class JobView(Record, kw_only=True, omit_defaults=True):
    """A job as its owner sees it; the last three members for operators only."""

    id: str
    generation_id: str
    user_id: str
    state: str
    status: Status
    phase: str | None
    priority: int
    queue_position: int | None
    estimated_start_at: dt.datetime | None
    attempts: int
    max_attempts: int
    progress: int
    error: ErrorInfo | None
    outcome: str | None
    timings: JobTimings
    instance_id: str | None = None
    lease_expires_at: dt.datetime | None = None
    operation_name: str | None = None


class WorkerView(Instance, kw_only=True):
    """An instance with whether it is alive and whether it coordinates."""

    alive: bool
    coordinator: bool


class Workers(Record, kw_only=True):
    """The answer of the workers routes."""

    items: list[WorkerView]


async def stats(request: Request) -> Response:
    """Depth, load, limits, throughput, wait and run times, success, spend."""
    operator(request)
    svc = services(request)
    return json_response(await queue_stats(svc.settings, svc.store))


async def pause(request: Request) -> Response:
    """Stop dispatching; running jobs carry on. Survives restarts."""
    operator(request)
    await _set_paused(request, True)
    return await stats(request)


async def resume(request: Request) -> Response:
    """Dispatch queued jobs again after a pause."""
    operator(request)
    await _set_paused(request, False)
    return await stats(request)


async def _set_paused(request: Request, paused: bool) -> None:
    svc = services(request)
    async with svc.store.transaction() as tx:
        await queries.set_control(tx, PAUSED, "true" if paused else "false")
    svc.runtime.wake_coordinator("paused" if paused else "resumed")


async def clear(request: Request) -> Response:
    """Cancel every queued job; running jobs are left alone."""
    operator(request)
    svc = services(request)
    cancelled = 0
    for job in await queries.candidates(svc.store, limit=1_000_000):
        async with svc.store.transaction() as tx:
            generation, current = await tx.lock_pair(job.generation_id)
            if (
                generation is None
                or current is None
                or current.state != "queued"
                or generation.status is not Status.QUEUED
            ):
                continue
            applied = await apply_command(
                tx,
                current,
                generation,
                Action.CANCEL,
                Intent(reason="the queue was cleared by an operator"),
            )
        # A job requeued after an upload failure may hold parts: drop them.
        await discard_upload(
            svc.storage, applied.abandoned, {"generation_id": job.generation_id}
        )
        cancelled += 1
    return json_response(ClearResult(cancelled=cancelled))


async def job_view(request: Request) -> Response:
    """A job's queue state, position, attempts, progress and timings."""
    caller = principal(request)
    svc = services(request)
    job_id = request.path_params["id"]
    job = await svc.store.get_job_by_id(job_id) if is_id(job_id) else None
    if job is None or not caller.may_access(job.user_id):
        raise NotFound(f"no job {job_id}")
    generation = await svc.store.get_generation(job.generation_id)
    assert generation is not None
    view = JobView(
        id=job.id,
        generation_id=job.generation_id,
        user_id=job.user_id,
        state=job.state,
        status=generation.status,
        phase=job.phase,
        priority=job.priority,
        queue_position=generation.queue_position,
        estimated_start_at=generation.estimated_start_at,
        attempts=generation.attempts,
        max_attempts=svc.settings.queue.max_attempts,
        progress=generation.progress,
        error=generation.error,
        outcome=job.outcome,
        timings=JobTimings(
            queued_at=job.queued_at,
            available_at=job.available_at,
            dispatched_at=job.dispatched_at,
            finished_at=job.finished_at,
            wait_seconds=_seconds(job.queued_at, job.dispatched_at),
            run_seconds=round(job.run_seconds, 3),
        ),
    )
    if caller.is_operator:
        view = msgspec.structs.replace(
            view,
            instance_id=job.lease_owner,
            lease_expires_at=job.lease_expires_at,
            operation_name=job.operation_name,
        )
    return json_response(view)


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


async def workers(request: Request) -> Response:
    """Instances with their heartbeat, load, concurrency and drain flag."""
    operator(request)
    return json_response(Workers(items=await _instances(request)))


async def _instances(request: Request) -> list[WorkerView]:
    svc = services(request)
    now = utcnow()
    timeout = dt.timedelta(seconds=svc.settings.queue.instance_timeout_s)
    coordinator = await queries.get_control(svc.store, COORDINATOR)
    return [
        _instance(i, alive=now - i.heartbeat_at <= timeout, leads=i.id == coordinator)
        for i in await queries.list_instances(svc.store)
    ]


def _instance(instance: Instance, *, alive: bool, leads: bool) -> WorkerView:
    return WorkerView(
        **msgspec.structs.asdict(instance), alive=alive, coordinator=leads
    )


async def update_worker(request: Request) -> Response:
    """Drain an instance (or undo it) and set its concurrency."""
    operator(request)
    body, _ = await read_body(request, WorkerBody)
    svc = services(request)
    found = await queries.update_instance(
        svc.store, body.instance_id, concurrency=body.concurrency, draining=body.drain
    )
    if not found:
        raise NotFound(f"no instance {body.instance_id}")
    svc.runtime.wake_coordinator("workers changed")
    return json_response(Workers(items=await _instances(request)))


routes = [
    Route("/api/queue", stats, methods=["GET"]),
    Route("/api/queue/pause", pause, methods=["POST"]),
    Route("/api/queue/resume", resume, methods=["POST"]),
    Route("/api/queue/clear", clear, methods=["POST"]),
    Route("/api/queue/jobs/{id}", job_view, methods=["GET"]),
    Route("/api/queue/workers", workers, methods=["GET"]),
    Route("/api/queue/workers", update_worker, methods=["POST"]),
]
