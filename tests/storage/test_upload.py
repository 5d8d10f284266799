"""Streaming uploads on both backends, and R2's wire behaviour through a proxy."""

from __future__ import annotations

import asyncio
import hashlib

import msgspec
import pytest

from nimu_rt.errors import StorageError, StorageRetryable, Veo3Retryable
from nimu_rt.storage.base import PartRecord, UploadState
from nimu_rt.storage.upload import check_part_sizes
from tests.storage.conftest import PART, Source, StorageFactory, payload, read_all
from tests.storage.s3proxy import S3Proxy
from tests.support import WAIT_S


class Recorder:
    """Collects the states and progress an upload reports."""

    def __init__(self) -> None:
        self.states: list[UploadState] = []
        self.progress: list[int] = []

    async def on_state(self, state: UploadState) -> None:
        self.states.append(state)

    def on_progress(self, done_bytes: int) -> None:
        self.progress.append(done_bytes)


# -- both backends ------------------------------------------------------------------


async def test_a_large_stream_is_stored_in_equal_parts(make_storage: StorageFactory):
    storage = await make_storage(max_parallel_parts=3)
    source = Source(payload(4 * PART + 12_345))
    seen = Recorder()

    stored = await storage.upload_stream(
        "videos/alice/g1.mp4",
        source,
        content_type="video/mp4",
        on_state=seen.on_state,
        on_progress=seen.on_progress,
    )

    assert stored.size_bytes == len(source.data)
    assert stored.sha256 == source.sha256
    assert await read_all(storage, "videos/alice/g1.mp4") == source.data
    head = await storage.head("videos/alice/g1.mp4")
    assert head is not None
    assert head.content_type == "video/mp4"
    assert head.sha256 == source.sha256
    # The last state lists every part: equal sizes but the last.
    final = seen.states[-1]
    assert [p.size_bytes for p in final.parts] == [PART] * 4 + [12_345]
    assert final.bytes_done == len(source.data)
    # Each state holds every part of the one before (it can be persisted).
    for before, after in zip(seen.states, seen.states[1:], strict=False):
        assert set(before.parts) <= set(after.parts)
    assert seen.progress[-1] == len(source.data)
    assert seen.progress == sorted(seen.progress)
    assert source.opened_at == [0]


@pytest.mark.parametrize(
    ("size", "parts"),
    [(0, 0), (1, 0), (PART, 0), (PART + 1, 2), (2 * PART, 2)],
)
async def test_part_boundaries(make_storage: StorageFactory, size: int, parts: int):
    # Up to one part: a single PUT and no upload state (parts == 0). Exactly
    # two parts' worth: two parts, never an empty third.
    storage = await make_storage()
    source = Source(payload(size))
    seen = Recorder()

    stored = await storage.upload_stream(
        "videos/a/b.mp4", source, content_type="video/mp4", on_state=seen.on_state
    )

    assert stored.size_bytes == size
    assert stored.sha256 == hashlib.sha256(source.data).hexdigest()
    assert await read_all(storage, "videos/a/b.mp4") == source.data
    if parts == 0:
        assert seen.states == []
        assert stored.etag == hashlib.md5(source.data).hexdigest()
    else:
        assert len(seen.states[-1].parts) == parts
    head = await storage.head("videos/a/b.mp4")
    assert head is not None and head.etag == stored.etag


async def test_a_dropped_source_is_reopened_where_it_stopped(
    make_storage: StorageFactory,
):
    storage = await make_storage()
    source = Source(payload(2 * PART + 99), break_at=PART + 777)

    stored = await storage.upload_stream("v/x.mp4", source, content_type="video/mp4")

    assert source.opened_at == [0, PART + 777]
    assert stored.sha256 == source.sha256
    assert await read_all(storage, "v/x.mp4") == source.data


async def test_a_failing_source_aborts_and_leaves_nothing(
    make_storage: StorageFactory,
):
    storage = await make_storage(source_attempts=1)
    source = Source(payload(3 * PART), break_at=2 * PART + 5)

    with pytest.raises(Veo3Retryable):
        await storage.upload_stream("v/y.mp4", source, content_type="video/mp4")

    assert await storage.head("v/y.mp4") is None
    assert await storage.list_uploads() == []


async def test_resume_continues_after_the_saved_parts(make_storage: StorageFactory):
    storage = await make_storage(max_parallel_parts=1)
    data = payload(4 * PART + 10)
    saved: list[UploadState] = []
    two_parts_saved = asyncio.Event()

    async def save_then_crash(state: UploadState) -> None:
        saved.append(state)
        if len(state.parts) == 2:
            two_parts_saved.set()
            # The process stops here; nothing after this point runs.
            await asyncio.Event().wait()

    first = asyncio.create_task(
        storage.upload_stream(
            "v/r.mp4", Source(data), content_type="video/mp4", on_state=save_then_crash
        )
    )
    await asyncio.wait_for(two_parts_saved.wait(), WAIT_S)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    state = saved[-1]
    assert [p.number for p in state.parts] == [1, 2]
    # Cancelled is not failed: the upload is still there to resume.
    assert [u.upload_id for u in await storage.list_uploads()] == [state.upload_id]

    again = Source(data)
    seen = Recorder()
    stored = await storage.upload_stream(
        "v/r.mp4",
        again,
        content_type="video/mp4",
        state=state,
        on_state=seen.on_state,
        on_progress=seen.on_progress,
    )

    assert stored.sha256 == again.sha256
    assert await read_all(storage, "v/r.mp4") == data
    # Re-read from the start so the SHA-256 covers the saved parts too.
    assert again.opened_at == [0]
    assert all(s.upload_id == state.upload_id for s in seen.states)
    assert [p.number for p in seen.states[-1].parts] == [1, 2, 3, 4, 5]
    assert await storage.list_uploads() == []


async def test_final_check_refuses_unequal_parts():
    parts = [
        PartRecord(number=1, etag="a", size_bytes=PART),
        PartRecord(number=2, etag="b", size_bytes=PART + 1),
        PartRecord(number=3, etag="c", size_bytes=10),
    ]
    with pytest.raises(StorageError, match="part 2 has"):
        check_part_sizes(parts, PART)
    with pytest.raises(StorageError, match="the last part"):
        check_part_sizes([PartRecord(number=1, etag="a", size_bytes=PART + 1)], PART)
    with pytest.raises(StorageError, match="not numbered"):
        check_part_sizes([parts[0], parts[2]], PART)
    check_part_sizes([parts[0], msgspec.structs.replace(parts[2], number=2)], PART)


# -- R2 on the wire ---------------------------------------------------------------


async def test_r2_sends_equal_parts_with_md5_and_the_type_on_create(
    make_r2: StorageFactory, proxy: S3Proxy
):
    storage = await make_r2(max_parallel_parts=2)
    source = Source(payload(3 * PART + 4096))

    await storage.upload_stream("v/w.mp4", source, content_type="video/webm")

    parts = sorted(proxy.ops("UploadPart"), key=lambda s: s.part_number or 0)
    # Our own check of R2's rule on what actually went over the wire: moto
    # would accept unequal parts.
    assert [s.content_length for s in parts] == [PART, PART, PART, 4096]
    assert all("content-md5" in s.headers for s in parts)
    # R2 refuses botocore's default CRC32 checksums.
    assert not any(
        name.startswith("x-amz-checksum") or name == "x-amz-sdk-checksum-algorithm"
        for s in proxy.seen
        for name in s.headers
    )
    (create,) = proxy.ops("CreateMultipartUpload")
    assert create.headers["content-type"] == "video/webm"


async def test_r2_one_part_is_a_single_put(make_r2: StorageFactory, proxy: S3Proxy):
    storage = await make_r2()
    source = Source(payload(PART - 1))

    await storage.upload_stream("v/s.mp4", source, content_type="video/mp4")

    assert [s.operation for s in proxy.seen] == ["PutObject"]
    (put,) = proxy.seen
    assert put.headers["x-amz-meta-sha256"] == source.sha256
    assert put.content_length == PART - 1


async def test_r2_retries_a_part_after_a_503_and_a_dropped_connection(
    make_r2: StorageFactory, proxy: S3Proxy
):
    storage = await make_r2(max_parallel_parts=2)
    proxy.fail(lambda s: s.part_number == 2, "503")
    proxy.fail(lambda s: s.part_number == 3, "reset")
    source = Source(payload(3 * PART + 1))

    stored = await storage.upload_stream("v/t.mp4", source, content_type="video/mp4")

    sent = sorted(s.part_number or 0 for s in proxy.ops("UploadPart"))
    assert sent == [1, 2, 2, 3, 3, 4]
    assert stored.sha256 == source.sha256
    assert await read_all(storage, "v/t.mp4") == source.data


async def test_r2_aborts_when_a_part_keeps_failing(
    make_r2: StorageFactory, proxy: S3Proxy
):
    storage = await make_r2(request_attempts=3)
    proxy.fail(lambda s: s.part_number == 2, "503", times=100)
    source = Source(payload(3 * PART))

    with pytest.raises(StorageRetryable, match="SlowDown"):
        await storage.upload_stream("v/f.mp4", source, content_type="video/mp4")

    assert [s.part_number for s in proxy.ops("UploadPart")].count(2) == 3
    assert len(proxy.ops("AbortMultipartUpload")) == 1
    assert proxy.ops("CompleteMultipartUpload") == []
    assert await storage.head("v/f.mp4") is None
    assert await storage.list_uploads() == []


async def test_r2_resume_skips_parts_the_bucket_already_holds(
    make_r2: StorageFactory, proxy: S3Proxy
):
    # A part that finished after the last saved state (the crash came before
    # its state was persisted) is found with ListParts and not sent again.
    storage = await make_r2(max_parallel_parts=1)
    data = payload(3 * PART + 5)
    saved: list[UploadState] = []
    crashed = asyncio.Event()

    async def save(state: UploadState) -> None:
        saved.append(state)
        if len(state.parts) == 2:
            crashed.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(
        storage.upload_stream("v/k.mp4", Source(data), content_type="video/mp4",
                              on_state=save)
    )
    await asyncio.wait_for(crashed.wait(), WAIT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    older = next(s for s in saved if len(s.parts) == 1)
    proxy.seen.clear()

    resumed = await make_r2()
    stored = await resumed.upload_stream(
        "v/k.mp4", Source(data), content_type="video/mp4", state=older
    )

    assert [s.part_number for s in proxy.ops("UploadPart")] == [3, 4]
    assert proxy.ops("CreateMultipartUpload") == []
    assert len(proxy.ops("ListParts")) == 1
    assert stored.sha256 == hashlib.sha256(data).hexdigest()


async def test_r2_resume_resends_a_part_whose_bytes_changed(
    make_r2: StorageFactory, proxy: S3Proxy
):
    storage = await make_r2(max_parallel_parts=1)
    data = payload(3 * PART)
    saved: list[UploadState] = []
    crashed = asyncio.Event()

    async def save(state: UploadState) -> None:
        saved.append(state)
        if len(state.parts) == 2:
            crashed.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(
        storage.upload_stream("v/c.mp4", Source(data), content_type="video/mp4",
                              on_state=save)
    )
    await asyncio.wait_for(crashed.wait(), WAIT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proxy.seen.clear()
    changed = data[:PART] + payload(PART, seed=9) + data[2 * PART :]

    stored = await storage.upload_stream(
        "v/c.mp4", Source(changed), content_type="video/mp4", state=saved[-1]
    )

    assert [s.part_number for s in proxy.ops("UploadPart")] == [2, 3]
    assert stored.sha256 == hashlib.sha256(changed).hexdigest()
    assert await read_all(storage, "v/c.mp4") == changed


async def test_r2_resume_of_a_vanished_upload_starts_over(
    make_r2: StorageFactory, proxy: S3Proxy
):
    storage = await make_r2()
    data = payload(2 * PART + 1)
    stale = UploadState(
        key="v/g.mp4",
        content_type="video/mp4",
        upload_id="aborted-long-ago",
        part_size_bytes=PART,
        parts=(PartRecord(number=1, etag="00" * 16, size_bytes=PART),),
    )

    stored = await storage.upload_stream(
        "v/g.mp4", Source(data), content_type="video/mp4", state=stale
    )

    assert len(proxy.ops("CreateMultipartUpload")) == 1
    assert [s.part_number for s in proxy.ops("UploadPart")] == [1, 2, 3]
    assert await read_all(storage, "v/g.mp4") == data
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
