"""The queue's SQL, written once for both stores.

Queries use PostgreSQL spelling; the SQLite store translates parameters and
drops row locks (see :meth:`nimu_rt.store.base.Transaction.fetch`). Times are
passed in from Python, never taken from the database clock, so the two stores
behave the same; instances of a cluster are expected to keep their clocks in
sync (NTP), and leases are long compared with any skew.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from nimu_rt.store.base import Instance, Job, Store, Transaction, as_utc, decode_job

# Names in the queue_controls table.
PAUSED = "paused"
COORDINATOR = "coordinator"
RATE_WINDOW = dt.timedelta(minutes=1)
# Phases that hold a Veo 3 operation (uploading only downloads the result).
OPERATION_PHASES = frozenset({"submitting", "generating"})

# The dispatch order. Priority first (higher first); within a priority,
# fairness: each user's queued jobs are numbered 1, 2, 3... in age order and
# a user's running jobs count as if they came first, so one user's burst
# interleaves with everyone else's jobs instead of starving them; then age.
CANDIDATES = """
WITH running AS (
    SELECT user_id, count(*) AS n FROM jobs WHERE state = 'running' GROUP BY user_id
), queued AS (
    SELECT id, user_id, priority, queued_at, doc,
           row_number() OVER (
               PARTITION BY user_id ORDER BY priority DESC, queued_at, id
           ) AS turn
    FROM jobs WHERE state = 'queued'
)
SELECT q.doc FROM queued q LEFT JOIN running r ON r.user_id = q.user_id
ORDER BY q.priority DESC, q.turn + coalesce(r.n, 0), q.queued_at, q.id
LIMIT $1
"""


async def candidates(store: Store, limit: int) -> list[Job]:
    """Queued jobs in dispatch order (including those still backing off)."""
    return [decode_job(r[0]) for r in await store.fetch(CANDIDATES, limit)]


async def running_jobs(store: Store) -> list[Job]:
    """Every job leased to some instance."""
    rows = await store.fetch("SELECT doc FROM jobs WHERE state = 'running'")
    return [decode_job(r[0]) for r in rows]


async def jobs_leased_to(store: Store, instance_id: str) -> list[Job]:
    """The running jobs one instance holds."""
    rows = await store.fetch(
        "SELECT doc FROM jobs WHERE state = 'running' AND lease_owner = $1",
        instance_id,
    )
    return [decode_job(r[0]) for r in rows]


async def queued_count_by_priority(store: Store) -> dict[int, int]:
    """Queued jobs per priority, highest first."""
    rows = await store.fetch(
        "SELECT priority, count(*) FROM jobs WHERE state = 'queued'"
        " GROUP BY priority ORDER BY priority DESC"
    )
    return {int(p): int(n) for p, n in rows}


async def finished_since(store: Store, since: dt.datetime) -> list[Job]:
    """Jobs that finished since ``since``."""
    rows = await store.fetch(
        "SELECT doc FROM jobs WHERE state = 'finished' AND finished_at >= $1",
        since,
    )
    return [decode_job(r[0]) for r in rows]


async def submissions_since(store: Store, since: dt.datetime) -> list[dt.datetime]:
    """When paid submit calls began, since ``since``, oldest first."""
    rows = await store.fetch(
        "SELECT submit_started_at FROM jobs WHERE submit_started_at >= $1", since
    )
    return sorted(t for t in (as_utc(r[0]) for r in rows) if t is not None)


async def spend_since(store: Store, since: dt.datetime | None) -> float:
    """USD of completed generations (what Veo 3 billed), since a time."""
    sql = (
        "SELECT coalesce(sum(g.cost_usd), 0) FROM jobs j"
        " JOIN generations g ON g.id = j.generation_id"
        " WHERE j.outcome = 'completed'"
    )
    args: list[Any] = []
    if since is not None:
        sql += " AND j.finished_at >= $1"
        args.append(since)
    rows = await store.fetch(sql, *args)
    return float(rows[0][0] or 0)


# -- instances ---------------------------------------------------------------

UPSERT_INSTANCE = """
INSERT INTO instances (id, host, pid, version, started_at, heartbeat_at,
    concurrency, draining, running)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,
    running = excluded.running
"""


async def register_instance(store: Store, instance: Instance) -> None:
    """Insert this instance, or refresh its heartbeat and load.

    Concurrency and draining are left as stored: operators change them
    through the workers route, and a heartbeat must not undo that.
    """
    await store.execute(
        UPSERT_INSTANCE,
        instance.id,
        instance.host,
        instance.pid,
        instance.version,
        instance.started_at,
        instance.heartbeat_at,
        instance.concurrency,
        instance.draining,
        instance.running,
    )


async def list_instances(store: Store) -> list[Instance]:
    """Every registered instance, oldest first (alive or not)."""
    rows = await store.fetch(
        "SELECT id, host, pid, version, started_at, heartbeat_at, concurrency,"
        " draining, running FROM instances ORDER BY started_at, id"
    )
    return [
        Instance(
            id=r[0],
            host=r[1],
            pid=r[2],
            version=r[3],
            started_at=as_utc(r[4]),  # type: ignore[arg-type]
            heartbeat_at=as_utc(r[5]),  # type: ignore[arg-type]
            concurrency=r[6],
            draining=bool(r[7]),
            running=r[8],
        )
        for r in rows
    ]


async def update_instance(
    store: Store,
    instance_id: str,
    *,
    concurrency: int | None = None,
    draining: bool | None = None,
) -> bool:
    """Change an instance's concurrency or drain flag; False if unknown."""
    changed = await store.execute(
        "UPDATE instances SET concurrency = coalesce($2, concurrency),"
        " draining = coalesce($3, draining) WHERE id = $1",
        instance_id,
        concurrency,
        draining,
    )
    return changed == 1


async def forget_instances(store: Store, older_than: dt.datetime) -> int:
    """Remove instances silent since ``older_than`` (long gone)."""
    return await store.execute(
        "DELETE FROM instances WHERE heartbeat_at < $1", older_than
    )


# -- queue controls -------------------------------------------------------------


async def get_control(store: Store, name: str) -> str | None:
    """A queue control's value (e.g. paused), or None when never set."""
    rows = await store.fetch("SELECT value FROM queue_controls WHERE name = $1", name)
    return rows[0][0] if rows else None


async def set_control(tx: Transaction, name: str, value: str) -> None:
    """Set a queue control, within the caller's transaction."""
    await tx.execute(
        "INSERT INTO queue_controls (name, value) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        name,
        value,
    )


# -- maintenance ------------------------------------------------------------------


async def expired_generations(
    store: Store, before: dt.datetime, limit: int
) -> list[tuple[str, str, Any]]:
    """(id, user_id, doc) of terminal generations last changed before a time."""
    return await store.fetch(
        "SELECT id, user_id, doc FROM generations"
        " WHERE status IN ('completed', 'failed', 'cancelled') AND updated_at < $1"
        " ORDER BY updated_at LIMIT $2",
        before,
        limit,
    )
