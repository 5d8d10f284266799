"""The storage interface: where finished videos and their thumbnails live.

Two implementations: R2 through its S3 API (production) and local files
under the data directory (the embedded default). Job actors stream a Veo 3
download into :meth:`Storage.upload_stream`; routes sign URLs for playback.

Uploads are resumable. While streaming, the backend reports an
:class:`UploadState` after every finished part; the caller persists it, and
after a crash passes it back so the upload continues from the first missing
part instead of starting over.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable

from msgspec import Struct

# Opens the source at a byte offset: the upload re-reads from there on resume.
SourceOpener = Callable[[int], AsyncIterator[bytes]]
StateCallback = Callable[["UploadState"], Awaitable[None]]
ProgressCallback = Callable[[int], None]


class PartRecord(Struct, frozen=True, kw_only=True, rename="camel"):
    """One finished part of a multipart upload."""

    number: int
    etag: str
    size_bytes: int


class UploadState(Struct, frozen=True, kw_only=True, rename="camel"):
    """Everything needed to resume an interrupted upload; JSON-serialisable."""

    key: str
    content_type: str
    # None until the backend started a multipart upload (small objects use a
    # single put and never have one).
    upload_id: str | None = None
    part_size_bytes: int
    parts: tuple[PartRecord, ...] = ()

    @property
    def bytes_done(self) -> int:
        return sum(p.size_bytes for p in self.parts)


class StoredObject(Struct, frozen=True, kw_only=True, rename="camel"):
    """A completed upload."""

    key: str
    size_bytes: int
    content_type: str
    sha256: str
    etag: str | None = None


class PresignedUpload(Struct, frozen=True, kw_only=True, rename="camel"):
    """A URL a browser may PUT one object to, with the headers it must send."""

    key: str
    url: str
    method: str = "PUT"
    headers: dict[str, str]
    expires_at: dt.datetime
    max_bytes: int


class Storage(abc.ABC):
    """A bucket of objects addressed by key."""

    kind: str

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Release clients and connections; safe to call twice."""

    @abc.abstractmethod
    async def upload_stream(
        self,
        key: str,
        open_source: SourceOpener,
        *,
        content_type: str,
        state: UploadState | None = None,
        on_state: StateCallback | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> StoredObject:
        """Copy the bytes ``open_source(offset)`` yields into object ``key``.

        Memory stays bounded whatever the size. With ``state`` from an
        interrupted run, continues after its last finished part. On a final
        failure the partial upload is aborted and nothing is visible.
        """

    @abc.abstractmethod
    async def abort_upload(self, state: UploadState) -> None:
        """Discard an unfinished multipart upload (idempotent)."""

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store a small object (e.g. a thumbnail) in one request."""

    @abc.abstractmethod
    async def read_bytes(self, key: str, *, max_bytes: int) -> bytes:
        """Read a small object whole (e.g. a reference image)."""

    @abc.abstractmethod
    async def delete(self, keys: list[str]) -> None:
        """Delete objects; missing keys are not an error."""

    @abc.abstractmethod
    async def signed_url(self, key: str, *, expires_s: int) -> str:
        """A URL that serves ``key`` (with Range) until it expires."""

    @abc.abstractmethod
    async def presigned_put(
        self, key: str, *, content_type: str, max_bytes: int, expires_s: int
    ) -> PresignedUpload:
        """A URL a browser can upload one object to."""
