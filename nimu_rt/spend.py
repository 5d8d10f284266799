"""The daily spend cap: what one user may commit to paying per UTC day.

Checked inside the transaction of a confirm or a retry, before the job is
queued. Two requests racing for the last dollars of a user's budget must
not both pass, so the check takes the user's lock first
(:meth:`~nimu_rt.store.Transaction.lock_user`: a PostgreSQL advisory lock
held until commit; SQLite runs one writer at a time anyway), then sums the
day's spend, then the caller writes its job in the same transaction. The
second request waits for the first to commit and then sees its job.

What counts as spent today: generations whose job was queued (confirmed or
retried) since the last UTC midnight, at their estimated cost, unless they
failed (Veo 3 does not bill failures), or were cancelled before this
attempt reached Veo 3. A generation cancelled while running counts: Veo 3
may bill it anyway.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from nimu_rt.config import SecuritySettings
from nimu_rt.errors import SpendCapExceeded
from nimu_rt.store import Transaction

SPENT_SINCE = """
SELECT coalesce(sum(g.cost_usd), 0) FROM jobs j
JOIN generations g ON g.id = j.generation_id
WHERE j.user_id = $1 AND j.queued_at >= $2
  AND g.status <> 'failed'
  AND (g.status <> 'cancelled'
       OR (j.dispatched_at IS NOT NULL AND j.dispatched_at >= j.queued_at))
"""


def day_start(now: dt.datetime) -> dt.datetime:
    """The last UTC midnight at or before ``now``."""
    utc = now.astimezone(dt.UTC)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)


async def spent_today(tx: Transaction, user_id: str, now: dt.datetime) -> Decimal:
    """USD the user committed to since the last UTC midnight (module doc)."""
    rows = await tx.fetch(SPENT_SINCE, user_id, day_start(now))
    return _usd(rows[0][0] or 0)


async def check_daily_cap(
    tx: Transaction,
    settings: SecuritySettings,
    user_id: str,
    cost_usd: float,
    now: dt.datetime,
) -> None:
    """Raise :class:`SpendCapExceeded` if ``cost_usd`` does not fit today.

    Holds the user's lock until ``tx`` ends: call it after the generation
    row is locked and before the job is written, in the same transaction.
    Does nothing when no cap is set. Does not count ``cost_usd`` anywhere;
    the job the caller writes does that.
    """
    if settings.daily_spend_cap_usd <= 0:
        return
    await tx.lock_user(user_id)
    cap = _usd(settings.daily_spend_cap_usd)
    spent = await spent_today(tx, user_id, now)
    cost = _usd(cost_usd)
    if spent + cost <= cap:
        return
    remaining = max(Decimal(0), cap - spent)
    resets_at = day_start(now) + dt.timedelta(days=1)
    raise SpendCapExceeded(
        f"this generation costs {cost:.2f} USD and {remaining:.2f} USD of"
        f" today's {cap:.2f} USD remain; the budget resets at"
        f" {resets_at:%Y-%m-%d %H:%M} UTC",
        capUsd=float(cap),
        spentUsd=float(spent),
        remainingUsd=float(remaining),
        costUsd=float(cost),
        resetsAt=resets_at.isoformat().replace("+00:00", "Z"),
    )


def _usd(value: object) -> Decimal:
    # Cents and below as the store keeps them (4 places), never float noise.
    return Decimal(str(value)).quantize(Decimal("0.0001"))
