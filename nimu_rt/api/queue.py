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
from nimu_rt.jobs.commands import Intent, apply_command
from nimu_rt.jobs.coordinator import COORDINATOR, PAUSED, RATE_WINDOW
from nimu_rt.lifecycle import Action, Status
from nimu_rt.models import utcnow
from nimu_rt.store.base import Instance


class WorkerBody(Body, kw_only=True):
    instance_id: str
    # Stop giving this instance new jobs (its running jobs finish), or undo.
    drain: bool | None = None
    concurrency: Annotated[int, Meta(ge=0, le=10_000)] | None = None


async def stats(request: Request) -> Response:
    """Depth, load, limits, throughput, wait and run times, success, spend."""
    operator(request)
    svc = services(request)
    store, queue = svc.store, svc.settings.queue
    now = utcnow()
    running = await queries.running_jobs(store)
    by_phase: dict[str, int] = {}
    for job in running:
        by_phase[job.phase or "starting"] = by_phase.get(job.phase or "starting", 0) + 1
    depth = await queries.queued_count_by_priority(store)
    hour = await queries.finished_since(store, now - dt.timedelta(hours=1))
    minute = [j for j in hour if j.finished_at and j.finished_at >= now - RATE_WINDOW]
    completed = [j for j in hour if j.outcome == "completed"]
    failed = [j for j in hour if j.outcome == "failed"]
    waits = [
        (j.dispatched_at - j.queued_at).total_seconds()
        for j in hour
        if j.dispatched_at and j.queued_at
    ]
    day_start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return json_response(
        {
            "paused": await queries.get_control(store, PAUSED) == "true",
            "coordinator": await queries.get_control(store, COORDINATOR),
            "depth": {
                "total": sum(depth.values()),
                "byPriority": {str(p): n for p, n in depth.items()},
            },
            "running": {"total": len(running), "byPhase": by_phase},
            "limits": {
                "maxConcurrentOperations": queue.max_concurrent_operations,
                "operationsInFlight": sum(
                    1 for j in running if j.phase in ("submitting", "generating")
                ),
                "submissionsPerMinute": queue.submissions_per_minute,
                "submissionsLastMinute": len(
                    await queries.dispatched_since(store, now - RATE_WINDOW)
                ),
            },
            "throughput": {
                "finishedLastMinute": len(minute),
                "completedLastHour": len(completed),
            },
            "meanWaitSeconds": _mean(waits),
            "meanRunSeconds": _mean([j.run_seconds for j in completed]),
            "successRate": (
                round(len(completed) / (len(completed) + len(failed)), 4)
                if completed or failed
                else None
            ),
            "spendUsd": {
                "lastHour": await queries.spend_since(
                    store, now - dt.timedelta(hours=1)
                ),
                "today": await queries.spend_since(store, day_start),
                "total": await queries.spend_since(store, None),
            },
        }
    )


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


async def pause(request: Request) -> Response:
    """Stop dispatching; running jobs carry on. Survives restarts."""
    operator(request)
    await _set_paused(request, True)
    return await stats(request)


async def resume(request: Request) -> Response:
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
            generation = await tx.lock_generation(job.generation_id)
            current = await tx.lock_job(job.id)
            if (
                generation is None
                or current is None
                or current.state != "queued"
                or generation.status is not Status.QUEUED
            ):
                continue
            await apply_command(
                tx, current, generation, Action.CANCEL,
                Intent(reason="the queue was cleared by an operator"),
            )
            cancelled += 1
    return json_response({"cancelled": cancelled})


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
    view = {
        "id": job.id,
        "generationId": job.generation_id,
        "userId": job.user_id,
        "state": job.state,
        "status": str(generation.status),
        "phase": job.phase,
        "priority": job.priority,
        "queuePosition": generation.queue_position,
        "estimatedStartAt": generation.estimated_start_at,
        "attempts": generation.attempts,
        "maxAttempts": svc.settings.queue.max_attempts,
        "progress": generation.progress,
        "error": generation.error,
        "outcome": job.outcome,
        "timings": {
            "queuedAt": job.queued_at,
            "availableAt": job.available_at,
            "dispatchedAt": job.dispatched_at,
            "finishedAt": job.finished_at,
            "waitSeconds": _seconds(job.queued_at, job.dispatched_at),
            "runSeconds": round(job.run_seconds, 3),
        },
    }
    if caller.is_operator:
        view["instanceId"] = job.lease_owner
        view["leaseExpiresAt"] = job.lease_expires_at
        view["operationName"] = job.operation_name
    return json_response(view)


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


async def workers(request: Request) -> Response:
    """Instances with their heartbeat, load, concurrency and drain flag."""
    operator(request)
    return json_response({"items": await _instances(request)})


async def _instances(request: Request) -> list[dict[str, object]]:
    svc = services(request)
    now = utcnow()
    timeout = dt.timedelta(seconds=svc.settings.queue.instance_timeout_s)
    coordinator = await queries.get_control(svc.store, COORDINATOR)
    return [
        _instance(i, alive=now - i.heartbeat_at <= timeout, leads=i.id == coordinator)
        for i in await queries.list_instances(svc.store)
    ]


def _instance(instance: Instance, *, alive: bool, leads: bool) -> dict[str, object]:
    doc = msgspec.to_builtins(instance)
    doc["alive"] = alive
    doc["coordinator"] = leads
    return doc


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
    return json_response({"items": await _instances(request)})


routes = [
    Route("/api/queue", stats, methods=["GET"]),
    Route("/api/queue/pause", pause, methods=["POST"]),
    Route("/api/queue/resume", resume, methods=["POST"]),
    Route("/api/queue/clear", clear, methods=["POST"]),
    Route("/api/queue/jobs/{id}", job_view, methods=["GET"]),
    Route("/api/queue/workers", workers, methods=["GET"]),
    Route("/api/queue/workers", update_worker, methods=["POST"]),
]
