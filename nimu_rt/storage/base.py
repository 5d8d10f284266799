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
from pathlib import Path

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


class ObjectInfo(Struct, frozen=True, kw_only=True, rename="camel"):
    """What a listing or a HEAD request tells about a stored object."""

    key: str
    size_bytes: int
    modified_at: dt.datetime
    content_type: str | None = None
    # From the object's metadata; None on listings, which do not carry it.
    sha256: str | None = None
    etag: str | None = None


class PendingUpload(Struct, frozen=True, kw_only=True, rename="camel"):
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated_at: dt.datetime


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

    # -- reading, listing and cleaning up ------------------------------------

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Size, type and checksum of ``key``; None when it does not exist."""

    @abc.abstractmethod
    def read_stream(self, key: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream the bytes of ``key`` from ``offset`` on, in chunks.

        Raises NotFound when the object does not exist.
        """

    @abc.abstractmethod
    def iter_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abc.abstractmethod
    async def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Unfinished multipart uploads under ``prefix``, oldest first."""

    @abc.abstractmethod
    async def abort_pending(self, upload: PendingUpload) -> None:
        """Abort one unfinished upload from :meth:`list_uploads` (idempotent)."""

    async def abort_stale_uploads(
        self, *, older_than: dt.datetime, prefix: str = ""
    ) -> int:
        """Abort unfinished uploads started before ``older_than``; say how many.

        An upload a job is still writing must be younger than the cutoff, or
        that job's upload fails (and is retried from the start).
        """
        stale = [
            u for u in await self.list_uploads(prefix) if u.initiated_at < older_than
        ]
        for upload in stale:
            await self.abort_pending(upload)
        return len(stale)

    # -- links -----------------------------------------------------------------

    def public_url(self, key: str) -> str | None:
        """A permanent public URL of ``key``, when the bucket is served publicly.

        None unless a public base URL is configured.
        """
        return None

    async def playback_url(
        self, key: str, *, expires_s: int
    ) -> tuple[str, dt.datetime | None]:
        """A URL to play ``key`` and when it expires (None: it does not).

        The public URL when there is one, else a signed URL.
        """
        public = self.public_url(key)
        if public is not None:
            return public, None
        url = await self.signed_url(key, expires_s=expires_s)
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_s)
        return url, expires.replace(microsecond=0)

    def local_path(self, key: str) -> Path | None:
        """The file holding ``key`` on this machine, if the backend has one."""
        return None
