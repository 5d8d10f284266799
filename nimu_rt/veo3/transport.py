"""HTTP machinery shared by the Gemini and Vertex clients.

:class:`HttpVeo3Client` owns one ``httpx.AsyncClient`` and does, for both
providers, what does not depend on the wire format: timeouts, retries with
capped exponential backoff and full jitter, the translation of Google's
answers and of httpx errors into :mod:`nimu_rt.errors`, and resumable
downloads.

Which calls are retried
-----------------------

Polls and downloads read state, so any transient failure (429, 408, 5xx,
timeouts, dropped connections, a garbled body) is retried, up to
``veo3.retry_attempts`` attempts per call.

A submit (``predictLongRunning``) starts paid work. It is resent only when
Google certainly did not accept it:

* the connection could not be opened (refused, DNS, connect timeout, no free
  connection in the pool): nothing was sent;
* 429 RESOURCE_EXHAUSTED: refused by quota before any work;
* 503 UNAVAILABLE and 408: Google's front end turned the request away
  (Google's own SDK retries these two as well).

Any other failure after the request left (a read timeout, a dropped
connection, 500, 502, 504, a 200 whose body cannot be read) is ambiguous:
the operation may exist and be billed. It is raised at once as
:class:`~nimu_rt.errors.Veo3Retryable` with code ``veo3_submit_ambiguous``,
so the caller decides (neither API can list or cancel the operation
reliably).

A server hint (``RetryInfo.retryDelay`` in the error body, the ``Retry-After``
header, or "Please retry in Ns." in the message) replaces the backoff when it
is at most ``veo3.retry_hint_max_s``; a longer one ends the call at once with
``retry_after_s`` set, for the caller's queue to honour.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import datetime as dt
import email.utils
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal

import httpx
import msgspec

from nimu_rt import __version__
from nimu_rt.config import Settings
from nimu_rt.errors import Veo3Error, Veo3Final, Veo3Retryable
from nimu_rt.models import CostEstimate, GenerationOptions
from nimu_rt.veo3 import codes
from nimu_rt.veo3.checks import prompt_problems
from nimu_rt.veo3.client import Veo3Client, VideoRef
from nimu_rt.veo3.pricing import estimate_cost

log = logging.getLogger(__name__)

Stage = Literal["submit", "poll", "download"]

# Statuses after which a submit was certainly not accepted (module docstring).
_SUBMIT_RESENDABLE_STATUSES = frozenset({408, 429, 503})
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# gRPC codes of a failed operation that a new submit may not meet again:
# DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, INTERNAL, UNAVAILABLE.
_TRANSIENT_GRPC_CODES = frozenset({4, 8, 10, 13, 14})
# Error bodies are read for their message only; a huge one is cut here.
_MAX_ERROR_BODY_BYTES = 64 * 1024
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?)\s*s", re.IGNORECASE)


class HttpVeo3Client(Veo3Client):
    """A Veo 3 provider over HTTP; subclasses supply URLs and wire formats.

    Does not validate requests before sending them: callers use
    :meth:`validate_prompt` first, otherwise Veo 3's own 400 arrives as
    ``veo3_invalid_request``. There is no cancel in either API.
    """

    provider = "http"

    def __init__(
        self,
        settings: Settings,
        *,
        base_url: str,
        typical_generation_s: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.config = settings.veo3
        self.base_url = base_url.rstrip("/")
        self.typical_generation_s = (
            typical_generation_s or self.config.typical_generation_s
        )
        self._rng = rng or random.Random()
        cfg = self.config
        self._json_timeout = httpx.Timeout(
            cfg.request_timeout_s, connect=cfg.connect_timeout_s
        )
        self._download_timeout = httpx.Timeout(
            cfg.request_timeout_s,
            connect=cfg.connect_timeout_s,
            read=cfg.download_read_timeout_s,
        )
        self._http = httpx.AsyncClient(
            timeout=self._json_timeout,
            headers={"User-Agent": f"nimu-rt/{__version__}"},
            follow_redirects=False,
        )
        self._closed = False

    # -- provider specifics ----------------------------------------------------

    @abc.abstractmethod
    async def _auth_headers(self) -> dict[str, str]:
        """Credentials for a request to the provider's API."""

    @abc.abstractmethod
    def _download_request(self, uri: str) -> tuple[str, bool]:
        """The URL to GET for ``uri`` and whether to send credentials."""

    # -- the interface -----------------------------------------------------------

    def validate_prompt(self, prompt: str, options: GenerationOptions) -> list[str]:
        """Problems Veo 3 would refuse the request for; empty when none.

        See :func:`nimu_rt.veo3.checks.prompt_problems` for what is checked
        and what cannot be (the safety filters answer after generating).
        """
        return prompt_problems(self.settings, prompt, options, provider=self.provider)

    def estimate_cost(self, options: GenerationOptions) -> CostEstimate:
        """The price from ``[pricing]``; raises ValidationFailed if unpriced."""
        return estimate_cost(self.settings, options)

    def next_poll_delay_s(self, polls_so_far: int) -> float:
        """``poll_initial_s * poll_growth**polls_so_far``, at most ``poll_max_s``.

        Not jittered: jobs are started at different times already.
        """
        cfg = self.config
        if polls_so_far <= 0:
            return min(cfg.poll_initial_s, cfg.poll_max_s)
        # Capped before exponentiation could overflow a float.
        exponent = min(polls_so_far, 64)
        return min(cfg.poll_max_s, cfg.poll_initial_s * cfg.poll_growth**exponent)

    async def aclose(self) -> None:
        """Close the connection pool; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._http.aclose()

    # -- JSON calls with retries ---------------------------------------------------

    async def _call_json(
        self,
        stage: Stage,
        method: str,
        url: str,
        *,
        body: Mapping[str, Any] | None = None,
        operation_name: str | None = None,
    ) -> dict[str, Any]:
        """:meth:`_call_json_retried`, timed and counted by outcome."""
        if self.metrics is None:
            return await self._call_json_retried(
                stage, method, url, body=body, operation_name=operation_name
            )
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await self._call_json_retried(
                stage, method, url, body=body, operation_name=operation_name
            )
        except Veo3Error as exc:
            outcome = exc.code
            raise
        except BaseException:
            outcome = "interrupted"
            raise
        finally:
            self.metrics.veo3_call(stage, outcome, time.perf_counter() - started)

    async def _call_json_retried(
        self,
        stage: Stage,
        method: str,
        url: str,
        *,
        body: Mapping[str, Any] | None = None,
        operation_name: str | None = None,
    ) -> dict[str, Any]:
        """One API call, retried as the module docstring says; its JSON object.

        Raises Veo3Final for answers that will not change, Veo3Retryable when
        retries are used up, the hint is too long, or (on submit) the request
        may have been accepted.
        """
        attempts = self.config.retry_attempts
        total_timeout_s = self.config.connect_timeout_s + self.config.request_timeout_s
        attempt = 0
        while True:
            attempt += 1
            resendable = True
            try:
                # A credential failure happens before anything reaches Veo 3,
                # so even a submit may be resent after it.
                headers = await self._auth_headers()
                # httpx bounds each read; this bounds the whole exchange, so a
                # server trickling bytes cannot hold the call forever.
                async with asyncio.timeout(total_timeout_s):
                    response = await self._http.request(
                        method, url, json=body, headers=headers
                    )
                    content = await response.aread()
            except Veo3Retryable as exc:
                error = exc
            except (httpx.HTTPError, TimeoutError) as exc:
                error, resendable = _transport_error(exc, stage)
            else:
                if response.is_success:
                    try:
                        doc = msgspec.json.decode(content)
                    except msgspec.DecodeError:
                        doc = None
                    if isinstance(doc, dict):
                        return doc
                    error = Veo3Retryable(
                        f"Veo 3 answered {stage} with a body that is not a JSON object",
                        code=codes.BAD_RESPONSE,
                    )
                    resendable = False
                else:
                    error = _http_error(
                        stage, response.status_code, response.headers, content
                    )
                    resendable = response.status_code in _SUBMIT_RESENDABLE_STATUSES

            if not isinstance(error, Veo3Retryable):
                raise error
            if stage == "submit" and not resendable:
                raise Veo3Retryable(
                    "Veo 3 may have accepted the request before it failed"
                    f" ({error.detail}); it was not sent again, to avoid paying"
                    " twice",
                    code=codes.SUBMIT_AMBIGUOUS,
                ) from error
            delay_s = self._retry_delay_s(attempt, error)
            if delay_s is None or attempt >= attempts:
                raise error
            log.warning(
                "veo3 %s failed (%s); attempt %s of %s, retrying in %.2f s",
                stage,
                error.code,
                attempt,
                attempts,
                delay_s,
                extra={
                    "action": "veo3.retry",
                    "stage": stage,
                    "code": error.code,
                    "attempt": attempt,
                    "operation": operation_name,
                },
            )
            await asyncio.sleep(delay_s)

    def _retry_delay_s(self, attempt: int, error: Veo3Retryable) -> float | None:
        """Seconds before attempt ``attempt + 1``; None when not worth waiting."""
        cfg = self.config
        hint = error.retry_after_s
        if hint is not None:
            return hint if hint <= cfg.retry_hint_max_s else None
        # Full jitter: spreads clients that failed together over the window.
        ceiling = min(cfg.retry_max_s, cfg.retry_initial_s * 2 ** min(attempt - 1, 32))
        return self._rng.uniform(0, ceiling)

    # -- downloads -----------------------------------------------------------------

    async def video_size(self, video: VideoRef) -> int | None:
        """Ask for the first byte only; the Content-Range says the total.

        One cheap request, not retried: the size only feeds progress, so a
        failure means "unknown", never an error.
        """
        if video.data is not None:
            return len(video.data)
        if not video.uri:
            return None
        url, with_credentials = self._download_request(video.uri)
        try:
            headers = await self._auth_headers() if with_credentials else {}
            headers["Range"] = "bytes=0-0"
            async with self._http.stream(
                "GET",
                url,
                headers=headers,
                timeout=self._download_timeout,
                follow_redirects=True,
            ) as response:
                if response.status_code == 206:
                    return _complete_length(response.headers.get("content-range"))
                if response.status_code == 200:
                    length = response.headers.get("content-length")
                    return int(length) if length and length.isdigit() else None
        except (httpx.HTTPError, TimeoutError, Veo3Error):
            pass
        return None

    async def download(
        self, video: VideoRef, *, offset: int = 0
    ) -> AsyncIterator[bytes]:
        """Stream the video's bytes from ``offset`` on, in chunks.

        Chunks are at most ``veo3.download_chunk_bytes``; memory stays bounded
        whatever the size. Redirects are followed (Google sends one). When
        the connection drops or stalls for ``download_read_timeout_s``, the
        transfer resumes from the last byte received with a Range request;
        ``retry_attempts`` failures in a row without a single new byte end it
        with Veo3Retryable. A server that ignores Range is handled by
        skipping the bytes before ``offset``. Inline (Vertex) videos are
        sliced from memory.
        """
        if offset < 0:
            raise ValueError("offset must be >= 0")
        chunk_bytes = self.config.download_chunk_bytes
        if video.data is not None:
            for start in range(offset, len(video.data), chunk_bytes):
                yield video.data[start : start + chunk_bytes]
            return
        if not video.uri:
            raise Veo3Final("the video has neither a URI nor data", code=codes.NO_VIDEO)
        url, with_credentials = self._download_request(video.uri)

        position = offset
        failures = 0
        # Bytes received but not yet yielded: at most one chunk plus one read.
        # Kept across a failure so that a dropped transfer resumes after the
        # last byte that arrived, not the last full chunk.
        pending = bytearray()
        while True:
            total: int | None = None
            error: Veo3Error | None = None
            try:
                headers = await self._auth_headers() if with_credentials else {}
                if position:
                    headers["Range"] = f"bytes={position}-"
                async with self._http.stream(
                    "GET",
                    url,
                    headers=headers,
                    timeout=self._download_timeout,
                    follow_redirects=True,
                ) as response:
                    status = response.status_code
                    if status == 416 and position:
                        size = _complete_length(response.headers.get("content-range"))
                        if size is not None and position >= size:
                            return  # nothing left after offset
                    if not response.is_success:
                        content = await _read_capped(response)
                        raise _http_error("download", status, response.headers, content)
                    skip = 0
                    if position and status == 200:
                        skip = position  # Range ignored: the body starts at 0
                    elif position:
                        start = _range_start(response.headers.get("content-range"))
                        if start != position:
                            raise Veo3Retryable(
                                f"asked for bytes from {position}, got"
                                f" {response.headers.get('content-range')!r}",
                                code=codes.BAD_RESPONSE,
                            )
                    total = _expected_end(response, position)
                    async for data in response.aiter_bytes():
                        if skip:
                            if len(data) <= skip:
                                skip -= len(data)
                                continue
                            data = data[skip:]
                            skip = 0
                        pending += data
                        while len(pending) >= chunk_bytes:
                            chunk = bytes(pending[:chunk_bytes])
                            del pending[:chunk_bytes]
                            position += len(chunk)
                            failures = 0
                            yield chunk
            except (httpx.HTTPError, TimeoutError) as exc:
                error = _transport_error(exc, "download")[0]
            except Veo3Error as exc:
                error = exc

            if pending:
                chunk = bytes(pending)
                pending.clear()
                position += len(chunk)
                failures = 0
                yield chunk
            if error is None:
                if total is None or position >= total:
                    return
                error = Veo3Retryable(
                    f"download ended at byte {position} of {total}",
                    code=codes.CONNECTION_FAILED,
                )

            if not isinstance(error, Veo3Retryable):
                raise error
            failures += 1
            delay_s = self._retry_delay_s(failures, error)
            if delay_s is None or failures >= self.config.retry_attempts:
                raise error
            log.warning(
                "veo3 download interrupted at byte %s (%s); resuming in %.2f s",
                position,
                error.code,
                delay_s,
                extra={
                    "action": "veo3.retry",
                    "stage": "download",
                    "code": error.code,
                    "attempt": failures,
                    "position_bytes": position,
                },
            )
            await asyncio.sleep(delay_s)


# -- translating failures ------------------------------------------------------------


def _transport_error(exc: BaseException, stage: Stage) -> tuple[Veo3Retryable, bool]:
    """An httpx (or timeout) failure as Veo3Retryable, and whether a submit
    certainly did not reach Google (so resending cannot pay twice)."""
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)):
        return (
            Veo3Retryable(
                f"cannot reach Veo 3 ({type(exc).__name__}: {exc})",
                code=codes.CONNECTION_FAILED,
            ),
            True,
        )
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return (
            Veo3Retryable(
                f"Veo 3 did not answer the {stage} in time", code=codes.TIMEOUT
            ),
            False,
        )
    return (
        Veo3Retryable(
            f"the connection to Veo 3 failed during the {stage}"
            f" ({type(exc).__name__}: {exc})",
            code=codes.CONNECTION_FAILED,
        ),
        False,
    )


def _http_error(
    stage: Stage, status: int, headers: httpx.Headers, content: bytes
) -> Veo3Error:
    """Google's error answer as one of our errors (see nimu_rt.veo3.codes)."""
    body = _error_body(content)
    message = str(body.get("message") or "").strip() or f"HTTP {status}"
    google_status = str(body.get("status") or "")
    details = body.get("details") if isinstance(body.get("details"), list) else []
    reasons = {
        str(d.get("reason"))
        for d in details
        if isinstance(d, dict) and str(d.get("@type", "")).endswith("ErrorInfo")
    }
    said = f"Veo 3 said: {message}"

    if status in _RETRYABLE_STATUSES or status >= 500:
        hint = _retry_hint_s(headers, details, message)
        if status == 429:
            return Veo3Retryable(
                f"Veo 3's quota or rate limit was reached. {said}",
                retry_after_s=hint,
                code=codes.RATE_LIMITED,
            )
        return Veo3Retryable(
            f"Veo 3 is unavailable (HTTP {status}). {said}",
            retry_after_s=hint,
            code=codes.UNAVAILABLE,
        )
    if status in (401, 403) or "API_KEY_INVALID" in reasons:
        return Veo3Final(
            f"Veo 3 refused our credentials. {said}", code=codes.AUTH_FAILED
        )
    if status == 402:
        return Veo3Final(
            f"The Veo 3 account has no credit left. {said}",
            code=codes.PAYMENT_REQUIRED,
        )
    if status == 404:
        code = {
            "submit": codes.MODEL_UNAVAILABLE,
            "poll": codes.OPERATION_NOT_FOUND,
            "download": codes.VIDEO_NOT_FOUND,
        }[stage]
        return Veo3Final(said, code=code)
    if google_status == "FAILED_PRECONDITION":
        return Veo3Final(
            f"The Veo 3 account cannot make videos yet. {said}",
            code=codes.PRECONDITION_FAILED,
        )
    return Veo3Final(f"Veo 3 refused the request. {said}", code=codes.INVALID_REQUEST)


def _error_body(content: bytes) -> dict[str, Any]:
    """The ``error`` member of Google's error envelope; {} if there is none."""
    try:
        doc = msgspec.json.decode(content)
    except msgspec.DecodeError:
        text = content[:300].decode("utf-8", "replace").strip()
        return {"message": text} if text else {}
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        return doc["error"]
    return {}


def _retry_hint_s(
    headers: httpx.Headers, details: list[Any], message: str
) -> float | None:
    """The server's retry hint in seconds, from the best source available."""
    for detail in details:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith(
            "RetryInfo"
        ):
            seconds = parse_duration_s(detail.get("retryDelay"))
            if seconds is not None:
                return seconds
    retry_after = headers.get("retry-after")
    if retry_after:
        if retry_after.strip().isdigit():
            return float(retry_after.strip())
        try:
            when = email.utils.parsedate_to_datetime(retry_after)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.UTC)
            return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
    found = _RETRY_IN.search(message)
    return float(found[1]) if found else None


def parse_duration_s(value: object) -> float | None:
    """A protobuf JSON Duration (``"19s"``, ``"1.5s"``) in seconds, or None."""
    if not isinstance(value, str) or not value.endswith("s"):
        return None
    try:
        seconds = float(value[:-1])
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def operation_error(error: object) -> Veo3Error:
    """A done operation's ``error`` (a google.rpc.Status) as our error.

    Inside an operation ``code`` is the gRPC number, not an HTTP status.
    Transient numbers (INTERNAL, UNAVAILABLE, ...) give a retryable error:
    Google does not bill a failed operation, and the same request often
    works the next time.
    """
    status = error if isinstance(error, dict) else {}
    grpc_code = status.get("code")
    message = str(status.get("message") or "no message").strip()
    detail = f"Veo 3 could not make the video (code {grpc_code}): {message}"
    if grpc_code in _TRANSIENT_GRPC_CODES:
        return Veo3Retryable(detail, code=codes.OPERATION_TRANSIENT)
    return Veo3Final(detail, code=codes.OPERATION_FAILED)


def decode_inline(data: object, mime_type: object) -> VideoRef | None:
    """A base64 video from a poll answer, or None if ``data`` is not one."""
    if not isinstance(data, str):
        return None
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        return None
    return VideoRef(data=raw, mime_type=str(mime_type or "video/mp4"))


async def _read_capped(response: httpx.Response) -> bytes:
    data = bytearray()
    async for chunk in response.aiter_bytes():
        data += chunk[: _MAX_ERROR_BODY_BYTES - len(data)]
        if len(data) >= _MAX_ERROR_BODY_BYTES:
            break
    return bytes(data)


_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")


def _range_start(content_range: str | None) -> int | None:
    match = _CONTENT_RANGE.match((content_range or "").strip())
    return int(match[1]) if match and match[1] is not None else None


def _complete_length(content_range: str | None) -> int | None:
    match = _CONTENT_RANGE.match((content_range or "").strip())
    return int(match[3]) if match and match[3] != "*" else None


def _expected_end(response: httpx.Response, position: int) -> int | None:
    """The byte position the body should end at, when the server says it."""
    total = _complete_length(response.headers.get("content-range"))
    if total is not None:
        return total
    length = response.headers.get("content-length")
    if length is not None and length.isdigit():
        # A 200 body starts at byte 0; a 206 one at ``position``.
        start = 0 if response.status_code == 200 else position
        return start + int(length)
    return None
