"""The Veo 3 client interface, shared by the Gemini and Vertex providers.

A generation is a long-running operation: :meth:`Veo3Client.generate_video`
starts it and returns its name, :meth:`Veo3Client.poll` reports on it, and
:meth:`Veo3Client.download` streams the finished video. Neither Google API
offers a way to cancel an operation: cancelling a job means the caller stops
polling and discards the result, and Google may still bill for it.

Every failure reaches callers as :class:`~nimu_rt.errors.Veo3Retryable`
(try again later) or :class:`~nimu_rt.errors.Veo3Final` (will not change),
never as an httpx error.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from msgspec import Struct

from nimu_rt.errors import Veo3Error
from nimu_rt.models import CostEstimate, GenerationOptions

if TYPE_CHECKING:
    from nimu_rt.metrics import Metrics


class ImageInput(Struct, frozen=True, kw_only=True):
    """A first frame for image-to-video."""

    data: bytes
    mime_type: str


class VideoRef(Struct, frozen=True, kw_only=True):
    """Where a finished video can be fetched from.

    Exactly one of ``uri`` (an HTTP(S) download URL, or ``gs://`` on Vertex)
    and ``data`` (bytes returned inline by Vertex) is set. Not persisted:
    after a restart, polling the operation again yields it again.
    """

    uri: str | None = None
    data: bytes | None = None
    mime_type: str = "video/mp4"


class Running(Struct, frozen=True, kw_only=True, tag="running"):
    """The operation has not finished."""

    name: str


class Succeeded(Struct, frozen=True, kw_only=True, tag="succeeded"):
    """The operation finished with a video."""

    name: str
    video: VideoRef


class Failed(Struct, frozen=True, kw_only=True, tag="failed"):
    """The operation finished without a video (error or safety filter)."""

    name: str
    error: Veo3Error


PollResult = Running | Succeeded | Failed


class Veo3Client(abc.ABC):
    """One Veo 3 provider, reached over HTTP with timeouts and retries."""

    provider: str
    # Seconds a generation usually takes on this provider, for progress
    # estimates: Veo 3 reports no percentage.
    typical_generation_s: float
    # Where calls are counted, when the app set it.
    metrics: Metrics | None = None

    @abc.abstractmethod
    async def generate_video(
        self,
        prompt: str,
        options: GenerationOptions,
        *,
        image: ImageInput | None = None,
    ) -> str:
        """Start a (paid) generation; return the operation name.

        The caller must persist the name before waiting on it: it is the only
        handle on work Google bills for.
        """

    @abc.abstractmethod
    async def poll(self, operation_name: str) -> PollResult:
        """The operation's current state (one request, retried if transient)."""

    @abc.abstractmethod
    def download(self, video: VideoRef, *, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream the video's bytes from ``offset`` on, in chunks.

        Never holds the whole file in memory (unless Vertex returned it
        inline). Resuming from ``offset`` uses an HTTP Range request.
        """

    async def video_size(self, video: VideoRef) -> int | None:
        """The video's size in bytes when the provider tells it cheaply.

        Used only to report upload progress; None when unknown.
        """
        return len(video.data) if video.data is not None else None

    @abc.abstractmethod
    def validate_prompt(self, prompt: str, options: GenerationOptions) -> list[str]:
        """Problems Veo 3 would refuse the request for; empty when none."""

    @abc.abstractmethod
    def estimate_cost(self, options: GenerationOptions) -> CostEstimate:
        """The price of ``options`` from the configured price table."""

    @abc.abstractmethod
    def next_poll_delay_s(self, polls_so_far: int) -> float:
        """How long to wait before the next poll; grows towards a maximum."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close connections; safe to call twice."""
