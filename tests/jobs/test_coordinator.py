"""The coordinator's choices, on both stores: order, fairness, limits, pause.

These drive one coordinator pass at a time against a real store and record
which jobs it leased to which instance; the actors that would run them are
exercised in test_pipeline.py.
"""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest

from nimu_rt import __version__
from nimu_rt.ids import new_id
from nimu_rt.jobs import queries
from nimu_rt.jobs.coordinator import QueueCoordinator
from nimu_rt.jobs.queries import PAUSED
from nimu_rt.lifecycle import Status
from nimu_rt.models import Generation, GenerationOptions, utcnow
from nimu_rt.store import Job, Store
from nimu_rt.store.base import Instance
from tests.support import make_settings

T0 = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


async def queued(
    store: Store, user: str, *, priority: int = 0, age_s: float = 0.0,
    available_in_s: float = 0.0,
) -> Job:
    """A confirmed generation waiting in the queue since ``age_s`` ago."""
    now = utcnow()
    queued_at = now - dt.timedelta(seconds=age_s)
    generation = Generation(
        id=new_id(),
        user_id=user,
        status=Status.QUEUED,
        prompt=f"a video for {user}",
        options=GenerationOptions(model="veo-3.1-generate-001"),
        created_at=now,
        updated_at=now,
    )
    job = Job(
        id=new_id(),
        generation_id=generation.id,
        user_id=user,
        priority=priority,
        available_at=now + dt.timedelta(seconds=available_in_s),
        queued_at=queued_at,
        created_at=now,
        updated_at=now,
    )
    async with store.transaction() as tx:
        await tx.create(generation)
        await tx.upsert_job(job)
    return job


async def add_instance(store: Store, name: str, concurrency: int = 10) -> None:
    now = utcnow()
    await queries.register_instance(
        store,
        Instance(id=name, host="h", pid=1, version=__version__, started_at=now,
                 heartbeat_at=now, concurrency=concurrency),
    )


class Recorder:
    def __init__(self) -> None:
        self.leased: list[tuple[str, Job]] = []

    async def __call__(self, instance_id: str, job: Job) -> None:
        self.leased.append((instance_id, job))

    @property
    def users(self) -> list[str]:
        return [job.user_id for _, job in self.leased]


def coordinator(store: Store, tmp_path, **queue) -> tuple[QueueCoordinator, Recorder]:
    settings = make_settings(tmp_path, {"queue": queue})
    recorder = Recorder()
    return QueueCoordinator(settings, store, recorder, "i1"), recorder


async def test_priority_then_fairness_then_age(store: Store, tmp_path):
    await add_instance(store, "i1")
    # alice bursts five jobs first; bob and carol come later with one each.
    for n in range(5):
        await queued(store, "alice", age_s=100 - n)
    await queued(store, "bob", age_s=50)
    await queued(store, "carol", age_s=40)
    await queued(store, "dave", priority=5, age_s=1)

    order = [j.user_id for j in await queries.candidates(store, 100)]
    assert order == ["dave", "alice", "bob", "carol", "alice", "alice", "alice",
                     "alice"]


async def test_running_jobs_count_against_their_users_turn(store: Store, tmp_path):
    await add_instance(store, "i1")
    coord, recorder = coordinator(store, tmp_path, max_concurrent_operations=2)
    for n in range(3):
        await queued(store, "alice", age_s=100 - n)
    await coord.schedule()
    assert recorder.users == ["alice", "alice"]

    # bob arrives after alice's third job; alice already runs two, so bob's
    # single job goes first when a slot frees.
    await queued(store, "bob", age_s=0)
    order = [j.user_id for j in await queries.candidates(store, 100)]
    assert order == ["bob", "alice"]


async def test_dispatch_leases_the_job_and_moves_the_generation(store: Store, tmp_path):
    await add_instance(store, "i1")
    coord, recorder = coordinator(store, tmp_path)
    job = await queued(store, "alice")

    await coord.schedule()

    [(instance, leased)] = recorder.leased
    assert instance == "i1"
    assert leased.state == "running"
    assert leased.lease_owner == "i1"
    assert leased.lease_token == 1
    generation = await store.get_generation(job.generation_id)
    assert generation.status is Status.SUBMITTING
    assert generation.attempts == 1
    assert generation.progress == 2
    # A second pass finds nothing more to do.
    await coord.schedule()
    assert len(recorder.leased) == 1


async def test_global_concurrent_operations_limit(store: Store, tmp_path):
    await add_instance(store, "i1")
    await add_instance(store, "i2")
    coord, recorder = coordinator(store, tmp_path, max_concurrent_operations=3)
    for n in range(5):
        await queued(store, f"user{n}")

    await coord.schedule()

    assert len(recorder.leased) == 3
    # Spread over the instances with most free slots.
    assert {i for i, _ in recorder.leased} == {"i1", "i2"}


async def test_submissions_per_minute_limit(store: Store, tmp_path):
    await add_instance(store, "i1")
    coord, recorder = coordinator(
        store, tmp_path, submissions_per_minute=2, max_concurrent_operations=10
    )
    for n in range(4):
        await queued(store, f"user{n}")

    next_in = await coord.schedule()

    assert len(recorder.leased) == 2
    # The next pass is due when the minute's window opens again.
    assert 55 < next_in <= 60


async def test_per_instance_concurrency(store: Store, tmp_path):
    await add_instance(store, "i1", concurrency=1)
    await add_instance(store, "i2", concurrency=2)
    coord, recorder = coordinator(store, tmp_path)
    for n in range(5):
        await queued(store, f"user{n}")

    await coord.schedule()

    per = [i for i, _ in recorder.leased]
    assert sorted(per) == ["i1", "i2", "i2"]


async def test_draining_and_silent_instances_get_nothing(store: Store, tmp_path):
    await add_instance(store, "i1")
    await queries.update_instance(store, "i1", draining=True)
    now = utcnow()
    await queries.register_instance(
        store,
        Instance(id="old", host="h", pid=1, version=__version__,
                 started_at=now - dt.timedelta(hours=1),
                 heartbeat_at=now - dt.timedelta(minutes=5), concurrency=10),
    )
    coord, recorder = coordinator(store, tmp_path)
    await queued(store, "alice")

    await coord.schedule()
    assert recorder.leased == []

    await queries.update_instance(store, "i1", draining=False)
    await coord.schedule()
    assert [i for i, _ in recorder.leased] == ["i1"]


async def test_backoff_delays_dispatch(store: Store, tmp_path):
    await add_instance(store, "i1")
    coord, recorder = coordinator(store, tmp_path)
    await queued(store, "alice", available_in_s=30)

    next_in = await coord.schedule()

    assert recorder.leased == []
    assert 25 < next_in <= 30


async def test_pause_stops_dispatch_and_resume_restarts_it(store: Store, tmp_path):
    await add_instance(store, "i1")
    coord, recorder = coordinator(store, tmp_path)
    await queued(store, "alice")
    async with store.transaction() as tx:
        await queries.set_control(tx, PAUSED, "true")

    await coord.schedule()
    assert recorder.leased == []

    async with store.transaction() as tx:
        await queries.set_control(tx, PAUSED, "false")
    await coord.schedule()
    assert len(recorder.leased) == 1


async def test_positions_are_published_as_events(store: Store, tmp_path):
    await add_instance(store, "i1")
    coord, _ = coordinator(store, tmp_path, max_concurrent_operations=1)
    jobs = [await queued(store, f"user{n}", age_s=10 - n) for n in range(3)]

    await coord.schedule()

    first = await store.get_generation(jobs[0].generation_id)
    assert first.status is Status.SUBMITTING
    second = await store.get_generation(jobs[1].generation_id)
    third = await store.get_generation(jobs[2].generation_id)
    assert (second.queue_position, third.queue_position) == (1, 2)
    assert second.estimated_start_at <= third.estimated_start_at
    events = await store.events_after(third.id, 0)
    assert events[-1].type == "queue"
    assert events[-1].data["queuePosition"] == 2


async def test_expired_lease_is_taken_over_by_a_live_instance(store: Store, tmp_path):
    await add_instance(store, "i1")
    coord, recorder = coordinator(store, tmp_path, lease_s=30)
    job = await queued(store, "alice")
    await coord.schedule()
    [(_, leased)] = recorder.leased

    # i1 goes silent: its lease runs out; i2 is alive.
    async with store.transaction() as tx:
        await tx.lock_generation(job.generation_id)
        current = await tx.lock_job(job.id)
        await tx.upsert_job(
            msgspec.structs.replace(
                current, lease_expires_at=utcnow() - dt.timedelta(seconds=1)
            )
        )
    await queries.update_instance(store, "i1", draining=True)
    await add_instance(store, "i2")

    await coord.schedule()

    assert [i for i, _ in recorder.leased] == ["i1", "i2"]
    taken = recorder.leased[-1][1]
    assert taken.lease_owner == "i2"
    assert taken.lease_token == leased.lease_token + 1
    # The generation stays where it was; the new actor resumes it.
    generation = await store.get_generation(job.generation_id)
    assert generation.status is Status.SUBMITTING
    assert generation.attempts == 1


@pytest.mark.parametrize("limit", [1, 2])
async def test_only_jobs_still_queued_are_dispatched(store: Store, tmp_path, limit):
    """A job cancelled between listing and leasing is not dispatched."""
    await add_instance(store, "i1")
    coord, recorder = coordinator(store, tmp_path, max_concurrent_operations=limit)
    job = await queued(store, "alice")
    async with store.transaction() as tx:
        generation = await tx.lock_generation(job.generation_id)
        await tx.change(generation, status=Status.CANCELLED)

    await coord.schedule()
    assert recorder.leased == []
