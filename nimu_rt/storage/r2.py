"""Cloudflare R2 through its S3 API, with aiobotocore.

One client per process, opened at start and kept open: creating one loads
botocore's service models (slow, and blocking), and its aiohttp connection
pool is what lets parts upload in parallel. The client is set up the way R2
needs it:

- SigV4 and region ``auto``;
- ``request_checksum_calculation`` and ``response_checksum_validation`` at
  ``when_required``: botocore's default CRC32 checksums (sent as aws-chunked
  trailers over HTTPS) are refused by R2;
- operations for which botocore still insists on a CRC32 (PutBucketCors,
  PutBucketLifecycleConfiguration, DeleteObjects) send a Content-MD5
  instead, because R2 lists ``x-amz-sdk-checksum-algorithm`` as not
  implemented for them (unverified against real R2, see the README);
- botocore's own retries off: :mod:`nimu_rt.storage.upload` retries each
  request itself, with backoff, so tries do not multiply.

Every request is bounded by ``request_timeout_s`` and its errors are
translated here: transient ones (5xx, 429, timeouts, dropped connections,
including aiohttp errors that botocore does not wrap) become
:class:`StorageRetryable`, the rest :class:`StorageError`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from nimu_rt.config import StorageSettings
from nimu_rt.errors import (
    ConfigError,
    NimuError,
    NotFound,
    PayloadTooLarge,
    StorageError,
    StorageRetryable,
)
from nimu_rt.storage.base import (
    ObjectInfo,
    PartRecord,
    PendingUpload,
    PresignedUpload,
    ProgressCallback,
    SourceOpener,
    StateCallback,
    Storage,
    StoredObject,
    UploadState,
)
from nimu_rt.storage.keys import check_key
from nimu_rt.storage.upload import (
    MultipartTarget,
    RetryPolicy,
    UploadGone,
    UploadOptions,
    content_md5,
    multipart_etag,
    upload_stream,
    with_retries,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_PRESIGN_S = 7 * 24 * 3600  # R2's limit on presigned URLs
SHA256_META = "sha256"  # x-amz-meta-sha256
_READ_CHUNK_BYTES = 256 * 1024
_MAX_READ_BYTES = 64 * 1024
_DELETE_BATCH = 1000  # DeleteObjects' limit
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "TooManyRequests",
        # Content-MD5 did not match the bytes received: damaged on the way.
        "BadDigest",
    }
)
_TRANSIENT_READ_ERRORS = (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)
_CHECKSUM_REQUIRED_OPS = (
    "PutBucketCors",
    "PutBucketLifecycleConfiguration",
    "DeleteObjects",
)


def translate_error(exc: BaseException, what: str) -> NimuError:
    """The nimu_rt error for a botocore or aiohttp failure of ``what``."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message", "") or code
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        detail = f"{what}: {code or status} {message}".strip()
        translated: NimuError
        if code == "NoSuchUpload":
            translated = UploadGone(detail)
        elif code in ("NoSuchKey", "NotFound", "404"):
            translated = NotFound(detail)
        elif status >= 500 or status == 429 or code in _RETRYABLE_CODES:
            translated = StorageRetryable(detail)
        else:
            translated = StorageError(detail)
        # The S3 error code, for callers that expect a particular refusal.
        translated.s3_code = code  # type: ignore[attr-defined]
        return translated
    if isinstance(
        exc,
        (
            HTTPClientError,
            BotoConnectionError,
            aiohttp.ClientError,
            OSError,
            TimeoutError,
        ),
    ):
        return StorageRetryable(f"{what}: {type(exc).__name__}: {exc}")
    if isinstance(exc, BotoCoreError):
        return StorageError(f"{what}: {exc}")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


class _BodyReader(io.RawIOBase):
    """A seekable file over a memoryview, so a part is sent without copies.

    Given bytes, aiohttp hands the whole buffer to the transport, which on
    Python 3.11 copies what the socket did not take at once (twice); given a
    file, it sends 64 KiB at a time and waits for the socket to drain.
    botocore seeks back to re-read it for signing and on redirects.
    """

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        n = max(0, min(len(target), len(self._view) - self._pos, _MAX_READ_BYTES))
        target[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        # Short reads are allowed and keep the copies small: botocore asks
        # for 1 MiB at a time to hash the body when signing it.
        remaining = max(0, len(self._view) - self._pos)
        n = min(remaining if size < 0 else size, remaining, _MAX_READ_BYTES)
        data = bytes(self._view[self._pos : self._pos + n])
        self._pos += n
        return data

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}
        self._pos = max(0, base[whence] + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._view)

    def release(self) -> None:
        """Let go of the buffer.

        aiohttp's request and response objects form reference cycles that
        live until the garbage collector runs; dropping the view here frees
        the part's buffer as soon as the request is over, not then.
        """
        self._view = memoryview(b"")


def _md5_instead_of_crc32(request: Any, **_: Any) -> None:
    # botocore adds a CRC32 to operations whose model requires a checksum,
    # even with when_required; send the older Content-MD5 instead.
    for name in list(request.headers.keys()):
        lowered = name.lower()
        if lowered.startswith("x-amz-checksum-") or lowered == (
            "x-amz-sdk-checksum-algorithm"
        ):
            del request.headers[name]
    body = request.body
    if isinstance(body, bytes) and "Content-MD5" not in request.headers:
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        request.headers["Content-MD5"] = content_md5(digest)


def _strip_etag(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


class R2Storage(Storage, MultipartTarget):
    """Objects in one R2 bucket (or any S3 API that behaves like R2)."""

    kind = "r2"

    def __init__(self, settings: StorageSettings) -> None:
        missing = [
            name
            for name in ("endpoint_url", "bucket", "access_key_id", "secret_access_key")
            if not getattr(settings, name)
        ]
        if missing:
            raise ConfigError(
                "storage: backend r2 needs "
                + ", ".join(f"storage.{name}" for name in missing)
            )
        self.settings = settings
        self.bucket = settings.bucket
        self.retry = RetryPolicy(
            attempts=settings.request_attempts,
            base_delay_s=settings.retry_base_delay_s,
            max_delay_s=settings.retry_max_delay_s,
        )
        self.upload_options = UploadOptions(
            part_size_bytes=settings.part_size_bytes,
            max_parallel_parts=settings.max_parallel_parts,
            retry=self.retry,
            source_attempts=settings.source_attempts,
            source_read_timeout_s=settings.read_timeout_s,
        )
        self._stack: AsyncExitStack | None = None
        self._client: Any = None

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Create the process's S3 client; a second call does nothing.

        Does not contact R2: a bucket that cannot be reached shows up on the
        first request, not at start.
        """
        if self._client is not None:
            return
        s = self.settings
        config = AioConfig(
            region_name=s.region,
            signature_version="s3v4",
            s3={"addressing_style": s.addressing_style},
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=s.max_connections,
            connect_timeout=s.connect_timeout_s,
            read_timeout=s.read_timeout_s,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                endpoint_url=s.endpoint_url,
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                config=config,
            )
        )
        for op in _CHECKSUM_REQUIRED_OPS:
            client.meta.events.register(f"before-sign.s3.{op}", _md5_instead_of_crc32)
        self._stack, self._client = stack, client

    async def close(self) -> None:
        """Close the client and its connections; safe to call twice."""
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> Any:
        """The open aiobotocore S3 client (for bucket setup and tests)."""
        if self._client is None:
            raise StorageError("the R2 storage is not open")
        return self._client

    async def _call(self, what: str, operation: str, **params: Any) -> Any:
        """One S3 request, bounded in time, with its errors translated."""
        method: Callable[..., Awaitable[Any]] = getattr(self.client, operation)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                return await method(Bucket=self.bucket, **params)
        except (
            ClientError,
            BotoCoreError,
            aiohttp.ClientError,
            OSError,
            TimeoutError,
        ) as exc:
            raise translate_error(exc, what) from exc

    def _retried(self, what: str, call: Callable[[], Awaitable[T]], **ids: Any) -> Any:
        return with_retries(what, call, self.retry, **ids)

    async def request(self, operation: str, **params: Any) -> Any:
        """Any S3 operation on the bucket, retried and translated like ours.

        ``operation`` is the client method name, e.g. ``get_bucket_cors``.
        """
        return await self._retried(
            operation, lambda: self._call(operation, operation, **params)
        )

    # -- uploads -----------------------------------------------------------------

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
        """Stream into ``key`` as described in :mod:`nimu_rt.storage.upload`.

        The SHA-256 goes into the object's metadata with a copy of the object
        onto itself after completion (metadata is fixed when a multipart
        upload is created, before the hash is known). That copy is limited to
        5 GiB; beyond it, or if it fails, the hash is still returned but
        missing from the metadata, and a warning is logged.
        """
        return await upload_stream(
            self,
            key,
            open_source,
            content_type=content_type,
            options=self.upload_options,
            state=state,
            on_state=on_state,
            on_progress=on_progress,
        )

    async def abort_upload(self, state: UploadState) -> None:
        """Abort the multipart upload ``state`` names, if any (idempotent)."""
        upload_id = state.upload_id
        if upload_id is None:
            return
        await self._retried(
            "abort multipart upload",
            lambda: self.abort_multipart(state.key, upload_id),
            key=state.key,
        )

    async def create_upload(self, key: str, *, content_type: str) -> str:
        answer = await self._call(
            f"create multipart upload of {key}",
            "create_multipart_upload",
            Key=key,
            ContentType=content_type,
        )
        return str(answer["UploadId"])

    async def uploaded_parts(
        self, key: str, upload_id: str
    ) -> dict[int, PartRecord] | None:
        parts: dict[int, PartRecord] = {}
        marker = 0
        while True:
            try:
                answer = await self._call(
                    f"list parts of {key}",
                    "list_parts",
                    Key=key,
                    UploadId=upload_id,
                    PartNumberMarker=marker,
                    MaxParts=1000,
                )
            except UploadGone:
                return None
            for item in answer.get("Parts", []):
                number = int(item["PartNumber"])
                parts[number] = PartRecord(
                    number=number,
                    etag=_strip_etag(item["ETag"]) or "",
                    size_bytes=int(item["Size"]),
                )
            if not answer.get("IsTruncated"):
                return parts
            marker = int(answer["NextPartNumberMarker"])

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: memoryview, md5: bytes
    ) -> str:
        reader = _BodyReader(body)
        try:
            answer = await self._call(
                f"upload part {number} of {key}",
                "upload_part",
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=reader,
                ContentLength=len(body),
                ContentMD5=content_md5(md5),
            )
        finally:
            reader.release()
        return _strip_etag(answer.get("ETag")) or ""

    async def complete_upload(
        self,
        key: str,
        upload_id: str,
        parts: list[PartRecord],
        *,
        content_type: str,
        sha256: str,
    ) -> str | None:
        expected = multipart_etag(parts)
        try:
            answer = await self._call(
                f"complete multipart upload of {key}",
                "complete_multipart_upload",
                Key=key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [
                        {"ETag": f'"{p.etag}"', "PartNumber": p.number} for p in parts
                    ]
                },
            )
            etag = _strip_etag(answer.get("ETag"))
        except UploadGone:
            # A try whose answer was lost may have completed it already; the
            # object is ours if it carries the ETag these parts make.
            found = await self.head(key)
            if found is None or found.etag != expected:
                raise
            etag = found.etag
        size = sum(p.size_bytes for p in parts)
        return await self._write_sha256(key, size, content_type, sha256) or etag

    async def _write_sha256(
        self, key: str, size_bytes: int, content_type: str, sha256: str
    ) -> str | None:
        if size_bytes > 5 * 1024**3:
            log.warning(
                "%s is over 5 GiB; its SHA-256 is not written to its metadata",
                key,
                extra={"action": "storage.sha256_skipped", "key": key},
            )
            return None
        try:
            answer = await self._retried(
                f"write the SHA-256 of {key}",
                lambda: self._call(
                    f"copy {key} onto itself",
                    "copy_object",
                    Key=key,
                    CopySource={"Bucket": self.bucket, "Key": key},
                    MetadataDirective="REPLACE",
                    ContentType=content_type,
                    Metadata={SHA256_META: sha256},
                ),
                key=key,
            )
        except NimuError as exc:
            # The object is whole and correct; only the metadata is missing.
            log.warning(
                "%s is stored but its SHA-256 metadata could not be written: %s",
                key,
                exc,
                extra={"action": "storage.sha256_failed", "key": key},
            )
            return None
        return _strip_etag(answer.get("CopyObjectResult", {}).get("ETag"))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._call(
                f"abort multipart upload of {key}",
                "abort_multipart_upload",
                Key=key,
                UploadId=upload_id,
            )
        except UploadGone:
            pass

    async def put_object(
        self, key: str, body: memoryview, *, content_type: str, sha256: str, md5: bytes
    ) -> str | None:
        reader = _BodyReader(body)
        try:
            answer = await self._call(
                f"put {key}",
                "put_object",
                Key=key,
                Body=reader,
                ContentLength=len(body),
                ContentMD5=content_md5(md5),
                ContentType=content_type,
                Metadata={SHA256_META: sha256},
            )
        finally:
            reader.release()
        return _strip_etag(answer.get("ETag"))

    # -- small objects -------------------------------------------------------------

    async def put_bytes(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store ``data`` in one PUT, with its SHA-256 in the metadata."""
        check_key(key)
        view = memoryview(data)
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        sha256 = hashlib.sha256(data).hexdigest()
        await self._retried(
            f"put {key}",
            lambda: self.put_object(
                key, view, content_type=content_type, sha256=sha256, md5=md5
            ),
            key=key,
        )

    async def read_bytes(self, key: str, *, max_bytes: int) -> bytes:
        """The whole object; NotFound if missing, PayloadTooLarge if too big."""
        check_key(key)
        chunks = []
        size = 0
        async for chunk in self.read_stream(key):
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"{key} is larger than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def read_stream(self, key: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        """Stream ``key`` from ``offset``; a dropped body raises StorageRetryable.

        Not retried here: a caller that wants to resume reopens at the offset
        it reached.
        """
        check_key(key)
        params: dict[str, Any] = {"Key": key}
        if offset:
            params["Range"] = f"bytes={offset}-"
        answer = await self._retried(
            f"get {key}", lambda: self._call(f"get {key}", "get_object", **params)
        )
        what = f"read {key}"
        async with answer["Body"] as body:
            while True:
                try:
                    async with asyncio.timeout(self.settings.read_timeout_s):
                        chunk = await body.read(_READ_CHUNK_BYTES)
                except _TRANSIENT_READ_ERRORS as exc:
                    # aiohttp's ClientPayloadError reaches us unwrapped here.
                    raise translate_error(exc, what) from exc
                if not chunk:
                    return
                yield chunk

    async def head(self, key: str) -> ObjectInfo | None:
        check_key(key)
        try:
            answer = await self._retried(
                f"head {key}", lambda: self._call(f"head {key}", "head_object", Key=key)
            )
        except NotFound:
            return None
        return ObjectInfo(
            key=key,
            size_bytes=int(answer["ContentLength"]),
            modified_at=answer["LastModified"],
            content_type=answer.get("ContentType"),
            sha256=answer.get("Metadata", {}).get(SHA256_META),
            etag=_strip_etag(answer.get("ETag")),
        )

    async def delete(self, keys: list[str]) -> None:
        """Delete ``keys`` in batches of 1000; missing keys are fine."""
        for key in keys:
            check_key(key)
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            answer = await self._retried(
                "delete objects",
                lambda batch=batch: self._call(  # type: ignore[misc]
                    f"delete {len(batch)} objects",
                    "delete_objects",
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                ),
            )
            failed = [
                e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"
            ]
            if failed:
                first = failed[0]
                raise StorageError(
                    f"could not delete {len(failed)} objects, e.g."
                    f" {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    # -- listings ------------------------------------------------------------------

    async def iter_objects(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Prefix": prefix, "MaxKeys": 1000}
            if token:
                params["ContinuationToken"] = token
            answer = await self._retried(
                f"list {prefix}",
                lambda params=params: self._call(  # type: ignore[misc]
                    f"list {prefix}", "list_objects_v2", **params
                ),
            )
            for item in answer.get("Contents", []):
                yield ObjectInfo(
                    key=item["Key"],
                    size_bytes=int(item["Size"]),
                    modified_at=item["LastModified"],
                    etag=_strip_etag(item.get("ETag")),
                )
            if not answer.get("IsTruncated"):
                return
            token = answer["NextContinuationToken"]

    async def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        found: list[PendingUpload] = []
        markers: dict[str, str] = {}
        while True:
            params: dict[str, Any] = {"Prefix": prefix, "MaxUploads": 1000, **markers}
            answer = await self._retried(
                "list multipart uploads",
                lambda params=params: self._call(  # type: ignore[misc]
                    "list multipart uploads", "list_multipart_uploads", **params
                ),
            )
            for item in answer.get("Uploads", []):
                found.append(
                    PendingUpload(
                        key=item["Key"],
                        upload_id=item["UploadId"],
                        initiated_at=item["Initiated"],
                    )
                )
            if not answer.get("IsTruncated"):
                break
            markers = {
                "KeyMarker": answer["NextKeyMarker"],
                "UploadIdMarker": answer["NextUploadIdMarker"],
            }
        return sorted(found, key=lambda u: u.initiated_at)

    async def abort_pending(self, upload: PendingUpload) -> None:
        await self._retried(
            "abort multipart upload",
            lambda: self.abort_multipart(upload.key, upload.upload_id),
            key=upload.key,
        )

    # -- links ---------------------------------------------------------------------

    def public_url(self, key: str) -> str | None:
        base = self.settings.public_base_url
        if not base:
            return None
        return f"{base.rstrip('/')}/{quote(check_key(key))}"

    async def signed_url(self, key: str, *, expires_s: int) -> str:
        """A presigned GET of ``key`` (R2 serves Range on it)."""
        check_key(key)
        return str(
            await self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=min(expires_s, MAX_PRESIGN_S),
            )
        )

    async def presigned_put(
        self,
        key: str,
        *,
        content_type: str,
        max_bytes: int,
        expires_s: int,
        size_bytes: int | None = None,
    ) -> PresignedUpload:
        """A presigned PUT of ``key``.

        R2 cannot enforce a maximum on a presigned PUT. With ``size_bytes``
        (at most ``max_bytes``) the Content-Length is signed, so R2 accepts
        exactly that many bytes; without it, any size up to R2's own limit.
        The Content-Type is signed, so the client must send the same one.
        """
        check_key(key)
        if size_bytes is not None and size_bytes > max_bytes:
            raise PayloadTooLarge(f"at most {max_bytes} bytes may be uploaded")
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": key,
            "ContentType": content_type,
        }
        if size_bytes is not None:
            params["ContentLength"] = size_bytes
        expires_s = min(expires_s, MAX_PRESIGN_S)
        url = await self.client.generate_presigned_url(
            "put_object", Params=params, ExpiresIn=expires_s
        )
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_s)
        return PresignedUpload(
            key=key,
            url=str(url),
            headers={"Content-Type": content_type},
            expires_at=expires.replace(microsecond=0),
            max_bytes=size_bytes if size_bytes is not None else max_bytes,
        )
