"""What a user can do with a generation: create, clarify, confirm, cancel, retry.

This is the layer between the routes and the store. Each operation is one
store transaction that reads the generation with its row locked, asks the
lifecycle table whether the change is allowed, and writes the change with its
event. Ownership is checked here too: another user's generation is reported
as not found, so ids reveal nothing.

Commands that must reach a running job (cancel, the operator's status
override) go through :class:`JobCommands`, which the job runtime replaces;
the default applies them to the store directly, which is right for a job
that no actor owns.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Iterable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from nimu_rt import clarifier
from nimu_rt.api.schemas import (
    CreateGenerationBody,
    ErrorBody,
    check_text,
    check_token,
)
from nimu_rt.auth import Principal
from nimu_rt.config import Settings
from nimu_rt.errors import (
    CostNotAccepted,
    IdempotencyKeyReused,
    NotConfirmed,
    NotFound,
    SpendCapExceeded,
    Unavailable,
    ValidationFailed,
)
from nimu_rt.ids import is_id, new_id
from nimu_rt.jobs.commands import (
    Intent,
    apply_command,
    default_failure,
    discard_upload,
    override_action,
)
from nimu_rt.lifecycle import Action, Status, next_status
from nimu_rt.models import (
    Clarification,
    ErrorInfo,
    Event,
    Generation,
    GenerationOptions,
    utcnow,
)
from nimu_rt.spend import check_daily_cap
from nimu_rt.storage.base import Storage
from nimu_rt.storage.keys import is_reference_key_of
from nimu_rt.store import IdempotencyRecord, Job, Store, Transaction
from nimu_rt.veo3.checks import model_problems, option_problems
from nimu_rt.veo3.pricing import estimate_cost

if TYPE_CHECKING:
    from nimu_rt.metrics import Metrics

log = logging.getLogger(__name__)

class JobCommands(Protocol):
    """Delivers cancel and status overrides to whoever owns a running job."""

    async def cancel(self, generation: Generation) -> Generation: ...

    async def override(
        self, generation: Generation, status: Status, reason: str | None,
        error: ErrorInfo | None,
    ) -> Generation: ...


class _RaceLost(Exception):
    """Another request with the same Idempotency-Key committed first."""


class Generations:
    """The generation operations of the REST API."""

    def __init__(
        self, settings: Settings, store: Store, storage: Storage | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        # Where a retried job's abandoned upload is discarded.
        self.storage = storage
        # Set by the job runtime when it starts: it reaches running actors.
        self.commands: JobCommands | None = None
        # Accepted spend and cap refusals are counted here when set.
        self.metrics: Metrics | None = None

    # -- reading ---------------------------------------------------------------

    async def get(self, principal: Principal, generation_id: str) -> Generation:
        """The generation, if ``principal`` may see it; NotFound otherwise."""
        generation = None
        if is_id(generation_id):
            generation = await self.store.get_generation(generation_id)
        return self._visible(principal, generation, generation_id)

    def _visible(
        self, principal: Principal, generation: Generation | None, generation_id: str
    ) -> Generation:
        if generation is None or not principal.may_access(generation.user_id):
            raise NotFound(f"no generation {generation_id}")
        return generation

    async def list(
        self,
        principal: Principal,
        *,
        statuses: Iterable[Status],
        before_id: str | None,
        limit: int,
    ) -> list[Generation]:
        return await self.store.list_generations(
            principal.user_id, statuses=statuses, before_id=before_id, limit=limit
        )

    async def events(
        self, principal: Principal, generation_id: str, since_seq: int, limit: int
    ) -> list[Event]:
        await self.get(principal, generation_id)
        return await self.store.events_after(generation_id, since_seq, limit)

    # -- creating --------------------------------------------------------------

    async def create(
        self,
        principal: Principal,
        body: CreateGenerationBody,
        *,
        raw_body: bytes,
        idempotency_key: str | None,
    ) -> tuple[Generation, bool]:
        """Create a generation; returns it and whether it was a replay.

        With an ``Idempotency-Key``, a repeated request returns the first
        generation (in its current state) instead of creating a second one;
        the same key with a different body is refused.
        """
        prompt, options, conversation_id = self._validate_create(principal, body)
        request_hash = hashlib.sha256(raw_body).hexdigest()
        if idempotency_key is not None:
            problems = check_token("$header.Idempotency-Key", idempotency_key)
            if problems:
                raise ValidationFailed(problems)
            replay = await self._replay(principal, idempotency_key, request_hash)
            if replay is not None:
                return replay, True

        questions = clarifier.questions_for(
            prompt, min_words=self.settings.generations.min_prompt_words
        )
        now = utcnow()
        generation = Generation(
            id=new_id(),
            user_id=principal.user_id,
            status=(
                Status.PENDING_CLARIFICATION
                if questions
                else Status.AWAITING_CONFIRMATION
            ),
            prompt=prompt,
            final_prompt=None if questions else prompt,
            options=options,
            clarification=Clarification(questions=questions),
            cost_estimate=estimate_cost(self.settings, options),
            conversation_id=conversation_id,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self.store.transaction() as tx:
                generation = await tx.create(generation)
                if idempotency_key is not None:
                    record = IdempotencyRecord(
                        user_id=principal.user_id,
                        key=idempotency_key,
                        request_hash=request_hash,
                        generation_id=generation.id,
                        created_at=now,
                    )
                    if not await tx.insert_idempotency(record):
                        raise _RaceLost
        except _RaceLost:
            replay = await self._replay(principal, idempotency_key or "", request_hash)
            assert replay is not None  # the winner's row is committed
            return replay, True
        log.info(
            "generation created",
            extra={
                "action": "generation.create",
                "generation_id": generation.id,
                "user_id": principal.user_id,
                "status": str(generation.status),
            },
        )
        return generation, False

    async def _replay(
        self, principal: Principal, key: str, request_hash: str
    ) -> Generation | None:
        async with self.store.transaction() as tx:
            record = await tx.get_idempotency(principal.user_id, key)
        if record is None:
            return None
        if record.request_hash != request_hash:
            raise IdempotencyKeyReused(
                [
                    {
                        "path": "$header.Idempotency-Key",
                        "message": "this key was used with a different request body",
                    }
                ]
            )
        generation = await self.store.get_generation(record.generation_id)
        return self._visible(principal, generation, record.generation_id)

    def _validate_create(
        self, principal: Principal, body: CreateGenerationBody
    ) -> tuple[str, GenerationOptions, str | None]:
        limits = self.settings.generations
        problems: list[dict[str, str]] = []
        prompt, found = check_text(
            "$.prompt", body.prompt, max_chars=limits.max_prompt_chars
        )
        problems += found
        negative = None
        if body.negative_prompt is not None:
            negative, found = check_text(
                "$.negativePrompt",
                body.negative_prompt,
                max_chars=limits.max_prompt_chars,
            )
            problems += found
        conversation_id = body.conversation_id
        if conversation_id is not None:
            problems += check_token("$.conversationId", conversation_id)
        reference = body.reference_image_key
        if reference is not None:
            # Keys come from POST /api/storage/uploads, which scopes them to
            # the caller: refs/{userId}/... A key outside it is someone else's.
            if not is_reference_key_of(reference, principal.user_id):
                problems.append(
                    {
                        "path": "$.referenceImageKey",
                        "message": "must be a key returned by /api/storage/uploads"
                        " for this user",
                    }
                )
        options = GenerationOptions(
            model=body.model or limits.default_model,
            aspect_ratio=body.aspect_ratio or "16:9",
            resolution=body.resolution or "720p",
            duration_seconds=body.duration_seconds or 8,
            negative_prompt=negative or None,
            generate_audio=True if body.generate_audio is None else body.generate_audio,
            reference_image_key=reference,
        )
        problems += option_problems(self.settings, options)
        problems += model_problems(
            prompt, options, provider=self.settings.veo3.provider
        )
        if problems:
            raise ValidationFailed(problems)
        return prompt, options, conversation_id

    # -- changing --------------------------------------------------------------

    async def _locked(
        self, tx: Transaction, principal: Principal, generation_id: str
    ) -> Generation:
        generation = None
        if is_id(generation_id):
            generation = await tx.lock_generation(generation_id)
        return self._visible(principal, generation, generation_id)

    async def _locked_pair(
        self, tx: Transaction, principal: Principal, generation_id: str
    ) -> tuple[Generation, Job | None]:
        generation, job = None, None
        if is_id(generation_id):
            generation, job = await tx.lock_pair(generation_id)
        return self._visible(principal, generation, generation_id), job

    async def clarify(
        self, principal: Principal, generation_id: str, answers: dict[str, str]
    ) -> Generation:
        """Merge the answers into ``finalPrompt``; ready for confirmation."""
        async with self.store.transaction() as tx:
            generation = await self._locked(tx, principal, generation_id)
            next_status(generation.status, Action.CLARIFY)
            questions = generation.clarification.questions
            cleaned = self._check_answers(questions, answers)
            final = clarifier.merge(generation.prompt, questions, cleaned)
            if len(final) > self.settings.generations.max_prompt_chars:
                raise ValidationFailed(
                    [
                        {
                            "path": "$.answers",
                            "message": "prompt and answers together exceed"
                            f" {self.settings.generations.max_prompt_chars}"
                            " characters",
                        }
                    ]
                )
            too_long = [
                {"path": "$.answers", "message": "with the answers, the prompt "
                 + p["message"]}
                for p in model_problems(
                    final, generation.options, provider=self.settings.veo3.provider
                )
                if p["path"] == "$.prompt"
            ]
            if too_long:
                raise ValidationFailed(too_long)
            return await tx.change(
                generation,
                action=Action.CLARIFY,
                clarification=Clarification(questions=questions, answers=cleaned),
                final_prompt=final,
            )

    def _check_answers(
        self, questions: list[Any], answers: dict[str, str]
    ) -> dict[str, str]:
        asked = {q.id for q in questions}
        problems = []
        cleaned = {}
        for qid, text in answers.items():
            path = f"$.answers.{qid}"
            if qid not in asked:
                problems.append({"path": path, "message": "no such question"})
                continue
            value, found = check_text(
                path, text, max_chars=self.settings.generations.max_answer_chars
            )
            problems += found
            cleaned[qid] = value
        for qid in sorted(asked - answers.keys()):
            problems.append(
                {"path": f"$.answers.{qid}", "message": "this question needs an answer"}
            )
        if problems:
            raise ValidationFailed(problems)
        return cleaned

    async def confirm(
        self, principal: Principal, generation_id: str, accepted_cost_usd: float
    ) -> Generation:
        """Accept the price and queue the job.

        The estimate is computed again now, from the current price table: a
        price that rose since the user saw it is refused with 409. So is a
        price that does not fit the owner's daily spend cap (409
        ``spend_cap_exceeded``, see :mod:`nimu_rt.spend`).
        """
        async with self.store.transaction() as tx:
            generation = await self._locked(tx, principal, generation_id)
            next_status(generation.status, Action.CONFIRM)
            estimate = estimate_cost(self.settings, generation.options)
            if Decimal(str(accepted_cost_usd)) < Decimal(str(estimate.usd)):
                raise CostNotAccepted(
                    f"the estimate is {estimate.usd:.2f} USD; accepted"
                    f" {accepted_cost_usd:.2f} USD",
                    estimateUsd=estimate.usd,
                    acceptedCostUsd=accepted_cost_usd,
                )
            now = utcnow()
            await self._within_cap(tx, generation.user_id, estimate.usd, now)
            job = Job(
                id=new_id(),
                generation_id=generation.id,
                user_id=generation.user_id,
                available_at=now,
                queued_at=now,
                created_at=now,
                updated_at=now,
            )
            await tx.upsert_job(job)
            generation = await tx.change(
                generation,
                action=Action.CONFIRM,
                cost_estimate=estimate,
                job_id=job.id,
            )
        if self.metrics is not None:
            self.metrics.spend_confirmed.inc(estimate.usd)
        return generation

    async def _within_cap(
        self, tx: Transaction, user_id: str, cost_usd: float, now: dt.datetime
    ) -> None:
        try:
            await check_daily_cap(
                tx, self.settings.security, user_id, cost_usd, now
            )
        except SpendCapExceeded:
            if self.metrics is not None:
                self.metrics.spend_cap_refusals.inc()
            log.info(
                "daily spend cap reached",
                extra={"action": "generation.spend_cap", "user_id": user_id},
            )
            raise

    async def cancel(self, principal: Principal, generation_id: str) -> Generation:
        generation = await self.get(principal, generation_id)
        next_status(generation.status, Action.CANCEL)
        return await self._commands().cancel(generation)

    def _commands(self) -> JobCommands:
        if self.commands is None:
            raise Unavailable("the job runtime of this instance is not running")
        return self.commands

    async def retry(self, principal: Principal, generation_id: str) -> Generation:
        """Queue a failed or cancelled generation again, with fresh attempts.

        Only a generation whose price was once accepted can be retried; one
        cancelled before confirmation must be created again. A retry is paid
        again, so it must fit the daily spend cap like a confirm.
        """
        async with self.store.transaction() as tx:
            generation, job = await self._locked_pair(tx, principal, generation_id)
            next_status(generation.status, Action.RETRY)
            if job is None:
                raise NotConfirmed(
                    "this generation was cancelled before its price was"
                    " accepted; create it again"
                )
            cost_usd = generation.cost_estimate.usd if generation.cost_estimate else 0
            await self._within_cap(tx, generation.user_id, cost_usd, utcnow())
            applied = await apply_command(tx, job, generation, Action.RETRY, Intent())
            generation = applied.generation
        if self.storage is not None:
            await discard_upload(
                self.storage, applied.abandoned, {"generation_id": generation.id}
            )
        if self.metrics is not None:
            self.metrics.spend_confirmed.inc(cost_usd)
        return generation

    async def override(
        self,
        principal: Principal,
        generation_id: str,
        status: Status,
        reason: str | None,
        error: ErrorBody | None,
    ) -> Generation:
        """The operator's status override, validated by the same table."""
        generation = await self.get(principal, generation_id)
        action = override_action(generation.status, status)
        problems: list[dict[str, str]] = []
        if reason is not None:
            reason, found = check_text("$.reason", reason, max_chars=500)
            problems += found
        info = None
        if error is not None:
            if status is not Status.FAILED:
                problems.append(
                    {"path": "$.error", "message": "only allowed with status failed"}
                )
            message, found = check_text("$.error.message", error.message, max_chars=500)
            problems += found
            info = ErrorInfo(
                code=error.code, message=message, retryable=error.retryable
            )
        if problems:
            raise ValidationFailed(problems)
        if action is Action.FAIL and info is None:
            info = default_failure(reason)
        log.info(
            "status override",
            extra={
                "action": "generation.override",
                "generation_id": generation.id,
                "user_id": principal.user_id,
                "from_status": str(generation.status),
                "to_status": str(status),
            },
        )
        return await self._commands().override(generation, status, reason, info)
