"""The job actor: the one writer of a running job, from submit to stored video.

One :class:`JobActor` exists per running job on the instance that holds the
job's lease. It runs the pipeline ``submitting → generating → uploading →
completed`` and takes commands (cancel, an operator's override) from its
mailbox, so nothing else writes the job while it runs.

Every write checks, in the same transaction, that this instance still holds
the lease with the token it was given (a fencing token). An actor whose lease
was taken over (it stalled, its instance was cut off) cannot write anything
and stops at its next attempt: two actors never both move one job.

Never paying twice:

- The Veo 3 operation name is stored in the transaction that records
  ``generating``, before anything waits on it. An actor that starts on a job
  with an operation name polls it instead of submitting again, and retries
  after an upload failure reuse it (the video stays downloadable for two
  days).
- Just before the paid submit call the actor records ``submit_started_at``.
  If the process dies inside that call, the next actor finds the mark without
  an operation name and cannot know whether Google accepted the request; it
  fails the generation as ``submission_uncertain`` (which the user may retry)
  rather than risk a second charge. The same happens when the submit call
  ends ambiguously (a timeout after the request was sent).
- Cancelling stops polling and discards the result; Google offers no way to
  cancel an operation, so one already submitted may still be billed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Literal

import msgspec

from nimu_rt.config import Settings
from nimu_rt.errors import (
    InvalidVideo,
    NimuError,
    SafetyFiltered,
    StorageError,
    Veo3Error,
    Veo3Final,
    Veo3Retryable,
)
from nimu_rt.lifecycle import (
    PROGRESS_COMPLETE,
    PROGRESS_GENERATING_END,
    PROGRESS_GENERATING_START,
    RUNNING,
    Action,
    Status,
    action_for,
    generating_progress,
    next_status,
    uploading_progress,
)
from nimu_rt.jobs.commands import apply_command
from nimu_rt.models import ErrorInfo, EventType, Generation, utcnow
from nimu_rt.storage.base import Storage, UploadState
from nimu_rt.storage.keys import video_key
from nimu_rt.storage.reference import load_reference_image
from nimu_rt.storage.video import store_video
from nimu_rt.store.base import Job, Store, Transaction
from nimu_rt.veo3.client import (
    Failed,
    ImageInput,
    Running,
    Succeeded,
    Veo3Client,
    VideoRef,
)

log = logging.getLogger(__name__)

AMBIGUOUS_SUBMIT = "veo3_submit_ambiguous"


class LeaseLost(Exception):
    """This instance no longer holds the job's lease; the actor must stop."""


class ActorGone(Exception):
    """The actor ended before it could take the command; apply it elsewhere."""


class _Done(Exception):
    """The pipeline has already written how the job ended."""


class _OperationEnded(Exception):
    """Veo 3 ended the operation without a video (not billed)."""

    def __init__(self, error: Veo3Error) -> None:
        super().__init__(error.detail)
        self.error = error


class _PhaseDeadline(Exception):
    def __init__(self, phase: str) -> None:
        super().__init__(phase)
        self.phase = phase


@dataclasses.dataclass
class ActorContext:
    """What every actor of an instance shares."""

    settings: Settings
    store: Store
    veo3: Veo3Client
    storage: Storage
    instance_id: str
    # Called when the actor ends, whatever the outcome.
    on_exit: Callable[[JobActor], None]


@dataclasses.dataclass
class ActorCommand:
    kind: Literal["cancel", "override"]
    reply: asyncio.Future[Generation]
    status: Status | None = None
    reason: str | None = None
    error: ErrorInfo | None = None


class JobActor:
    """Runs one job while this instance holds its lease."""

    def __init__(
        self, ctx: ActorContext, job_id: str, generation_id: str, lease_token: int
    ) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.generation_id = generation_id
        self.lease_token = lease_token
        self.mailbox: asyncio.Queue[ActorCommand] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self._progress = ProgressWriter(self)
        self._log_ids = {"job_id": job_id, "generation_id": generation_id}

    # -- lifetime ---------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"job-{self.job_id}")

    async def stop(self) -> None:
        """Stop without changing the job (shutdown, or the lease was lost).

        The job keeps its persisted state; whoever leases it next resumes.
        """
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def command(self, command: ActorCommand, timeout_s: float) -> Generation:
        """Deliver a command and wait for its outcome."""
        if self.task is None or self.task.done():
            raise ActorGone
        self.mailbox.put_nowait(command)
        async with asyncio.timeout(timeout_s):
            return await command.reply

    async def _run(self) -> None:
        pipeline: asyncio.Task[None] | None = None
        getter: asyncio.Task[ActorCommand] | None = None
        try:
            while True:
                pipeline = asyncio.create_task(self._pipeline())
                getter = asyncio.create_task(self.mailbox.get())
                done, _ = await asyncio.wait(
                    {pipeline, getter}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    pipeline.result()
                    return
                command = getter.result()
                # The pipeline stops first: its next write would race the
                # command's, and this actor is the only writer.
                await _cancel(pipeline)
                if not await self._handle(command):
                    return
        except LeaseLost:
            log.info(
                "lease lost; stopping",
                extra={"action": "job.lease_lost", **self._log_ids},
            )
        finally:
            # Reached on cancellation too (shutdown): nothing may outlive us.
            for task in (pipeline, getter):
                if task is not None:
                    await _cancel(task)
            await self._progress.close()
            while not self.mailbox.empty():
                pending = self.mailbox.get_nowait()
                if not pending.reply.done():
                    pending.reply.set_exception(ActorGone())
            self.ctx.on_exit(self)

    # -- fenced writes ------------------------------------------------------------

    @asynccontextmanager
    async def _fenced(self) -> AsyncIterator[tuple[Transaction, Job, Generation]]:
        """A transaction in which this actor still owns the job.

        Rows are locked generation first, then job: the order every writer
        uses, so concurrent writers wait for each other instead of
        deadlocking.
        """
        async with self.ctx.store.transaction() as tx:
            generation = await tx.lock_generation(self.generation_id)
            job = await tx.lock_job(self.job_id)
            if (
                generation is None
                or job is None
                or job.state != "running"
                or job.lease_owner != self.ctx.instance_id
                or job.lease_token != self.lease_token
            ):
                raise LeaseLost
            yield tx, job, generation

    async def _read(self) -> tuple[Job, Generation]:
        async with self._fenced() as (_, job, generation):
            return job, generation

    # -- the pipeline ---------------------------------------------------------------

    async def _pipeline(self) -> None:
        try:
            job, generation = await self._read()
            if generation.status is Status.SUBMITTING:
                if job.operation_name is None and job.submit_started_at is not None:
                    await self._fail(_uncertain_error())
                    return
                if job.operation_name is None:
                    job, generation = await self._submit(job, generation)
                else:
                    job, generation = await self._accepted(job.operation_name)
            if generation.status is Status.GENERATING:
                video, job, generation = await self._generate(job, generation)
            elif generation.status is Status.UPLOADING:
                video = await self._finished_video(job)
            else:
                return
            await self._upload(job, generation, video)
        except (LeaseLost, asyncio.CancelledError):
            raise
        except _Done:
            return
        except _PhaseDeadline as exc:
            await self._on_deadline(exc.phase)
        except _OperationEnded as ended:
            # Google does not bill a failed operation; a transient one is
            # tried again with a new submission.
            if ended.error.retryable:
                await self._retry_later(ended.error, new_operation=True)
            else:
                await self._fail(error_info(ended.error))
        except (Veo3Retryable, StorageError) as exc:
            if isinstance(exc, StorageError) and not exc.retryable:
                await self._fail(error_info(exc))
            else:
                await self._retry_later(exc)
        except (Veo3Final, InvalidVideo) as exc:
            await self._fail(error_info(exc))
        except NimuError as exc:
            log.error("job failed: %s", exc, extra={"action": "job.error",
                                                    **self._log_ids})
            await self._fail(error_info(exc))
        except Exception:
            # Logged once, here, where the job meets code we do not control.
            log.exception("job failed unexpectedly", extra={"action": "job.error",
                                                            **self._log_ids})
            await self._fail(
                ErrorInfo(
                    code="internal_error",
                    message="Something went wrong on our side. Retrying may help.",
                    retryable=True,
                )
            )

    def _remaining_s(self, job: Job, deadline_s: float) -> float:
        started = job.phase_started_at or job.dispatched_at or utcnow()
        return max(0.0, deadline_s - (utcnow() - started).total_seconds())

    async def _submit(self, job: Job, generation: Generation) -> tuple[Job, Generation]:
        # 1. Everything that can fail without cost happens first.
        image = await self._reference_image(generation)
        # 2. Mark the paid call before making it (see the module docstring).
        async with self._fenced() as (tx, job, generation):
            job = msgspec.structs.replace(job, submit_started_at=utcnow())
            await tx.upsert_job(job)
        # 3. Submit, within the phase deadline.
        queue = self.ctx.settings.queue
        remaining = self._remaining_s(job, queue.submitting_deadline_s)
        try:
            async with asyncio.timeout(remaining):
                name = await self.ctx.veo3.generate_video(
                    generation.final_prompt or generation.prompt,
                    generation.options,
                    image=image,
                )
        except TimeoutError:
            # The request may be on its way: the same as an ambiguous failure.
            await self._fail(_uncertain_error())
            raise _Done from None
        except Veo3Retryable as exc:
            if exc.code == AMBIGUOUS_SUBMIT:
                await self._fail(_uncertain_error())
                raise _Done from None
            raise
        log.info(
            "submitted to Veo 3 as %s",
            name,
            extra={"action": "job.submitted", **self._log_ids},
        )
        # 4. Persist the name with the move to generating.
        return await self._accepted(name)

    async def _accepted(self, name: str) -> tuple[Job, Generation]:
        async with self._fenced() as (tx, job, generation):
            now = utcnow()
            job = msgspec.structs.replace(
                job,
                operation_name=name,
                operation_started_at=job.operation_started_at or now,
                phase="generating",
                phase_started_at=now,
            )
            await tx.upsert_job(job)
            generation = await tx.change(
                generation,
                action=Action.ACCEPT,
                progress=max(generation.progress, PROGRESS_GENERATING_START),
            )
        return job, generation

    async def _reference_image(self, generation: Generation) -> ImageInput | None:
        key = generation.options.reference_image_key
        if key is None:
            return None
        return await load_reference_image(
            self.ctx.storage, key, self.ctx.settings.storage
        )

    async def _generate(
        self, job: Job, generation: Generation
    ) -> tuple[VideoRef, Job, Generation]:
        """Poll until the operation ends; report estimated progress meanwhile.

        Returns the video with the job and generation as its move to
        ``uploading`` wrote them.
        """
        assert job.operation_name is not None
        queue = self.ctx.settings.queue
        typical_s = self.ctx.veo3.typical_generation_s
        started = job.operation_started_at or utcnow()
        self._progress.reset(generation.progress)
        polls = 0
        try:
            async with asyncio.timeout(
                self._remaining_s(job, queue.generating_deadline_s)
            ):
                while True:
                    result = await self._poll(job.operation_name, polls)
                    polls += 1
                    match result:
                        case Running():
                            elapsed = (utcnow() - started).total_seconds()
                            self._progress.report(
                                generating_progress(elapsed, typical_s)
                            )
                            await asyncio.sleep(self.ctx.veo3.next_poll_delay_s(polls))
                        case Succeeded(video=video):
                            break
                        case Failed(error=error):
                            raise _OperationEnded(error)
        except TimeoutError:
            raise _PhaseDeadline("generating") from None
        await self._progress.flush()
        async with self._fenced() as (tx, job, generation):
            now = utcnow()
            job = msgspec.structs.replace(
                job, phase="uploading", phase_started_at=now
            )
            await tx.upsert_job(job)
            generation = await tx.change(
                generation,
                action=Action.READY,
                progress=max(generation.progress, PROGRESS_GENERATING_END),
            )
        return video, job, generation

    async def _poll(self, name: str, polls: int) -> Any:
        """One poll; Veo 3's transient errors are waited out, not requeued.

        The operation keeps running (and billing) at Google whatever our
        poll returned, so a failed poll must never lead to a new submission.
        """
        while True:
            try:
                return await self.ctx.veo3.poll(name)
            except Veo3Retryable as exc:
                delay = max(
                    exc.retry_after_s or 0.0, self.ctx.veo3.next_poll_delay_s(polls)
                )
                log.warning(
                    "poll failed (%s); again in %.1f s",
                    exc.code,
                    delay,
                    extra={"action": "job.poll_retry", **self._log_ids},
                )
                polls += 1
                await asyncio.sleep(delay)

    async def _finished_video(self, job: Job) -> VideoRef:
        """The video of a finished operation, for an upload that resumes."""
        assert job.operation_name is not None
        result = await self._poll(job.operation_name, 0)
        match result:
            case Succeeded(video=video):
                return video
            case Failed(error=error):
                raise _OperationEnded(error)
            case _:
                raise Veo3Retryable("the operation is not finished yet")

    async def _upload(self, job: Job, generation: Generation, video: VideoRef) -> None:
        """Stream the video into storage, then record it: ``completed``."""
        settings = self.ctx.settings
        key = video_key(
            settings.storage.video_prefix, generation.user_id, generation.id
        )
        total = await self.ctx.veo3.video_size(video)
        self._progress.reset(generation.progress)

        async def save_state(state: UploadState) -> None:
            async with self._fenced() as (tx, current, _):
                await tx.upsert_job(msgspec.structs.replace(current, upload=state))

        def on_progress(bytes_done: int) -> None:
            self._progress.report(uploading_progress(bytes_done, total))

        try:
            async with asyncio.timeout(
                self._remaining_s(job, settings.queue.uploading_deadline_s)
            ):
                info = await store_video(
                    self.ctx.storage,
                    key,
                    lambda offset: self.ctx.veo3.download(video, offset=offset),
                    settings=settings.storage,
                    state=job.upload if job.upload and job.upload.key == key else None,
                    on_state=save_state,
                    on_progress=on_progress,
                    generation_id=generation.id,
                )
        except TimeoutError:
            raise _PhaseDeadline("uploading") from None
        await self._progress.flush()
        async with self._fenced() as (tx, job, generation):
            await self._finish(tx, job, "completed")
            await tx.change(
                generation,
                action=Action.STORE,
                video=info,
                progress=PROGRESS_COMPLETE,
                error=None,
            )
        log.info(
            "video stored at %s",
            key,
            extra={"action": "job.completed", **self._log_ids},
        )

    async def _abort_upload(self) -> None:
        """Discard a half-written multipart upload; bounded and shielded."""
        try:
            job = await self.ctx.store.get_job_by_id(self.job_id)
            if job is not None and job.upload is not None and job.upload.upload_id:
                await asyncio.shield(
                    asyncio.wait_for(self.ctx.storage.abort_upload(job.upload), 10)
                )
        except (NimuError, TimeoutError, OSError) as exc:
            # The bucket's lifecycle rule removes what is left eventually.
            log.warning("could not abort upload: %s", exc,
                        extra={"action": "job.abort_upload", **self._log_ids})

    # -- endings ---------------------------------------------------------------

    async def _finish(self, tx: Transaction, job: Job, outcome: str) -> Job:
        now = utcnow()
        ran = (now - (job.dispatched_at or now)).total_seconds()
        job = msgspec.structs.replace(
            job,
            state="finished",
            outcome=outcome,
            finished_at=now,
            phase=None,
            lease_owner=None,
            lease_expires_at=None,
            run_seconds=job.run_seconds + max(ran, 0.0),
        )
        await tx.upsert_job(job)
        return job

    async def _fail(self, info: ErrorInfo) -> None:
        async with self._fenced() as (tx, job, generation):
            await self._finish(tx, job, "failed")
            unfinished = job.upload is not None and job.upload.upload_id is not None
            await tx.change(
                generation,
                action=Action.FAIL,
                error=info,
                queue_position=None,
                estimated_start_at=None,
            )
        if unfinished:
            # Nothing will resume it: leave no parts behind.
            await self._abort_upload()
        log.info("job failed: %s", info.code, extra={"action": "job.failed",
                                                     **self._log_ids})

    async def _retry_later(self, exc: NimuError, new_operation: bool = False) -> None:
        """Back to the queue after a backoff, or failed when attempts ran out.

        With ``new_operation`` (Veo 3 ended the operation with a transient
        error, which it does not bill) the next attempt submits anew;
        otherwise it reuses the operation already paid for, if any, and
        resumes the upload.
        """
        info = error_info(exc)
        queue = self.ctx.settings.queue
        job, generation = await self._read()
        if generation.attempts >= queue.max_attempts:
            await self._fail(
                msgspec.structs.replace(
                    info,
                    message=f"{info.message} (gave up after"
                    f" {generation.attempts} attempts)",
                    retryable=True,
                )
            )
            return
        delay_s = backoff_s(
            generation.attempts,
            queue.backoff_initial_s,
            queue.backoff_max_s,
            getattr(exc, "retry_after_s", None),
        )
        async with self._fenced() as (tx, job, generation):
            now = utcnow()
            ran = (now - (job.dispatched_at or now)).total_seconds()
            submitted = job.operation_name is not None and not new_operation
            await tx.upsert_job(
                msgspec.structs.replace(
                    job,
                    state="queued",
                    available_at=now + dt.timedelta(seconds=delay_s),
                    phase=None,
                    phase_started_at=None,
                    lease_owner=None,
                    lease_expires_at=None,
                    # A submit that failed before acceptance certainly was
                    # not accepted, and a failed operation is over: either
                    # way the next attempt may submit.
                    submit_started_at=job.submit_started_at if submitted else None,
                    operation_name=job.operation_name if submitted else None,
                    operation_started_at=(
                        job.operation_started_at if submitted else None
                    ),
                    upload=job.upload if submitted else None,
                    run_seconds=job.run_seconds + max(ran, 0.0),
                )
            )
            await tx.change(generation, action=Action.REQUEUE, error=info, progress=0)
        log.info(
            "retrying in %.1f s after %s",
            delay_s,
            info.code,
            extra={"action": "job.requeue", **self._log_ids},
        )

    async def _on_deadline(self, phase: str) -> None:
        if phase == "generating":
            # Veo 3 is still working or stuck; polling again would not help
            # and submitting again would pay twice.
            await self._fail(
                ErrorInfo(
                    code="generation_timeout",
                    message="Veo 3 did not finish the video in time.",
                    retryable=True,
                )
            )
        else:
            await self._retry_later(
                Veo3Retryable(f"the {phase} phase ran past its deadline",
                              code=f"{phase}_timeout")
            )

    # -- commands -------------------------------------------------------------------

    async def _handle(self, command: ActorCommand) -> bool:
        """Apply a command; True when the pipeline should run again."""
        try:
            async with self._fenced() as (tx, job, generation):
                if command.kind == "cancel":
                    action = Action.CANCEL
                else:
                    assert command.status is not None
                    action = action_for(generation.status, command.status)
                next_status(generation.status, action)
                job, generation = await apply_command(
                    tx, job, generation, action, command
                )
        except NimuError as exc:
            if not command.reply.done():
                command.reply.set_exception(exc)
            return True
        except LeaseLost:
            if not command.reply.done():
                command.reply.set_exception(ActorGone())
            raise
        if action in (Action.CANCEL, Action.FAIL):
            await self._abort_upload()
        if not command.reply.done():
            command.reply.set_result(generation)
        log.info(
            "%s applied: now %s",
            command.kind,
            generation.status,
            extra={"action": f"job.{command.kind}", **self._log_ids},
        )
        return (
            generation.status in RUNNING and job is not None and job.state == "running"
        )


class ProgressWriter:
    """Stores progress at most every ``queue.progress_interval_s``, never down.

    Reports are cheap and synchronous (called from upload callbacks); a
    background task writes the latest value, so a burst of reports costs one
    stored event per interval.
    """

    def __init__(self, actor: JobActor) -> None:
        self._actor = actor
        self._stored = 0
        self._latest = 0
        self._task: asyncio.Task[None] | None = None

    def reset(self, stored: int) -> None:
        self._stored = self._latest = stored

    def report(self, value: int) -> None:
        if value <= self._latest:
            return
        self._latest = value
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._write_loop())

    async def _write_loop(self) -> None:
        interval = self._actor.ctx.settings.queue.progress_interval_s
        try:
            while self._latest > self._stored:
                await self._write()
                await asyncio.sleep(interval)
        except (LeaseLost, NimuError) as exc:
            # Progress is advisory; the pipeline's next write reports a lost
            # lease or a dead store itself.
            log.debug("progress not stored: %r", exc,
                      extra={"action": "job.progress", **self._actor._log_ids})

    async def _write(self) -> None:
        value = self._latest
        if value <= self._stored:
            return
        async with self._actor._fenced() as (tx, _, generation):
            if value > generation.progress:
                await tx.change(
                    generation, event_type=EventType.PROGRESS, progress=value
                )
        self._stored = value

    async def flush(self) -> None:
        """Write the latest value now (before a status change)."""
        await self.close()
        await self._write()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await _cancel(task)


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait for it, whatever it raises."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def backoff_s(
    attempts: int, initial_s: float, cap_s: float, hint_s: float | None
) -> float:
    """Wait before attempt ``attempts + 1``: doubling, capped, with jitter.

    Half the step is fixed and half random ("equal jitter"), so retries of
    many jobs spread out but none comes back at once. Veo 3's own hint
    (Retry-After) is a floor.
    """
    step = min(cap_s, initial_s * 2 ** max(attempts - 1, 0))
    wait = step / 2 + random.uniform(0, step / 2)
    return max(wait, hint_s or 0.0)


def error_info(exc: NimuError) -> ErrorInfo:
    """The failure as the user sees it on the generation."""
    if isinstance(exc, SafetyFiltered):
        return ErrorInfo(
            code=exc.code,
            message=exc.detail,
            retryable=True,
            details={"reasons": exc.reasons, "filteredCount": exc.filtered_count},
        )
    retryable = bool(getattr(exc, "retryable", False))
    return ErrorInfo(code=exc.code, message=exc.detail, retryable=retryable)


def _uncertain_error() -> ErrorInfo:
    return ErrorInfo(
        code="submission_uncertain",
        message="We could not confirm whether Veo 3 accepted this request, so we"
        " stopped rather than risk charging twice. Retry to submit it again.",
        retryable=True,
    )
