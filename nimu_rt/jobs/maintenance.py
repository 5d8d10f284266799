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

from nimu_rt.config import Settings
from nimu_rt.errors import NimuError
from nimu_rt.jobs import queries
from nimu_rt.lifecycle import TERMINAL
from nimu_rt.models import Generation, utcnow
from nimu_rt.storage.base import Storage
from nimu_rt.storage.video import video_keys
from nimu_rt.store.base import Store

log = logging.getLogger(__name__)

BATCH = 100
LEFTOVER_AGE = dt.timedelta(days=1)


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
            except Exception:
                # One failed pass must stop neither maintenance nor, through
                # the coordination it runs beside, dispatch.
                log.exception(
                    "maintenance pass failed", extra={"action": "maintenance.run"}
                )
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
            skipped: set[str] = set()
            while True:
                rows = await queries.expired_generations(
                    self.store, before, BATCH + len(skipped)
                )
                ids = [row[0] for row in rows if row[0] not in skipped]
                if not ids:
                    break
                for generation_id in ids:
                    objects = await self._remove(generation_id, before)
                    if objects is None:
                        skipped.add(generation_id)
                    else:
                        removed["generations"] += 1
                        removed["objects"] += objects
        removed["uploads"] = await self.storage.abort_stale_uploads(
            older_than=now - LEFTOVER_AGE
        )
        removed["instances"] = await queries.forget_instances(
            self.store, now - LEFTOVER_AGE
        )
        if any(removed.values()):
            log.info(
                "maintenance removed %s", removed, extra={"action": "maintenance.run"}
            )
        return removed

    async def _remove(self, generation_id: str, before: dt.datetime) -> int | None:
        """Delete one expired generation; the number of objects, or None.

        The generation was chosen without a lock: it is checked again with
        its row locked (a user may have retried it meanwhile). Its objects
        are deleted inside the transaction, so that if they cannot be, the
        record stays and the next run tries again; the events, job and keys
        go with the row (ON DELETE CASCADE).
        """
        try:
            async with self.store.transaction() as tx:
                generation = await tx.lock_generation(generation_id)
                if (
                    generation is None
                    or generation.status not in TERMINAL
                    or generation.updated_at >= before
                ):
                    return None
                keys = _object_keys(generation)
                if keys:
                    await self.storage.delete(keys)
                await tx.execute("DELETE FROM generations WHERE id = $1", generation_id)
            return len(keys)
        except NimuError as exc:
            log.warning(
                "cannot remove generation %s: %s",
                generation_id,
                exc,
                extra={"action": "maintenance.delete", "generation_id": generation_id},
            )
            return None


def _object_keys(generation: Generation) -> list[str]:
    video = generation.video
    if video is None or video.deleted_at is not None:
        return []
    return video_keys(video)
