"""Generation statuses, the transition table, and the progress rules.

The table below is the only place that decides whether a status may change.
Everything that changes a status (routes, job actors, the coordinator, the
admin override) asks :func:`next_status` first, inside the same store
transaction that writes the change, so a refused transition can never be
written by a race.

::

    pending_clarification ─clarify─► awaiting_confirmation ─confirm─► queued
    queued ─dispatch─► submitting ─accept─► generating ─ready─► uploading
    uploading ─store─► completed
    submitting | generating | uploading ─requeue─► queued   (retryable error)
    any non-terminal ─fail─► failed       any non-terminal ─cancel─► cancelled
    failed | cancelled ─retry─► queued
"""

from __future__ import annotations

import math
from enum import StrEnum

from nimu_rt.errors import InvalidTransition


class Status(StrEnum):
    """Where a generation is in its lifecycle; the wire uses these words."""

    PENDING_CLARIFICATION = "pending_clarification"
    AWAITING_CONFIRMATION = "awaiting_confirmation"
    QUEUED = "queued"
    SUBMITTING = "submitting"
    GENERATING = "generating"
    UPLOADING = "uploading"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


class Action(StrEnum):
    """What moves a generation from one status to the next (the table's rows)."""

    CLARIFY = "clarify"
    CONFIRM = "confirm"
    DISPATCH = "dispatch"
    ACCEPT = "accept"
    READY = "ready"
    STORE = "store"
    REQUEUE = "requeue"
    FAIL = "fail"
    CANCEL = "cancel"
    RETRY = "retry"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
NON_TERMINAL = frozenset(Status) - TERMINAL
# Statuses in which a job actor owns the generation and Veo 3 may be billing.
RUNNING = frozenset({Status.SUBMITTING, Status.GENERATING, Status.UPLOADING})

# action -> (statuses it is allowed from, status it leads to)
TRANSITIONS: dict[Action, tuple[frozenset[Status], Status]] = {
    Action.CLARIFY: (
        frozenset({Status.PENDING_CLARIFICATION}),
        Status.AWAITING_CONFIRMATION,
    ),
    Action.CONFIRM: (frozenset({Status.AWAITING_CONFIRMATION}), Status.QUEUED),
    Action.DISPATCH: (frozenset({Status.QUEUED}), Status.SUBMITTING),
    Action.ACCEPT: (frozenset({Status.SUBMITTING}), Status.GENERATING),
    Action.READY: (frozenset({Status.GENERATING}), Status.UPLOADING),
    Action.STORE: (frozenset({Status.UPLOADING}), Status.COMPLETED),
    Action.REQUEUE: (RUNNING, Status.QUEUED),
    Action.FAIL: (NON_TERMINAL, Status.FAILED),
    Action.CANCEL: (NON_TERMINAL, Status.CANCELLED),
    Action.RETRY: (frozenset({Status.FAILED, Status.CANCELLED}), Status.QUEUED),
}


def next_status(current: Status | str, action: Action | str) -> Status:
    """The status ``action`` leads to from ``current``.

    Raises :class:`InvalidTransition` (409, naming the current status) when
    the table does not allow it.
    """
    current = Status(current)
    allowed, target = TRANSITIONS[Action(action)]
    if current not in allowed:
        raise InvalidTransition(current, str(action), [str(s) for s in allowed])
    return target


def action_for(current: Status | str, target: Status | str) -> Action:
    """The action that moves ``current`` to ``target``, for status overrides.

    An operator names the status they want; this finds the table row that
    allows it, so an override obeys the same rules as everything else.
    Raises :class:`InvalidTransition` when no row does.
    """
    current, target = Status(current), Status(target)
    for action, (allowed, to) in TRANSITIONS.items():
        if to == target and current in allowed:
            return action
    sources = [
        str(s) for src, to in TRANSITIONS.values() if to == target for s in src
    ]
    raise InvalidTransition(current, f"set status {target} on", sources)


# Progress: one number 0-100 that never goes down within an attempt.
PROGRESS_SUBMITTING = 2
PROGRESS_GENERATING_START = 5
PROGRESS_GENERATING_END = 85
PROGRESS_UPLOADING_END = 98
PROGRESS_COMPLETE = 100


def generating_progress(elapsed_s: float, typical_s: float) -> int:
    """Estimated progress while Veo 3 generates; Veo 3 reports none itself.

    Linear to 90 % of the generating range at the model's typical duration,
    then creeping towards (never reaching) its end, so a slow generation
    still moves a little and never claims to be done.
    """
    span = PROGRESS_GENERATING_END - PROGRESS_GENERATING_START
    if typical_s <= 0:
        fraction = 0.9
    elif elapsed_s <= typical_s:
        fraction = 0.9 * max(elapsed_s, 0.0) / typical_s
    else:
        over = (elapsed_s - typical_s) / typical_s
        fraction = 0.9 + 0.1 * (1 - math.exp(-over))
    return PROGRESS_GENERATING_START + min(int(span * fraction), span - 1)


def uploading_progress(bytes_done: int, total_bytes: int | None) -> int:
    """Progress while the video is copied to storage, by bytes."""
    span = PROGRESS_UPLOADING_END - PROGRESS_GENERATING_END
    if not total_bytes:
        return PROGRESS_GENERATING_END
    fraction = min(max(bytes_done / total_bytes, 0.0), 1.0)
    return PROGRESS_GENERATING_END + int(span * fraction)
