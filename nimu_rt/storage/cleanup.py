"""Storage housekeeping for the maintenance task.

Three jobs, each safe to run again after a partial failure:

- :func:`delete_videos`: remove the objects of generations past retention
  (or whose videos a user deleted); the generations themselves stay.
- :func:`abort_stale_uploads`: abort multipart uploads that were started
  long ago and never finished (a crashed instance's, or one whose job was
  given up). Their parts cost storage until aborted. The bucket's lifecycle
  rule (``nimu-rt setup-bucket``) does the same on R2's side, later.
- :func:`list_objects`: what is stored under a prefix, e.g. to find objects
  that no generation names any more.

None of these touch the store: deciding which generations are past
retention, and recording it, belongs to the caller.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable

from nimu_rt.models import VideoInfo
from nimu_rt.storage.base import ObjectInfo, PendingUpload, Storage
from nimu_rt.storage.video import video_keys

log = logging.getLogger(__name__)


async def delete_videos(storage: Storage, videos: Iterable[VideoInfo]) -> int:
    """Delete each video and its thumbnail; return how many keys were named.

    Missing objects are not an error, so a run that failed halfway can be
    repeated.
    """
    keys = [key for video in videos for key in video_keys(video)]
    if keys:
        await storage.delete(keys)
        log.info(
            "deleted %s stored objects",
            len(keys),
            extra={"action": "storage.cleanup.delete", "count": len(keys)},
        )
    return len(keys)


async def abort_stale_uploads(
    storage: Storage,
    *,
    older_than_s: float,
    prefix: str = "",
    now: dt.datetime | None = None,
) -> list[PendingUpload]:
    """Abort unfinished uploads started more than ``older_than_s`` ago.

    Returns the uploads aborted. An upload a running job is still writing
    must be younger than the threshold: pick one well above the longest
    upload (hours, not minutes), or that job's upload fails and is retried.
    """
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(seconds=older_than_s)
    stale = [u for u in await storage.list_uploads(prefix) if u.initiated_at < cutoff]
    for upload in stale:
        await storage.abort_pending(upload)
        log.info(
            "aborted stale upload %s of %s started %s",
            upload.upload_id,
            upload.key,
            upload.initiated_at.isoformat(),
            extra={"action": "storage.cleanup.abort", "key": upload.key},
        )
    return stale


async def list_objects(storage: Storage, prefix: str) -> list[ObjectInfo]:
    """Every object under ``prefix``, in key order (all held in memory)."""
    return [info async for info in storage.iter_objects(prefix)]
