"""The transition table and the progress rules."""

from __future__ import annotations

import pytest

from nimu_rt.errors import InvalidTransition
from nimu_rt.lifecycle import (
    NON_TERMINAL,
    TERMINAL,
    Action,
    Status,
    action_for,
    generating_progress,
    next_status,
    uploading_progress,
)

HAPPY_PATH = [
    (Status.PENDING_CLARIFICATION, Action.CLARIFY, Status.AWAITING_CONFIRMATION),
    (Status.AWAITING_CONFIRMATION, Action.CONFIRM, Status.QUEUED),
    (Status.QUEUED, Action.DISPATCH, Status.SUBMITTING),
    (Status.SUBMITTING, Action.ACCEPT, Status.GENERATING),
    (Status.GENERATING, Action.READY, Status.UPLOADING),
    (Status.UPLOADING, Action.STORE, Status.COMPLETED),
]


@pytest.mark.parametrize(("current", "action", "target"), HAPPY_PATH)
def test_the_happy_path(current, action, target):
    assert next_status(current, action) is target


@pytest.mark.parametrize("current", sorted(NON_TERMINAL))
def test_any_non_terminal_status_can_fail_or_be_cancelled(current):
    assert next_status(current, Action.FAIL) is Status.FAILED
    assert next_status(current, Action.CANCEL) is Status.CANCELLED


@pytest.mark.parametrize("current", [Status.SUBMITTING, Status.GENERATING,
                                     Status.UPLOADING])
def test_running_statuses_requeue_on_retryable_errors(current):
    assert next_status(current, Action.REQUEUE) is Status.QUEUED


@pytest.mark.parametrize("current", sorted(TERMINAL))
@pytest.mark.parametrize("action", [a for a in Action if a is not Action.RETRY])
def test_terminal_statuses_accept_only_retry(current, action):
    with pytest.raises(InvalidTransition) as caught:
        next_status(current, action)
    assert caught.value.extra["currentStatus"] == current
    assert caught.value.status == 409


def test_retry_only_from_failed_or_cancelled():
    assert next_status(Status.FAILED, Action.RETRY) is Status.QUEUED
    assert next_status(Status.CANCELLED, Action.RETRY) is Status.QUEUED
    with pytest.raises(InvalidTransition, match="cannot retry .* completed"):
        next_status(Status.COMPLETED, Action.RETRY)


def test_skipping_a_step_is_refused():
    with pytest.raises(InvalidTransition) as caught:
        next_status(Status.QUEUED, Action.STORE)
    assert caught.value.extra["allowedFrom"] == ["uploading"]


def test_overrides_find_the_table_row():
    assert action_for(Status.GENERATING, Status.FAILED) is Action.FAIL
    assert action_for(Status.GENERATING, Status.QUEUED) is Action.REQUEUE
    assert action_for(Status.CANCELLED, Status.QUEUED) is Action.RETRY
    with pytest.raises(InvalidTransition) as caught:
        action_for(Status.QUEUED, Status.COMPLETED)
    assert caught.value.extra["currentStatus"] == "queued"


def test_generating_progress_rises_and_never_reaches_the_end():
    values = [generating_progress(t, typical_s=60) for t in range(0, 600, 5)]
    assert values[0] == 5
    assert values == sorted(values)
    assert max(values) < 85
    assert generating_progress(60, typical_s=60) == 5 + 72


def test_uploading_progress_by_bytes():
    assert uploading_progress(0, 100) == 85
    assert uploading_progress(50, 100) == 91
    assert uploading_progress(100, 100) == 98
    assert uploading_progress(10, None) == 85
