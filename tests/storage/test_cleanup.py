"""What the maintenance task asks of storage, on both backends."""

from __future__ import annotations

import datetime as dt

from nimu_rt.models import VideoInfo
from nimu_rt.storage.upload import MultipartTarget
from nimu_rt.storage.video import video_keys
from tests.storage.conftest import StorageFactory


async def test_stale_uploads_are_aborted_and_fresh_ones_kept(
    make_storage: StorageFactory,
):
    storage = await make_storage()
    assert isinstance(storage, MultipartTarget)
    first = await storage.create_upload("videos/a/1.mp4", content_type="video/mp4")
    second = await storage.create_upload("refs/a/2.png", content_type="image/png")

    # Measured from the start time the backend reports (moto reports a
    # fixed date in 2010 for every upload).
    started = {u.upload_id: u.initiated_at for u in await storage.list_uploads()}
    kept = await storage.abort_stale_uploads(
        older_than=started[first] - dt.timedelta(minutes=30)
    )
    aborted = await storage.abort_stale_uploads(
        older_than=started[first] + dt.timedelta(seconds=1), prefix="videos/"
    )

    assert (kept, aborted) == (0, 1)
    assert [u.upload_id for u in await storage.list_uploads()] == [second]


async def test_videos_are_deleted_with_their_thumbnails(make_storage: StorageFactory):
    storage = await make_storage()
    for key in ("videos/a/1.mp4", "videos/a/1.jpg", "videos/a/2.mp4", "refs/a/x.png"):
        await storage.put_bytes(key, key.encode(), content_type="application/x-test")
    gone = VideoInfo(key="videos/a/1.mp4", thumbnail_key="videos/a/1.jpg")
    never_stored = VideoInfo(key="videos/b/9.mp4")

    # Missing objects are not an error: a half-done run can be repeated.
    await storage.delete([*video_keys(gone), *video_keys(never_stored)])

    left = [o async for o in storage.iter_objects("videos/")]
    assert [o.key for o in left] == ["videos/a/2.mp4"]
    assert left[0].size_bytes == len(b"videos/a/2.mp4")
    assert [o.key async for o in storage.iter_objects("")] == [
        "refs/a/x.png",
        "videos/a/2.mp4",
    ]


async def test_the_maintenance_call_aborts_by_cutoff(make_storage: StorageFactory):
    storage = await make_storage()
    assert isinstance(storage, MultipartTarget)
    await storage.create_upload("videos/a/3.mp4", content_type="video/mp4")
    (pending,) = await storage.list_uploads()

    before = await storage.abort_stale_uploads(older_than=pending.initiated_at)
    after = await storage.abort_stale_uploads(
        older_than=pending.initiated_at + dt.timedelta(seconds=1)
    )

    assert (before, after) == (0, 1)
    assert await storage.list_uploads() == []
