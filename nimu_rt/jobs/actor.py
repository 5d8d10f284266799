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
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from nimu_rt import logs
from nimu_rt.config import Settings
from nimu_rt.errors import (
    NimuError,
    SafetyFiltered,
    StorageError,
    StoreUnavailable,
    Veo3Error,
    Veo3Retryable,
)
from nimu_rt.jobs.commands import (
    apply_command,
    discard_upload,
    override_action,
    ran_seconds,
)
from nimu_rt.lifecycle import (
    PROGRESS_COMPLETE,
    PROGRESS_GENERATING_END,
    PROGRESS_GENERATING_START,
    Action,
    Status,
    generating_progress,
    next_status,
    uploading_progress,
)
from nimu_rt.models import ErrorInfo, EventType, Generation, utcnow
from nimu_rt.storage.base import Storage, UploadState
from nimu_rt.storage.keys import video_key
from nimu_rt.storage.reference import load_reference_image
from nimu_rt.storage.video import store_video
from nimu_rt.store.base import Job, Store, Transaction
from nimu_rt.veo3.client import (
    Failed,
    ImageInput,
    Succeeded,
    Veo3Client,
    VideoRef,
)

if TYPE_CHECKING:
    from nimu_rt.metrics import Metrics

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
    # Job durations and completed spend are recorded here when set.
    metrics: Metrics | None = None


@dataclasses.dataclass
class ActorCommand:
    """A cancel or override waiting in an actor's mailbox, with its reply."""

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
        # The paid submit and the write of its operation name, shielded from
        # cancellation: once Google may bill, the name must reach the store.
        self._submitting: asyncio.Task[tuple[Job, Generation]] | None = None
        self._progress = ProgressWriter(self)
        self._log_ids = {"job_id": job_id, "generation_id": generation_id}

    # -- lifetime ---------------------------------------------------------------

    def start(self) -> None:
        # A context of its own: the actor may be started while a request is
        # answered, and must not log that request's id for its whole life.
        self.task = asyncio.create_task(
            self._run(),
            name=f"job-{self.job_id}",
            context=logs.fresh_context(**self._log_ids),
        )

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop without changing the job (shutdown, or the lease was lost).

        The job keeps its persisted state; whoever leases it next resumes.
        A submit in flight is given up to ``grace_s`` to store its operation
        name first, so that the next owner polls it instead of failing the
        job as uncertain.
        """
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        submitting = self._submitting
        if submitting is not None and not submitting.done():
            await asyncio.wait({submitting}, timeout=grace_s)
            if not submitting.done():
                submitting.cancel()
            await asyncio.gather(submitting, return_exceptions=True)

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
            pipeline = asyncio.create_task(self._pipeline())
            while True:
                getter = asyncio.create_task(self.mailbox.get())
                done, _ = await asyncio.wait(
                    {pipeline, getter}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    pipeline.result()
                    return
                command = getter.result()
                action = await self._check(command)
                if action is None:
                    continue  # refused: the pipeline goes on undisturbed
                # The pipeline stops first: its next write would race the
                # command's, and this actor is the only writer.
                await _cancel(pipeline)
                if action is not Action.CANCEL and self._submitting is not None:
                    # A requeue or failure must not lose a paid operation:
                    # let the submit store its name first. (A cancel does
                    # not wait; see the module docstring.)
                    await asyncio.gather(self._submitting, return_exceptions=True)
                if not await self._handle(command, action):
                    return
                pipeline = asyncio.create_task(self._pipeline())
        except LeaseLost:
            log.info(
                "lease lost; stopping",
                extra={"action": "job.lease_lost", **self._log_ids},
            )
        except StoreUnavailable as exc:
            # Nothing was written; the lease runs out or the heartbeat
            # restarts this actor once the store answers again.
            log.warning(
                "store unavailable (%s); stopping until it answers",
                exc.detail,
                extra={"action": "job.store_unavailable", **self._log_ids},
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
        """A transaction in which this actor still owns the job."""
        async with self.ctx.store.transaction() as tx:
            generation, job = await tx.lock_pair(self.generation_id)
            if (
                generation is None
                or job is None
                or job.id != self.job_id
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
        except (LeaseLost, StoreUnavailable, asyncio.CancelledError):
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
        except NimuError as exc:
            # Final refusals (Veo 3's, an invalid video, a missing reference
            # image): the user is told; _fail logs the outcome.
            await self._fail(error_info(exc))
        except Exception:
            # Logged once, here, where the job meets code we do not control.
            log.exception(
                "job failed unexpectedly",
                extra={"action": "job.error", **self._log_ids},
            )
            await self._fail(
                ErrorInfo(
                    code="internal_error",
                    message="Something went wrong on our side. Retrying may help.",
                    retryable=True,
                )
            )

    def _elapsed_s(self, job: Job, since: dt.datetime | None = None) -> float:
        started = since or job.phase_started_at or job.dispatched_at or utcnow()
        return (utcnow() - started).total_seconds()

    async def _submit(self, job: Job, generation: Generation) -> tuple[Job, Generation]:
        queue = self.ctx.settings.queue
        # 1. Everything that can fail without cost happens first.
        if self._elapsed_s(job) > queue.submitting_deadline_s:
            # Dispatched long ago and never sent: trying later costs nothing.
            raise _PhaseDeadline("submitting")
        image = await self._reference_image(generation)
        # 2. Mark the paid call before making it (see the module docstring).
        async with self._fenced() as (tx, job, generation):
            job = msgspec.structs.replace(job, submit_started_at=utcnow())
            await tx.upsert_job(job)
        # 3. Submit and store the operation name, shielded: cancelling the
        # pipeline now (a command, a shutdown) must not lose what Google may
        # bill. The client's own timeouts bound the call.
        self._submitting = asyncio.create_task(
            self._submit_and_record(generation, image)
        )
        # Its outcome is read by whoever awaits it; nobody may be left (a
        # cancelled pipeline), so retrieving it here keeps asyncio quiet.
        self._submitting.add_done_callback(_retrieve)
        return await asyncio.shield(self._submitting)

    async def _submit_and_record(
        self, generation: Generation, image: ImageInput | None
    ) -> tuple[Job, Generation]:
        try:
            name = await self.ctx.veo3.generate_video(
                generation.final_prompt or generation.prompt,
                generation.options,
                image=image,
            )
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
        try:
            return await self._accepted(name)
        except LeaseLost:
            # Cancelled meanwhile, or taken over: the operation is ours to
            # name in the log, since nothing else will know of it.
            log.warning(
                "operation %s was submitted but the job moved on; it may be"
                " billed",
                name,
                extra={"action": "job.orphaned_operation", **self._log_ids},
            )
            raise

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

        The deadline counts from the operation's start and is checked only
        against a fresh answer: an actor resuming after a long outage polls
        first, since the video Google made meanwhile is paid for. Returns the
        video with the job and generation as its move to ``uploading`` wrote
        them.
        """
        assert job.operation_name is not None
        deadline_s = self.ctx.settings.queue.generating_deadline_s
        typical_s = self.ctx.veo3.typical_generation_s
        started = job.operation_started_at or utcnow()
        self._progress.reset(generation.progress)
        polls = 0
        while True:
            result = await self._poll(job.operation_name, polls)
            polls += 1
            match result:
                case Succeeded(video=video):
                    break
                case Failed(error=error):
                    raise _OperationEnded(error)
                case _:
                    elapsed = self._elapsed_s(job, started)
                    if elapsed > deadline_s:
                        raise _PhaseDeadline("generating")
                    self._progress.report(generating_progress(elapsed, typical_s))
                    await asyncio.sleep(self.ctx.veo3.next_poll_delay_s(polls))
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

    async def _poll(self, name: str, polls: int, give_up_s: float | None = None) -> Any:
        """One poll; Veo 3's transient errors are waited out, not requeued.

        The operation keeps running (and billing) at Google whatever our
        poll returned, so a failed poll must never lead to a new submission.
        With ``give_up_s``, transient errors are retried only that long.
        """
        started = utcnow()
        while True:
            try:
                return await self.ctx.veo3.poll(name)
            except Veo3Retryable as exc:
                waited = (utcnow() - started).total_seconds()
                if give_up_s is not None and waited > give_up_s:
                    raise
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
        give_up_s = self.ctx.settings.queue.uploading_deadline_s
        result = await self._poll(job.operation_name, 0, give_up_s=give_up_s)
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

        remaining_s = settings.queue.uploading_deadline_s - self._elapsed_s(job)
        try:
            async with asyncio.timeout(max(remaining_s, 0.0)):
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
        if self.ctx.metrics is not None and generation.cost_estimate is not None:
            self.ctx.metrics.spend_completed.inc(generation.cost_estimate.usd)
        log.info(
            "video stored at %s",
            key,
            extra={"action": "job.completed", **self._log_ids},
        )

    # -- endings ---------------------------------------------------------------

    async def _finish(self, tx: Transaction, job: Job, outcome: str) -> Job:
        now = utcnow()
        job = msgspec.structs.replace(
            job,
            state="finished",
            outcome=outcome,
            finished_at=now,
            phase=None,
            lease_owner=None,
            lease_expires_at=None,
            run_seconds=ran_seconds(job, now),
        )
        await tx.upsert_job(job)
        if self.ctx.metrics is not None:
            self.ctx.metrics.job_finished(outcome, job.run_seconds)
        return job

    async def _fail(self, info: ErrorInfo) -> None:
        async with self._fenced() as (tx, job, generation):
            await self._finish(tx, msgspec.structs.replace(job, upload=None), "failed")
            await tx.change(
                generation,
                action=Action.FAIL,
                error=info,
                queue_position=None,
                estimated_start_at=None,
            )
        # Nothing will resume the upload of a failed job: leave no parts.
        await discard_upload(self.ctx.storage, job.upload, self._log_ids)
        log.info(
            "job failed: %s",
            info.code,
            extra={"action": "job.failed", **self._log_ids},
        )

    async def _retry_later(self, exc: NimuError, new_operation: bool = False) -> None:
        """Back to the queue after a backoff, or failed when attempts ran out.

        With ``new_operation`` (Veo 3 ended the operation with a transient
        error, which it does not bill) the next attempt submits anew;
        otherwise it reuses the operation already paid for, if any, and
        resumes the upload.
        """
        info = error_info(exc)
        queue = self.ctx.settings.queue
        _, generation = await self._read()
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
                    run_seconds=ran_seconds(job, now),
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
                Veo3Retryable(
                    f"the {phase} phase ran past its deadline",
                    code=f"{phase}_timeout",
                )
            )

    # -- commands -------------------------------------------------------------------

    async def _check(self, command: ActorCommand) -> Action | None:
        """The command's action, or None after refusing it in its reply."""
        try:
            _, generation = await self._read()
            if command.kind == "cancel":
                action = Action.CANCEL
                next_status(generation.status, action)
            else:
                assert command.status is not None
                action = override_action(generation.status, command.status)
            return action
        except NimuError as exc:
            if not command.reply.done():
                command.reply.set_exception(exc)
            return None
        except LeaseLost:
            if not command.reply.done():
                command.reply.set_exception(ActorGone())
            raise

    async def _handle(self, command: ActorCommand, action: Action) -> bool:
        """Apply a checked command; True when the pipeline should run again."""
        try:
            async with self._fenced() as (tx, job, generation):
                applied = await apply_command(tx, job, generation, action, command)
        except NimuError as exc:
            if not command.reply.done():
                command.reply.set_exception(exc)
            return True
        except LeaseLost:
            if not command.reply.done():
                command.reply.set_exception(ActorGone())
            raise
        await discard_upload(self.ctx.storage, applied.abandoned, self._log_ids)
        job, generation = applied.job, applied.generation
        if self.ctx.metrics is not None and job is not None and job.outcome:
            self.ctx.metrics.job_finished(job.outcome, job.run_seconds)
        if not command.reply.done():
            command.reply.set_result(generation)
        log.info(
            "%s applied: now %s",
            command.kind,
            generation.status,
            extra={"action": f"job.{command.kind}", **self._log_ids},
        )
        # Every override an actor takes ends its run (finished or queued).
        return False


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


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


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
