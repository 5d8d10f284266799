"""The store contract: the same tests against SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from nimu_rt.errors import InvalidTransition
from nimu_rt.ids import new_id
from nimu_rt.lifecycle import Action, Status
from nimu_rt.models import EventType, Generation, GenerationOptions, utcnow
from nimu_rt.store import IdempotencyRecord, Job, Store


def new_generation(user: str = "alice", status: Status = Status.AWAITING_CONFIRMATION):
    now = utcnow()
    return Generation(
        id=new_id(),
        user_id=user,
        status=status,
        prompt="a fox in the snow, cinematic",
        options=GenerationOptions(model="veo-3.1-generate-001"),
        created_at=now,
        updated_at=now,
    )


async def created(store: Store, **kwargs) -> Generation:
    async with store.transaction() as tx:
        return await tx.create(new_generation(**kwargs))


async def test_create_writes_the_generation_and_its_first_event(store: Store):
    generation = await created(store)

    assert generation.seq == 1
    assert await store.get_generation(generation.id) == generation
    events = await store.events_after(generation.id, 0)
    assert [(e.seq, e.type) for e in events] == [(1, EventType.CREATED)]
    assert events[0].data["id"] == generation.id
    assert events[0].data["status"] == "awaiting_confirmation"
    assert events[0].user_id == "alice"


async def test_a_change_and_its_event_commit_together(store: Store):
    generation = await created(store)
    async with store.transaction() as tx:
        locked = await tx.lock_generation(generation.id)
        changed = await tx.change(locked, action=Action.CONFIRM, job_id="j1")

    assert changed.status is Status.QUEUED
    assert changed.seq == 2
    assert await store.get_generation(generation.id) == changed
    events = await store.events_after(generation.id, 1)
    assert len(events) == 1
    assert events[0].seq == 2
    assert events[0].type == EventType.STATUS
    assert events[0].data == {
        "jobId": "j1",
        "status": "queued",
        "previousStatus": "awaiting_confirmation",
    }


async def test_a_failed_transaction_leaves_no_trace(store: Store):
    generation = await created(store)
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            locked = await tx.lock_generation(generation.id)
            await tx.change(locked, action=Action.CONFIRM)
            raise RuntimeError("boom after the write")

    assert await store.get_generation(generation.id) == generation
    assert len(await store.events_after(generation.id, 0)) == 1


async def test_a_refused_transition_writes_nothing(store: Store):
    generation = await created(store)
    with pytest.raises(InvalidTransition) as caught:
        async with store.transaction() as tx:
            locked = await tx.lock_generation(generation.id)
            await tx.change(locked, action=Action.STORE)

    assert caught.value.extra["currentStatus"] == "awaiting_confirmation"
    assert (await store.get_generation(generation.id)).seq == 1


async def test_concurrent_changes_keep_seq_gapless(store: Store):
    generation = await created(store, status=Status.GENERATING)

    async def bump(progress: int) -> None:
        async with store.transaction() as tx:
            locked = await tx.lock_generation(generation.id)
            await tx.change(locked, event_type=EventType.PROGRESS, progress=progress)

    await asyncio.gather(*(bump(p) for p in range(10, 30)))

    events = await store.events_after(generation.id, 0)
    assert [e.seq for e in events] == list(range(1, 22))
    assert (await store.get_generation(generation.id)).seq == 21


async def test_events_after_pages_in_order(store: Store):
    generation = await created(store, status=Status.GENERATING)
    for p in range(5):
        async with store.transaction() as tx:
            locked = await tx.lock_generation(generation.id)
            await tx.change(locked, event_type=EventType.PROGRESS, progress=p)

    page = await store.events_after(generation.id, 2, limit=2)
    assert [e.seq for e in page] == [3, 4]
    assert await store.events_after(generation.id, 6) == []


async def test_listeners_see_events_only_after_commit(store: Store):
    seen = []
    store.add_listener(lambda events: seen.extend(events))
    generation = await created(store)
    assert [e.seq for e in seen] == [1]

    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            locked = await tx.lock_generation(generation.id)
            await tx.change(locked, action=Action.CONFIRM)
            raise RuntimeError("rolled back")
    assert [e.seq for e in seen] == [1]


async def test_list_is_newest_first_per_user_with_filters(store: Store):
    ids = [(await created(store)).id for _ in range(3)]
    other = await created(store, user="bob")
    queued = await created(store, status=Status.QUEUED)

    mine = await store.list_generations("alice", limit=10)
    assert [g.id for g in mine] == [queued.id, *reversed(ids)]
    assert other.id not in {g.id for g in mine}

    only_queued = await store.list_generations("alice", statuses=[Status.QUEUED])
    assert [g.id for g in only_queued] == [queued.id]

    older = await store.list_generations("alice", before_id=ids[2], limit=10)
    assert [g.id for g in older] == [ids[1], ids[0]]


async def test_idempotency_keys_are_unique_per_user(store: Store):
    generation = await created(store)
    record = IdempotencyRecord(
        user_id="alice",
        key="k1",
        request_hash="h",
        generation_id=generation.id,
        created_at=utcnow(),
    )
    async with store.transaction() as tx:
        assert await tx.insert_idempotency(record) is True
    async with store.transaction() as tx:
        assert await tx.insert_idempotency(record) is False
        assert await tx.get_idempotency("alice", "k1") == record
        assert await tx.get_idempotency("bob", "k1") is None


async def test_jobs_round_trip(store: Store):
    generation = await created(store)
    now = utcnow()
    job = Job(
        id=new_id(),
        generation_id=generation.id,
        user_id="alice",
        priority=3,
        available_at=now,
        created_at=now,
        updated_at=now,
    )
    async with store.transaction() as tx:
        await tx.upsert_job(job)
        await tx.upsert_job(msgspec.structs.replace(job, state="finished"))
    async with store.transaction() as tx:
        assert (await tx.get_job(generation.id)).state == "finished"


async def test_counts_by_status(store: Store):
    await created(store)
    await created(store)
    await created(store, status=Status.QUEUED)
    assert await store.counts_by_status() == {"awaiting_confirmation": 2, "queued": 1}


async def test_migrate_twice_applies_nothing_the_second_time(store: Store):
    assert await store.migrate() == []
    assert await store.pending_migrations() == []
