"""The exception tree of nimu_rt and its RFC 9457 problem+json form.

Every error the service raises on purpose derives from :class:`NimuError`.
Errors of libraries we call (asyncpg, sqlite3, botocore, httpx) are translated
into this tree where our code calls them, so that routes and actors only ever
see these types::

    NimuError                      500 internal_error
    ├── ConfigError                    (startup only; never an HTTP answer)
    ├── BadRequest                 400 bad_request
    │   └── MalformedJSON          400 malformed_json
    ├── Unauthorized               401 unauthorized
    ├── Forbidden                  403 forbidden
    │   └── ScopeDenied            403 scope_denied
    ├── NotFound                   404 not_found
    ├── MethodNotAllowed           405 method_not_allowed
    ├── Conflict                   409 conflict
    │   ├── InvalidTransition      409 invalid_transition
    │   ├── CostNotAccepted        409 cost_not_accepted
    │   ├── NotConfirmed           409 not_confirmed
    │   └── SpendCapExceeded       409 spend_cap_exceeded
    ├── PayloadTooLarge            413 payload_too_large
    ├── RangeNotSatisfiable        416 range_not_satisfiable
    ├── UnsupportedMediaType       415 unsupported_media_type
    ├── ValidationFailed           422 validation_failed
    │   └── IdempotencyKeyReused   422 idempotency_key_reused
    ├── RateLimited                429 rate_limited
    ├── HeadersTooLarge            431 headers_too_large
    ├── Unavailable                503 unavailable
    │   ├── StoreUnavailable       503 store_unavailable
    │   └── RequestTimeout         503 request_timeout
    ├── Veo3Error                  502 veo3_error (from the Veo 3 client)
    │   ├── Veo3Retryable              429, 5xx, timeouts, resets: try later
    │   └── Veo3Final                  400, 403, 404, failed operations
    │       └── SafetyFiltered         blocked by Veo 3's filters; not billed
    └── StorageError               502 storage_error (from a storage backend)
        ├── StorageRetryable           transient: try later
        └── InvalidVideo           422 invalid_video (not a video we accept)

The ``code`` of each class is part of the wire contract: clients branch on it,
so a code is never renamed. Extra data travels in attributes and is rendered
as camelCase members of the problem document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

PROBLEM_TYPE_PREFIX = "urn:nimu-rt:problem:"


class NimuError(Exception):
    """Root of the tree; an unexpected failure inside nimu_rt."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    title: ClassVar[str] = "Internal server error"

    def __init__(self, detail: str | None = None, **extra: Any) -> None:
        self.detail = detail or self.title
        # Members added to the problem document, already in wire (camelCase)
        # spelling, e.g. currentStatus or retryAfterSeconds.
        self.extra: dict[str, Any] = extra
        super().__init__(self.detail)

    def problem(
        self, *, request_id: str | None = None, instance: str | None = None
    ) -> dict[str, Any]:
        """The RFC 9457 document for this error."""
        doc: dict[str, Any] = {
            "type": PROBLEM_TYPE_PREFIX + self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            doc["instance"] = instance
        if request_id:
            doc["requestId"] = request_id
        doc.update(self.extra)
        return doc

    def headers(self) -> Mapping[str, str]:
        """HTTP headers that belong with this error (e.g. Retry-After)."""
        return {}


class ConfigError(NimuError):
    """A setting is unknown, mistyped or out of range; the process stops."""

    code = "config_error"
    title = "Invalid configuration"


class BadRequest(NimuError):
    code = "bad_request"
    status = 400
    title = "Bad request"


class MalformedJSON(BadRequest):
    code = "malformed_json"
    title = "Request body is not valid JSON"


class Unauthorized(NimuError):
    code = "unauthorized"
    status = 401
    title = "Authentication required"

    def headers(self) -> Mapping[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="nimu-rt"'}


class Forbidden(NimuError):
    code = "forbidden"
    status = 403
    title = "Not allowed"


class ScopeDenied(Forbidden):
    """A scoped read token was used outside what it was minted for."""

    code = "scope_denied"
    title = "Not allowed with this token's scope"


class NotFound(NimuError):
    code = "not_found"
    status = 404
    title = "Not found"


class MethodNotAllowed(NimuError):
    code = "method_not_allowed"
    status = 405
    title = "Method not allowed"


class Conflict(NimuError):
    code = "conflict"
    status = 409
    title = "Conflict with the current state"


class InvalidTransition(Conflict):
    """A lifecycle action that the current status does not allow.

    ``currentStatus`` names the status the generation is in; ``action`` the
    refused action and ``allowedFrom`` the statuses that would allow it.
    """

    code = "invalid_transition"
    title = "Not allowed in the current status"

    def __init__(
        self, current: str, action: str, allowed_from: list[str] | None = None
    ) -> None:
        allowed = sorted(allowed_from or [])
        super().__init__(
            f"cannot {action} a generation that is {current}",
            currentStatus=current,
            action=action,
            allowedFrom=allowed,
        )
        self.current = current


class CostNotAccepted(Conflict):
    code = "cost_not_accepted"
    title = "Accepted cost is below the current estimate"


class NotConfirmed(Conflict):
    code = "not_confirmed"
    title = "The generation's price was never accepted"


class SpendCapExceeded(Conflict):
    """Confirming would take the user past the daily spend cap.

    ``capUsd``, ``spentUsd`` (today, before this one), ``remainingUsd``,
    ``costUsd`` (of this generation) and ``resetsAt`` (next UTC midnight)
    travel in the problem document.
    """

    code = "spend_cap_exceeded"
    title = "Daily spend cap reached"


class PayloadTooLarge(NimuError):
    code = "payload_too_large"
    status = 413
    title = "Request body too large"


class RangeNotSatisfiable(NimuError):
    """A byte range that starts at or past the end of the object.

    ``sizeBytes`` is the object's size, also sent as ``Content-Range``.
    """

    code = "range_not_satisfiable"
    status = 416
    title = "Range not satisfiable"

    def __init__(self, size_bytes: int) -> None:
        super().__init__(
            f"the object has {size_bytes} bytes; the range asked for starts"
            " past its end",
            sizeBytes=size_bytes,
        )
        self.size_bytes = size_bytes

    def headers(self) -> Mapping[str, str]:
        return {"Content-Range": f"bytes */{self.size_bytes}"}


class UnsupportedMediaType(NimuError):
    code = "unsupported_media_type"
    status = 415
    title = "Unsupported media type"


class ValidationFailed(NimuError):
    """One or more fields are invalid.

    ``errors`` lists ``{"path": "$.prompt", "message": ...}`` items, one per
    bad field, with JSON paths into the request body (or ``$query.name`` for
    query parameters).
    """

    code = "validation_failed"
    status = 422
    title = "The request is not valid"

    def __init__(
        self, errors: list[dict[str, str]] | str, detail: str | None = None
    ) -> None:
        if isinstance(errors, str):
            errors = [{"path": "$", "message": errors}]
        first = errors[0]["message"] if errors else self.title
        super().__init__(detail or first, errors=errors)
        self.errors = errors


class IdempotencyKeyReused(ValidationFailed):
    code = "idempotency_key_reused"
    title = "Idempotency-Key was used with a different request"


class RateLimited(NimuError):
    code = "rate_limited"
    status = 429
    title = "Too many requests"

    def __init__(self, detail: str | None = None, *, retry_after_s: float) -> None:
        super().__init__(detail, retryAfterSeconds=max(1, round(retry_after_s)))
        self.retry_after_s = retry_after_s

    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class HeadersTooLarge(NimuError):
    code = "headers_too_large"
    status = 431
    title = "Request header fields too large"


class Unavailable(NimuError):
    code = "unavailable"
    status = 503
    title = "Service unavailable"


class StoreUnavailable(Unavailable):
    code = "store_unavailable"
    title = "The database cannot be reached"


class RequestTimeout(Unavailable):
    """The request did not get its answer started within the time allowed."""

    code = "request_timeout"
    title = "The request took too long"


class Veo3Error(NimuError):
    """A Veo 3 call failed; ``retryable`` says whether trying later may help.

    ``code`` values are stable and end up in a failed generation's
    ``error.code``; ``message`` is written for the person who asked for the
    video.
    """

    code = "veo3_error"
    status = 502
    title = "Video generation service error"
    retryable: ClassVar[bool] = False


class Veo3Retryable(Veo3Error):
    """Quota (429), server errors (5xx), timeouts and dropped connections.

    ``retry_after_s`` is Veo 3's own hint (RetryInfo or Retry-After) when it
    gave one.
    """

    code = "veo3_unavailable"
    retryable = True

    def __init__(
        self, detail: str | None = None, *, retry_after_s: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s
        if code:
            self.code = code  # type: ignore[misc]


class Veo3Final(Veo3Error):
    """Refusals that will not change on retry: bad request, denied, retired."""

    code = "veo3_failed"

    def __init__(self, detail: str | None = None, *, code: str | None = None) -> None:
        super().__init__(detail)
        if code:
            self.code = code  # type: ignore[misc]


class SafetyFiltered(Veo3Final):
    """Veo 3 blocked the result with its safety filters. Google does not bill it.

    ``reasons`` are Veo 3's own texts, to be shown to the user.
    """

    code = "veo3_safety_filtered"
    title = "The video was blocked by safety filters"

    def __init__(self, reasons: list[str], filtered_count: int = 1) -> None:
        super().__init__(
            "Veo 3 blocked this video with its safety filters; you were not"
            " charged. " + " ".join(reasons)
        )
        self.reasons = reasons
        self.filtered_count = filtered_count


class StorageError(NimuError):
    """A storage backend (R2 or local files) failed."""

    code = "storage_error"
    status = 502
    title = "Video storage error"
    retryable: ClassVar[bool] = False


class StorageRetryable(StorageError):
    """A transient storage failure (5xx, timeout, dropped connection)."""

    code = "storage_unavailable"
    retryable = True


class InvalidVideo(StorageError):
    """The bytes are not a video we accept (by content, or too large)."""

    code = "invalid_video"
    status = 422
    title = "Not an accepted video"
