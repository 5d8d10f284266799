"""Writing a cancel, retry or operator override to a generation and its job.

One function, :func:`apply_command`, used by whoever holds the rows: the
job's actor while it runs, the runtime or the generations service when no
actor does. Keeping it in one place keeps the job row consistent with the
lifecycle (a cancelled generation's job is finished, a retried one is queued
again with fresh attempts) whoever applies the change.
"""

from __future__ import annotations

from typing import Any

import msgspec

from nimu_rt.ids import new_id
from nimu_rt.lifecycle import RUNNING, Action, Status, next_status
from nimu_rt.models import ErrorInfo, Generation, utcnow
from nimu_rt.store.base import Job, Transaction


class Intent(msgspec.Struct, kw_only=True):
    """The optional words that come with a command."""

    reason: str | None = None
    error: ErrorInfo | None = None


async def apply_command(
    tx: Transaction,
    job: Job | None,
    generation: Generation,
    action: Action,
    command: Any,
) -> tuple[Job | None, Generation]:
    """Write a cancel or override to a locked generation and its job.

    Shared by actors and by the runtime's direct path for jobs no actor runs.
    ``command`` carries the optional ``reason`` and ``error``. A generation
    that was never confirmed has no job; an override that queues it (an
    operator confirming for the user) makes one.
    """
    now = utcnow()
    fields: dict[str, Any] = {}
    if action in (Action.CANCEL, Action.FAIL):
        fields.update(queue_position=None, estimated_start_at=None)
        if action is Action.FAIL:
            fields["error"] = command.error or ErrorInfo(
                code="operator_failed",
                message=command.reason or "Stopped by an operator.",
                retryable=True,
            )
        if job is not None:
            job = msgspec.structs.replace(
                job,
                state="finished",
                outcome="cancelled" if action is Action.CANCEL else "failed",
                finished_at=now,
                phase=None,
                lease_owner=None,
                lease_expires_at=None,
            )
    elif action in (Action.REQUEUE, Action.RETRY, Action.CONFIRM):
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
            queued_at=job.queued_at if action is Action.REQUEUE else now,
            phase=None,
            lease_owner=None,
            lease_expires_at=None,
        )
        fields["job_id"] = job.id
        if action is Action.RETRY:
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
    elif job is not None:
        # An operator pushing a running job forward (accept, ready, store).
        target = next_status(generation.status, action)
        job = msgspec.structs.replace(
            job,
            phase=str(target) if target in RUNNING else None,
            phase_started_at=now,
        )
        if target is Status.COMPLETED:
            job = msgspec.structs.replace(
                job,
                state="finished",
                outcome="completed",
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
            )
    if job is not None:
        await tx.upsert_job(job)
    extra = {"reason": command.reason} if getattr(command, "reason", None) else None
    generation = await tx.change(generation, action=action, extra=extra, **fields)
    return job, generation
