"""Writing a cancel, retry or operator override to a generation and its job.

One function, :func:`apply_command`, used by whoever holds the rows: the
job's actor while it runs, the runtime or the generations service when no
actor does. Keeping it in one place keeps the job row consistent with the
lifecycle (a cancelled generation's job is finished, a retried one is queued
again with fresh attempts) whoever applies the change.

Operators may only stop, fail, requeue, retry or confirm a generation. The
transitions that move a job forward (dispatch, accept, ready, store) belong
to the coordinator and the job's actor, which hold what those steps need (a
lease, an operation name, a stored video); an override cannot supply it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any, NamedTuple

import msgspec

from nimu_rt.errors import InvalidTransition, NimuError
from nimu_rt.ids import new_id
from nimu_rt.lifecycle import TRANSITIONS, Action, Status, action_for
from nimu_rt.models import ErrorInfo, Generation, utcnow
from nimu_rt.storage.base import Storage, UploadState
from nimu_rt.store.base import Job, Transaction

log = logging.getLogger(__name__)

# What a status override may do; see the module docstring.
OVERRIDE_ACTIONS = frozenset(
    {Action.CANCEL, Action.FAIL, Action.REQUEUE, Action.RETRY, Action.CONFIRM}
)
ABORT_TIMEOUT_S = 10.0


class Intent(msgspec.Struct, kw_only=True):
    """The optional words that come with a command."""

    reason: str | None = None
    error: ErrorInfo | None = None


class Applied(NamedTuple):
    """The outcome of :func:`apply_command`."""

    job: Job | None
    generation: Generation
    # A multipart upload nothing will resume any more; abort it after commit.
    abandoned: UploadState | None


def override_action(current: Status, target: Status) -> Action:
    """The action an operator's override to ``target`` stands for.

    Raises :class:`InvalidTransition` for a target the table does not allow
    from ``current``, and for one only the pipeline may reach.
    """
    action = action_for(current, target)
    if action not in OVERRIDE_ACTIONS:
        sources = sorted(
            str(s)
            for a, (src, to) in TRANSITIONS.items()
            if to == target and a in OVERRIDE_ACTIONS
            for s in src
        )
        raise InvalidTransition(current, f"set status {target} on", sources)
    return action


def ran_seconds(job: Job, now: dt.datetime) -> float:
    """The job's run time including the attempt running now, if any."""
    if job.state != "running" or job.dispatched_at is None:
        return job.run_seconds
    return job.run_seconds + max((now - job.dispatched_at).total_seconds(), 0.0)


def default_failure(reason: str | None) -> ErrorInfo:
    """What the user is told when an operator fails a generation."""
    return ErrorInfo(
        code="operator_failed",
        message=reason or "Stopped by an operator.",
        retryable=True,
    )


async def apply_command(
    tx: Transaction,
    job: Job | None,
    generation: Generation,
    action: Action,
    intent: Any,
) -> Applied:
    """Write a cancel, fail, requeue, retry or confirm to locked rows.

    ``intent`` carries the optional ``reason`` and ``error``. A generation
    that was never confirmed has no job; an action that queues it makes one.
    Raises :class:`InvalidTransition` if the lifecycle refuses ``action``.
    """
    if action not in OVERRIDE_ACTIONS:
        raise InvalidTransition(generation.status, str(action))
    now = utcnow()
    fields: dict[str, Any] = {}
    abandoned = None
    if job is not None and job.upload is not None and job.upload.upload_id:
        abandoned = job.upload
    if action in (Action.CANCEL, Action.FAIL):
        fields.update(queue_position=None, estimated_start_at=None)
        if action is Action.FAIL:
            fields["error"] = intent.error or default_failure(intent.reason)
        if job is not None:
            job = msgspec.structs.replace(
                job,
                state="finished",
                outcome="cancelled" if action is Action.CANCEL else "failed",
                finished_at=now,
                run_seconds=ran_seconds(job, now),
                phase=None,
                lease_owner=None,
                lease_expires_at=None,
                upload=None,
            )
    else:
        if job is None:
            job = Job(
                id=new_id(),
                generation_id=generation.id,
                user_id=generation.user_id,
                available_at=now,
                created_at=now,
                updated_at=now,
            )
        job = msgspec.structs.replace(
            job,
            state="queued",
            available_at=now,
            # A requeued job keeps its place in line; a retried one is new.
            queued_at=job.queued_at if action is Action.REQUEUE else now,
            run_seconds=ran_seconds(job, now),
            phase=None,
            lease_owner=None,
            lease_expires_at=None,
        )
        fields["job_id"] = job.id
        if action is Action.REQUEUE:
            abandoned = None  # the next attempt resumes it
        else:
            # A new attempt: a new submission and a new upload.
            job = msgspec.structs.replace(
                job,
                outcome=None,
                finished_at=None,
                operation_name=None,
                operation_started_at=None,
                submit_started_at=None,
                upload=None,
            )
            fields.update(attempts=0, error=None, progress=0)
    if job is not None:
        await tx.upsert_job(msgspec.structs.replace(job, updated_at=now))
    extra = {"reason": intent.reason} if getattr(intent, "reason", None) else None
    generation = await tx.change(generation, action=action, extra=extra, **fields)
    return Applied(job, generation, abandoned)


async def discard_upload(
    storage: Storage, state: UploadState | None, ids: dict[str, str]
) -> None:
    """Abort a multipart upload nothing will resume; bounded, never raises.

    Shielded, so that a caller cancelled meanwhile still leaves no parts
    behind. What an abort misses, the bucket's lifecycle rule and the
    maintenance task's stale-upload sweep remove later.
    """
    if state is None or not state.upload_id:
        return
    try:
        await asyncio.shield(
            asyncio.wait_for(storage.abort_upload(state), ABORT_TIMEOUT_S)
        )
    except (NimuError, TimeoutError, OSError) as exc:
        log.warning(
            "could not abort upload of %s: %s",
            state.key,
            exc,
            extra={"action": "job.abort_upload", **ids},
        )
