"""Streaming uploads: a byte stream into one object, in equal parts.

:func:`upload_stream` is the engine both backends run; a backend supplies
the six requests of a multipart upload as a :class:`MultipartTarget`.

How it goes:

1. The source is read into a buffer of exactly ``part_size_bytes``. If the
   stream ends inside the first buffer, the object is written with one PUT.
2. Otherwise a multipart upload is created (Content-Type set there, since
   R2 does not infer it for multipart objects) and every full buffer becomes
   a part. Every part but the last has the same size, which R2 requires.
3. At most ``max_parallel_parts`` parts are in flight. The next buffer is
   read while they upload, and reading waits for a free slot once a buffer
   is full, so at most ``max_parallel_parts + 1`` buffers exist: peak memory
   is about ``part_size_bytes x (max_parallel_parts + 1)``.
4. Each part is sent with its Content-MD5 and the ETag returned must be that
   MD5. A part is retried on transient errors with exponential backoff.
   After each part, the caller receives the new :class:`UploadState`.
5. A SHA-256 of the whole object is computed in order while reading, and
   written to the object's metadata when the upload completes.

Failure: an error that retries did not cure aborts the multipart upload, so
nothing partial becomes visible, and is raised. Cancellation (shutdown, a
lost lease) does not abort: the caller's last saved state names the upload,
and passing it back resumes it.

Resume and the SHA-256: hashlib cannot save a hash's inner state, so the
hash of the parts uploaded before a crash cannot be carried over. On resume
the source is therefore reopened at byte 0. Parts the backend already holds
(asked with ListParts, so a part that finished after the last saved state
also counts) are read and hashed but not sent again, once the MD5 of the
bytes read equals the part's ETag; a part whose bytes differ (the source
changed) is sent again, replacing the old one. Sending resumes at the first
missing part. The cost is downloading the finished prefix again; the gain
is a correct whole-object SHA-256 and a check that the prefix still matches.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import functools
import hashlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from msgspec import Struct

from nimu_rt.errors import NimuError, StorageError, StorageRetryable
from nimu_rt.storage.base import (
    PartRecord,
    ProgressCallback,
    SourceOpener,
    StateCallback,
    StoredObject,
    UploadState,
)
from nimu_rt.storage.keys import check_key

if TYPE_CHECKING:
    from nimu_rt.metrics import Metrics

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PARTS = 10_000  # R2 and S3
_ABORT_TIMEOUT_S = 30.0


class UploadGone(StorageRetryable):
    """The multipart upload no longer exists (aborted or expired).

    Retrying the request cannot help; starting the upload again can.
    """

    code = "storage_upload_gone"


class RetryPolicy(Struct, frozen=True, kw_only=True):
    """How often and how patiently a storage request is tried."""

    attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def delay_s(self, attempt: int) -> float:
        """Backoff before try ``attempt + 1``: exponential, capped, jittered."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        # Full jitter in the upper half: parts of many uploads that failed
        # together (an overloaded bucket) do not come back together.
        return ceiling * random.uniform(0.5, 1.0)


class UploadOptions(Struct, frozen=True, kw_only=True):
    """The tunables of :func:`upload_stream` (from ``[storage]``)."""

    part_size_bytes: int
    max_parallel_parts: int = 4
    retry: RetryPolicy = RetryPolicy()
    source_attempts: int = 3
    # Longest wait for the next chunk of the source before it counts as
    # dropped and is reopened.
    source_read_timeout_s: float = 60.0


async def with_retries(
    what: str, call: Callable[[], Awaitable[T]], policy: RetryPolicy, **ids: Any
) -> T:
    """Run ``call``; try again after :class:`StorageRetryable`, up to the policy.

    Other errors, :class:`UploadGone` and cancellation end it at once. Each
    retry is logged as a warning and the final failure as an error, once.
    """
    attempt = 1
    while True:
        try:
            return await call()
        except UploadGone:
            raise
        except StorageRetryable as exc:
            if attempt >= policy.attempts:
                log.error(
                    "%s failed after %s attempts: %s",
                    what,
                    attempt,
                    exc.detail,
                    extra={"action": "storage.gave_up", "attempts": attempt, **ids},
                )
                raise
            delay_s = policy.delay_s(attempt)
            log.warning(
                "%s failed (attempt %s of %s), retrying in %.2fs: %s",
                what,
                attempt,
                policy.attempts,
                delay_s,
                exc.detail,
                extra={"action": "storage.retry", "attempt": attempt, **ids},
            )
            await asyncio.sleep(delay_s)
            attempt += 1


class MultipartTarget(abc.ABC):
    """The requests of an upload, as a backend makes them: one try each.

    Implementations translate their errors into the nimu_rt tree
    (:class:`StorageRetryable` for transient ones, :class:`UploadGone` for a
    missing upload); :func:`upload_stream` adds retries, ordering and checks.
    """

    # Where uploads are counted and timed, when the app set it.
    metrics: Metrics | None = None

    @abc.abstractmethod
    async def create_upload(self, key: str, *, content_type: str) -> str:
        """Start a multipart upload; return its id."""

    @abc.abstractmethod
    async def uploaded_parts(
        self, key: str, upload_id: str
    ) -> dict[int, PartRecord] | None:
        """The parts the backend holds for an upload; None if it is gone."""

    @abc.abstractmethod
    async def upload_part(
        self, key: str, upload_id: str, number: int, body: memoryview, md5: bytes
    ) -> str:
        """Send one part with its MD5; return the ETag, without quotes."""

    @abc.abstractmethod
    async def complete_upload(
        self,
        key: str,
        upload_id: str,
        parts: list[PartRecord],
        *,
        content_type: str,
        sha256: str,
    ) -> str | None:
        """Join the parts into the object, with ``sha256`` in its metadata."""

    @abc.abstractmethod
    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Discard an upload and its parts; a missing upload is not an error."""

    @abc.abstractmethod
    async def put_object(
        self, key: str, body: memoryview, *, content_type: str, sha256: str, md5: bytes
    ) -> str | None:
        """Write a whole (small) object in one request; return its ETag."""


async def upload_stream(
    target: MultipartTarget,
    key: str,
    open_source: SourceOpener,
    *,
    content_type: str,
    options: UploadOptions,
    state: UploadState | None = None,
    on_state: StateCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> StoredObject:
    """Copy ``open_source(0)``'s bytes into object ``key`` (see module doc).

    ``on_state`` is awaited with a new :class:`UploadState` when the upload
    is created and after every part; ``on_progress`` gets the bytes stored
    so far. An exception from either stops the upload without aborting it.
    Resuming with ``state`` keeps its part size and Content-Type, whatever
    ``options`` and ``content_type`` say, because R2 requires equal parts.
    """
    check_key(key)
    upload = _Upload(
        target, key, open_source, content_type, options, on_state, on_progress
    )
    metrics = target.metrics
    if metrics is None:
        return await upload.run(state)
    started = time.perf_counter()
    try:
        stored = await upload.run(state)
    except asyncio.CancelledError:
        raise
    except BaseException:
        metrics.upload_finished("failed", 0, time.perf_counter() - started)
        raise
    metrics.upload_finished(
        "completed", stored.size_bytes, time.perf_counter() - started
    )
    return stored


class _CallerStopped(Exception):
    """``on_state`` or ``on_progress`` raised; carries what they raised."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(repr(error))
        self.error = error


class _Upload:
    """One run of :func:`upload_stream`."""

    def __init__(
        self,
        target: MultipartTarget,
        key: str,
        open_source: SourceOpener,
        content_type: str,
        options: UploadOptions,
        on_state: StateCallback | None,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.target = target
        self.key = key
        self.content_type = content_type
        self.options = options
        self.part_size = options.part_size_bytes
        self.on_state = on_state
        self.on_progress = on_progress
        self.source = _Source(
            open_source,
            attempts=options.source_attempts,
            read_timeout_s=options.source_read_timeout_s,
            key=key,
        )
        self.sha256 = hashlib.sha256()
        self.upload_id: str | None = None
        # Parts already held by the backend when resuming, by number.
        self.known: dict[int, PartRecord] = {}
        # Parts of this object confirmed in this run (sent or verified).
        self.done: dict[int, PartRecord] = {}
        self.bytes_done = 0
        self.parts_sent: list[int] = []
        self._state_lock = asyncio.Lock()

    def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return with_retries(
            what,
            call,
            self.options.retry,
            key=self.key,
            upload_id=self.upload_id,
        )

    async def run(self, state: UploadState | None) -> StoredObject:
        try:
            await self._resume_from(state)
            return await self._copy()
        except _CallerStopped as stopped:
            # The caller asked to stop (e.g. its lease is gone and another
            # instance may be resuming this very upload): aborting would
            # destroy that instance's work.
            raise stopped.error from None
        except asyncio.CancelledError:
            raise
        except BaseException:
            if self.upload_id is not None:
                await self._abort_quietly()
            raise
        finally:
            await self.source.aclose()

    async def _resume_from(self, state: UploadState | None) -> None:
        if state is None:
            return
        if state.key != self.key:
            raise StorageError(
                f"the saved upload state is for {state.key!r}, not {self.key!r}"
            )
        if state.upload_id is None:
            # A one-request upload that did not finish: nothing to keep.
            return
        upload_id = state.upload_id
        listed = await self._retry(
            "list uploaded parts",
            lambda: self.target.uploaded_parts(self.key, upload_id),
        )
        if listed is None:
            log.info(
                "upload %s of %s is gone; starting over",
                upload_id,
                self.key,
                extra={"action": "storage.upload.restart", "key": self.key},
            )
            return
        self.upload_id = upload_id
        self.part_size = state.part_size_bytes
        self.content_type = state.content_type
        self.known = listed
        log.info(
            "resuming upload %s of %s: %s parts held",
            upload_id,
            self.key,
            len(listed),
            extra={
                "action": "storage.upload.resume",
                "key": self.key,
                "upload_id": upload_id,
            },
        )

    async def _copy(self) -> StoredObject:
        # 1. The first buffer decides between one PUT and a multipart upload.
        #    It grows with what arrives: zeroing a whole part up front cost
        #    a small video more than the rest of its upload.
        buffer = await self.source.read_up_to(self.part_size)
        size = len(buffer)
        last = size < self.part_size or await self.source.at_end()
        if last and self.upload_id is None:
            return await self._put_whole(memoryview(buffer)[:size])

        # 2. Multipart: create (or keep the resumed upload) and say so, so
        # that a crash from here on leaves a state naming the upload.
        if self.upload_id is None:
            self.upload_id = await self._retry(
                "create multipart upload",
                lambda: self.target.create_upload(
                    self.key, content_type=self.content_type
                ),
            )
            await self._publish_state()

        # 3. Parts: read the next buffer while earlier ones upload.
        slots = asyncio.Semaphore(self.options.max_parallel_parts)
        number = 1
        try:
            async with asyncio.TaskGroup() as tasks:
                while True:
                    if number > MAX_PARTS:
                        raise StorageError(
                            f"{self.key} needs more than {MAX_PARTS} parts of"
                            f" {self.part_size} bytes"
                        )
                    view = memoryview(buffer)[:size]
                    md5 = await asyncio.to_thread(self._hash_part, view)
                    if self._already_held(number, size, md5):
                        await self._part_done(PartRecord(
                            number=number, etag=md5.hex(), size_bytes=size
                        ))
                    else:
                        # Bounded memory: wait for a slot before reading on.
                        await slots.acquire()
                        tasks.create_task(self._send_part(number, view, md5, slots))
                    del view
                    if last:
                        break
                    buffer = bytearray(self.part_size)
                    size = await self.source.fill(buffer)
                    last = size < self.part_size or await self.source.at_end()
                    number += 1
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

        # 4. Our own check of R2's rule before asking to complete.
        parts = [self.done[n] for n in sorted(self.done)]
        check_part_sizes(parts, self.part_size)
        total = sum(p.size_bytes for p in parts)
        sha256 = self.sha256.hexdigest()
        upload_id = self.upload_id
        etag = await self._retry(
            "complete multipart upload",
            lambda: self.target.complete_upload(
                self.key,
                upload_id,
                parts,
                content_type=self.content_type,
                sha256=sha256,
            ),
        )
        log.info(
            "stored %s: %s bytes in %s parts (%s sent now)",
            self.key,
            total,
            len(parts),
            len(self.parts_sent),
            extra={
                "action": "storage.upload.done",
                "key": self.key,
                "upload_id": upload_id,
            },
        )
        return StoredObject(
            key=self.key,
            size_bytes=total,
            content_type=self.content_type,
            sha256=sha256,
            etag=etag,
        )

    def _hash_part(self, view: memoryview) -> bytes:
        # Runs in a thread (hashlib releases the GIL on large buffers); the
        # caller awaits it before reading on, so the whole-object hash still
        # sees the bytes in order.
        self.sha256.update(view)
        return hashlib.md5(view, usedforsecurity=False).digest()

    def _already_held(self, number: int, size: int, md5: bytes) -> bool:
        held = self.known.get(number)
        return held is not None and held.size_bytes == size and held.etag == md5.hex()

    async def _put_whole(self, body: memoryview) -> StoredObject:
        md5 = await asyncio.to_thread(self._hash_part, body)
        sha256 = self.sha256.hexdigest()
        etag = await self._retry(
            "put object",
            lambda: self.target.put_object(
                self.key,
                body,
                content_type=self.content_type,
                sha256=sha256,
                md5=md5,
            ),
        )
        if etag is not None and etag != md5.hex():
            raise StorageError(
                f"{self.key}: the ETag {etag} returned is not the MD5 of the"
                f" bytes sent ({md5.hex()})"
            )
        self.bytes_done = len(body)
        self._report_progress()
        return StoredObject(
            key=self.key,
            size_bytes=len(body),
            content_type=self.content_type,
            sha256=sha256,
            etag=etag,
        )

    async def _send_part(
        self, number: int, body: memoryview, md5: bytes, slots: asyncio.Semaphore
    ) -> None:
        upload_id = self.upload_id
        assert upload_id is not None
        size = len(body)
        call = functools.partial(self._try_part, upload_id, number, body, md5)
        try:
            etag = await self._retry(f"upload part {number}", call)
            self.parts_sent.append(number)
        finally:
            # Our last references to the buffer go here, before on_state
            # runs: the memory is freed when the slot is.
            del body, call
            slots.release()
        await self._part_done(PartRecord(number=number, etag=etag, size_bytes=size))

    async def _try_part(
        self, upload_id: str, number: int, body: memoryview, md5: bytes
    ) -> str:
        etag = await self.target.upload_part(self.key, upload_id, number, body, md5)
        if etag != md5.hex():
            # Content-MD5 already makes the backend refuse corrupted bytes; a
            # different ETag means something between us and it changed them,
            # which another try may not repeat.
            raise StorageRetryable(
                f"part {number}: the ETag {etag} returned is not the MD5 of"
                f" the bytes sent ({md5.hex()})"
            )
        return etag

    async def _part_done(self, record: PartRecord) -> None:
        async with self._state_lock:
            self.done[record.number] = record
            self.bytes_done += record.size_bytes
            await self._publish_state()
            self._report_progress()

    async def _publish_state(self) -> None:
        if self.on_state is None:
            return
        state = UploadState(
            key=self.key,
            content_type=self.content_type,
            upload_id=self.upload_id,
            part_size_bytes=self.part_size,
            parts=tuple(self.done[n] for n in sorted(self.done)),
        )
        try:
            await self.on_state(state)
        except Exception as exc:
            raise _CallerStopped(exc) from exc

    def _report_progress(self) -> None:
        if self.on_progress is None:
            return
        try:
            self.on_progress(self.bytes_done)
        except Exception as exc:
            raise _CallerStopped(exc) from exc

    async def _abort_quietly(self) -> None:
        upload_id = self.upload_id
        assert upload_id is not None
        try:
            # Not shielded: if we are cancelled while failing, the abort is
            # left to the bucket's lifecycle rule and the maintenance task
            # rather than to a task nobody owns.
            async with asyncio.timeout(_ABORT_TIMEOUT_S):
                await self._retry(
                    "abort multipart upload",
                    lambda: self.target.abort_multipart(self.key, upload_id),
                )
        except (NimuError, TimeoutError) as exc:
            log.warning(
                "could not abort upload %s of %s: %s",
                upload_id,
                self.key,
                exc,
                extra={"action": "storage.abort_failed", "key": self.key},
            )
        else:
            log.info(
                "aborted upload %s of %s",
                upload_id,
                self.key,
                extra={"action": "storage.upload.abort", "key": self.key},
            )


def check_part_sizes(parts: list[PartRecord], part_size_bytes: int) -> None:
    """Raise StorageError unless ``parts`` obey R2's multipart rules.

    Numbered 1..n without gaps; every part but the last exactly
    ``part_size_bytes``; the last no larger and not empty (unless alone).
    """
    numbers = [p.number for p in parts]
    if numbers != list(range(1, len(parts) + 1)):
        raise StorageError(f"parts are not numbered 1..{len(parts)}: {numbers}")
    for part in parts[:-1]:
        if part.size_bytes != part_size_bytes:
            raise StorageError(
                f"part {part.number} has {part.size_bytes} bytes; every part but"
                f" the last must have {part_size_bytes}"
            )
    if parts and not 0 < parts[-1].size_bytes <= part_size_bytes:
        raise StorageError(
            f"the last part has {parts[-1].size_bytes} bytes; it must have 1 to"
            f" {part_size_bytes}"
        )


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The error that failed a task group, not the cancellations it caused."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_error(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return group.exceptions[0]


class _Source:
    """Reads the source in order; reopens it where it broke off.

    A chunk that does not fit the current buffer is kept for the next one.
    A transient failure of the source (an error whose ``retryable`` is true,
    or no chunk within the read timeout) reopens it at the first byte not
    yet read, up to ``attempts`` opens in a row without progress.
    """

    def __init__(
        self,
        open_source: SourceOpener,
        *,
        attempts: int,
        read_timeout_s: float,
        key: str,
    ) -> None:
        self._open = open_source
        self._attempts = attempts
        self._read_timeout_s = read_timeout_s
        self._key = key
        self._stream: AsyncIterator[bytes] | None = None
        self._pending = memoryview(b"")
        self._ended = False
        self.offset = 0  # bytes handed out so far
        self.opened_at: list[int] = []

    async def fill(self, buffer: bytearray) -> int:
        """Fill ``buffer`` from the source; return the bytes written.

        Fewer than ``len(buffer)`` only at the end of the source.
        """
        view = memoryview(buffer)
        filled = 0
        while filled < len(view):
            if not self._pending and not await self._next_chunk():
                break
            n = min(len(self._pending), len(view) - filled)
            view[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
            self.offset += n
        return filled

    async def read_up_to(self, limit: int) -> bytearray:
        """The next ``limit`` bytes (fewer only at the end of the source).

        Unlike :meth:`fill`, the buffer is only as large as what came.
        """
        buffer = bytearray()
        while len(buffer) < limit:
            if not self._pending and not await self._next_chunk():
                break
            n = min(len(self._pending), limit - len(buffer))
            buffer += self._pending[:n]
            self._pending = self._pending[n:]
            self.offset += n
        return buffer

    async def at_end(self) -> bool:
        """True when the source has no more bytes (reads ahead one chunk)."""
        return not self._pending and not await self._next_chunk()

    async def _next_chunk(self) -> bool:
        failures = 0
        while not self._ended:
            if self._stream is None:
                self.opened_at.append(self.offset)
                self._stream = self._open(self.offset)
            try:
                async with asyncio.timeout(self._read_timeout_s):
                    chunk = await anext(self._stream)
            except StopAsyncIteration:
                self._ended = True
                await self.aclose()
                return False
            except (TimeoutError, NimuError) as exc:
                retryable = isinstance(exc, TimeoutError) or getattr(
                    exc, "retryable", False
                )
                failures += 1
                if not retryable or failures >= self._attempts:
                    raise
                log.warning(
                    "source of %s broke off at byte %s, reopening: %s",
                    self._key,
                    self.offset,
                    exc,
                    extra={"action": "storage.source_retry", "key": self._key},
                )
                await self.aclose()
                continue
            if chunk:
                self._pending = memoryview(chunk)
                return True
        return False

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        closer = getattr(stream, "aclose", None)
        if closer is not None:
            await closer()


def multipart_etag(parts: list[PartRecord]) -> str:
    """The ETag R2 and S3 give an object completed from ``parts``."""
    joined = b"".join(bytes.fromhex(p.etag) for p in parts)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(parts)}"


def content_md5(md5: bytes) -> str:
    """The Content-MD5 header value of a digest."""
    return base64.b64encode(md5).decode()
