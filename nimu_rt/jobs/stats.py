"""Queue statistics: answered by the operators' route, carried by the queue topic."""

from __future__ import annotations

import datetime as dt

from nimu_rt.config import Settings
from nimu_rt.jobs import queries
from nimu_rt.jobs.queries import (
    COORDINATOR,
    OPERATION_PHASES,
    PAUSED,
    RATE_WINDOW,
)
from nimu_rt.models import Record, utcnow
from nimu_rt.store.base import Store


class QueueDepth(Record, kw_only=True):
    """Queued jobs, in all and by priority."""

    total: int
    # Priority (as text: JSON object keys) -> queued jobs.
    by_priority: dict[str, int]


class RunningJobs(Record, kw_only=True):
    """Running jobs, in all and by phase."""

    total: int
    by_phase: dict[str, int]


class QueueLimits(Record, kw_only=True):
    """The cluster-wide Veo 3 limits and how much of them is in use."""

    max_concurrent_operations: int
    operations_in_flight: int
    submissions_per_minute: int
    submissions_last_minute: int


class Throughput(Record, kw_only=True):
    """Jobs finished in the last minute and completed in the last hour."""

    finished_last_minute: int
    completed_last_hour: int


class SpendUsd(Record, kw_only=True):
    """USD of completed generations over three windows."""

    last_hour: float
    today: float
    total: float


class QueueStats(Record, kw_only=True):
    """The answer of ``GET /api/queue`` (and of pause and resume)."""

    paused: bool
    coordinator: str | None
    depth: QueueDepth
    running: RunningJobs
    limits: QueueLimits
    throughput: Throughput
    mean_wait_seconds: float | None
    mean_run_seconds: float | None
    success_rate: float | None
    spend_usd: SpendUsd


async def queue_stats(settings: Settings, store: Store) -> QueueStats:
    """Depth, load, limits, throughput, wait and run times, success, spend.

    About eight queries: the coordinator publishes it at most once per
    ``STATS_INTERVAL_S``, and the operators' route reads it on request.
    """
    queue = settings.queue
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
    return QueueStats(
        paused=await queries.get_control(store, PAUSED) == "true",
        coordinator=await queries.get_control(store, COORDINATOR),
        depth=QueueDepth(
            total=sum(depth.values()),
            by_priority={str(p): n for p, n in depth.items()},
        ),
        running=RunningJobs(total=len(running), by_phase=by_phase),
        limits=QueueLimits(
            max_concurrent_operations=queue.max_concurrent_operations,
            operations_in_flight=sum(
                1 for j in running if j.phase in OPERATION_PHASES
            ),
            submissions_per_minute=queue.submissions_per_minute,
            submissions_last_minute=len(
                await queries.submissions_since(store, now - RATE_WINDOW)
            ),
        ),
        throughput=Throughput(
            finished_last_minute=len(minute),
            completed_last_hour=len(completed),
        ),
        mean_wait_seconds=_mean(waits),
        mean_run_seconds=_mean([j.run_seconds for j in completed]),
        success_rate=(
            round(len(completed) / (len(completed) + len(failed)), 4)
            if completed or failed
            else None
        ),
        spend_usd=SpendUsd(
            last_hour=await queries.spend_since(
                store, now - dt.timedelta(hours=1)
            ),
            today=await queries.spend_since(store, day_start),
            total=await queries.spend_since(store, None),
        ),
    )


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None
