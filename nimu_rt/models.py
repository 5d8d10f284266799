"""The records of the service and their JSON form.

These msgspec structs are both what the store keeps and what the API sends:
field names are snake_case in Python and camelCase on the wire (the
consumers are TypeScript). Request bodies live in :mod:`nimu_rt.api.schemas`;
this module holds the state the service owns.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Generic, Literal, TypeVar

import msgspec
from msgspec import Struct

from nimu_rt.lifecycle import Status

AspectRatio = Literal["16:9", "9:16"]
Resolution = Literal["720p", "1080p"]
DurationSeconds = Literal[4, 6, 8]


class Record(Struct, rename="camel", kw_only=True, omit_defaults=False):
    """Base of every stored and wire record."""


class GenerationOptions(Record, kw_only=True):
    """What Veo 3 is asked for, with every default already applied."""

    model: str
    aspect_ratio: AspectRatio = "16:9"
    resolution: Resolution = "720p"
    duration_seconds: DurationSeconds = 8
    negative_prompt: str | None = None
    generate_audio: bool = True
    # Storage key of an uploaded first frame (image-to-video).
    reference_image_key: str | None = None


class Question(Record, kw_only=True):
    """A clarifying question; ``id`` is stable across versions."""

    id: str
    text: str
    hint: str | None = None


class Clarification(Record, kw_only=True):
    """The questions asked about a prompt and the answers given."""

    questions: list[Question] = msgspec.field(default_factory=list)
    answers: dict[str, str] = msgspec.field(default_factory=dict)


class CostEstimate(Record, kw_only=True):
    """The price shown before confirming, with the numbers it came from."""

    usd: float
    currency: Literal["USD"] = "USD"
    model: str
    resolution: Resolution
    duration_seconds: int
    generate_audio: bool
    usd_per_second: float


class VideoInfo(Record, kw_only=True):
    """The stored video of a completed generation.

    Signed URLs are not kept here: they are made on request by the storage
    routes, because they expire.
    """

    key: str
    content_type: str = "video/mp4"
    size_bytes: int = 0
    sha256: str | None = None
    duration_seconds: float | None = None
    width: int | None = None
    height: int | None = None
    codec: str | None = None
    frame_rate: float | None = None
    has_audio: bool | None = None
    thumbnail_key: str | None = None
    # Set when the user deleted the video; the generation record stays.
    deleted_at: dt.datetime | None = None


class ErrorInfo(Record, kw_only=True):
    """Why a generation failed, in words a person can act on."""

    code: str
    message: str
    retryable: bool = False
    # Extra facts, e.g. {"reasons": [...]} for a safety-filtered result.
    details: dict[str, Any] | None = None


class Generation(Record, kw_only=True):
    """One requested video: its request, price, status, progress and result."""

    id: str
    user_id: str
    status: Status
    prompt: str
    final_prompt: str | None = None
    options: GenerationOptions
    clarification: Clarification = msgspec.field(default_factory=Clarification)
    cost_estimate: CostEstimate | None = None
    job_id: str | None = None
    progress: int = 0
    queue_position: int | None = None
    estimated_start_at: dt.datetime | None = None
    video: VideoInfo | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    seq: int = 0
    conversation_id: str | None = None
    created_at: dt.datetime
    updated_at: dt.datetime


class Event(Record, kw_only=True):
    """One entry of a generation's event log.

    ``seq`` is gapless and strictly increasing per generation, starting at 1.
    ``data`` holds the generation fields the change set (camelCase), so a
    client can apply it to its last snapshot.
    """

    generation_id: str
    user_id: str
    seq: int
    type: str
    data: dict[str, Any]
    at: dt.datetime


T = TypeVar("T")


class Page(Record, Generic[T], kw_only=True):
    """One page of a list; ``nextCursor`` fetches the next (None: the last)."""

    items: list[T]
    next_cursor: str | None = None


def utcnow() -> dt.datetime:
    """Now, in UTC, to the millisecond (what JSON clients can represent)."""
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    """JSON bytes of any record or builtin value."""
    return _encoder.encode(value)


class EventType:
    """The ``type`` of an :class:`Event`; clients branch on these words."""

    CREATED = "created"  # data: the whole generation
    STATUS = "status"  # data: status, previousStatus and what changed with it
    PROGRESS = "progress"  # data: progress
    QUEUE = "queue"  # data: queuePosition, estimatedStartAt
    UPDATED = "updated"  # data: other fields that changed, e.g. video
