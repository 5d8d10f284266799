"""The periodic maintenance task: retention and leftovers.

It runs on the coordinating instance only, every
``queue.maintenance_interval_s``:

- terminal generations not changed for ``queue.retention_days`` are removed
  with their events, job and idempotency keys, after their video and
  thumbnail were deleted from storage (a failed delete keeps the record, so
  the next run tries again and nothing is orphaned in the bucket);
- multipart uploads abandoned for a day are aborted, when the storage
  backend can list them;
- instances silent for a day are forgotten.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import msgspec

from nimu_rt.config import Settings
from nimu_rt.errors import NimuError
from nimu_rt.jobs import queries
from nimu_rt.models import Generation, utcnow
from nimu_rt.storage.base import Storage
from nimu_rt.store.base import Store

log = logging.getLogger(__name__)

BATCH = 100
LEFTOVER_AGE = dt.timedelta(days=1)
_generation = msgspec.json.Decoder(Generation)


class Maintenance:
    """Removes what the retention period no longer covers."""

    def __init__(self, settings: Settings, store: Store, storage: Storage) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage

    async def run(self, lost: asyncio.Event) -> None:
        """Run every interval until cancelled or leadership is ``lost``."""
        while not lost.is_set():
            try:
                await self.run_once()
            except NimuError as exc:
                log.warning("maintenance failed: %s", exc,
                            extra={"action": "maintenance.run"})
            try:
                async with asyncio.timeout(self.settings.queue.maintenance_interval_s):
                    await lost.wait()
            except TimeoutError:
                pass

    async def run_once(self, now: dt.datetime | None = None) -> dict[str, int]:
        """One pass; returns how much it removed, by kind."""
        now = now or utcnow()
        removed = {"generations": 0, "objects": 0, "uploads": 0, "instances": 0}
        days = self.settings.queue.retention_days
        if days > 0:
            before = now - dt.timedelta(days=days)
            while True:
                rows = await queries.expired_generations(self.store, before, BATCH)
                if not rows:
                    break
                progress = 0
                for generation_id, _user, doc in rows:
                    generation = _generation.decode(doc)
                    keys = _object_keys(generation)
                    try:
                        if keys:
                            await self.storage.delete(keys)
                    except NimuError as exc:
                        log.warning(
                            "cannot delete objects of %s: %s",
                            generation_id,
                            exc,
                            extra={"action": "maintenance.delete",
                                   "generation_id": generation_id},
                        )
                        continue
                    async with self.store.transaction() as tx:
                        await queries.delete_generation(tx, generation_id)
                    removed["generations"] += 1
                    removed["objects"] += len(keys)
                    progress += 1
                if progress == 0:
                    break  # every one failed: try again next run
        stale = getattr(self.storage, "abort_stale_uploads", None)
        if stale is not None:
            removed["uploads"] = await stale(older_than=now - LEFTOVER_AGE)
        removed["instances"] = await queries.forget_instances(
            self.store, now - LEFTOVER_AGE
        )
        if any(removed.values()):
            log.info("maintenance removed %s", removed,
                     extra={"action": "maintenance.run"})
        return removed


def _object_keys(generation: Generation) -> list[str]:
    video = generation.video
    if video is None or video.deleted_at is not None:
        return []
    return [k for k in (video.key, video.thumbnail_key) if k]
