"""Helpers every route uses: the caller, the body, query values, JSON answers.

The bearer token is verified before the route runs (by
:class:`nimu_rt.api.middleware.AuthMiddleware`, because verifying may fetch
the identity provider's keys); :func:`principal` and :func:`reader` only
read the outcome and decide whether it is enough for the route.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from nimu_rt.auth import Principal
from nimu_rt.errors import (
    MalformedJSON,
    NimuError,
    PayloadTooLarge,
    ScopeDenied,
    Unauthorized,
    UnsupportedMediaType,
    ValidationFailed,
)
from nimu_rt.events.hub import generation_topic
from nimu_rt.ids import is_id
from nimu_rt.models import encode

# Where AuthMiddleware leaves the outcome: a Principal or the NimuError that
# refused the token. Absent when no Authorization header came.
AUTH_SCOPE_KEY = "nimu.auth"

T = TypeVar("T")

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def services(request: Request) -> Any:
    """The :class:`nimu_rt.app.Services` of the running app."""
    return request.app.state.services


def authenticated(request: Request) -> Principal:
    """The verified caller, full or scoped; Unauthorized (401) otherwise."""
    outcome = request.scope.get(AUTH_SCOPE_KEY)
    if isinstance(outcome, Principal):
        return outcome
    if isinstance(outcome, NimuError):
        raise outcome
    raise Unauthorized("send Authorization: Bearer <token>")


def principal(request: Request) -> Principal:
    """The caller with a full token: 401 without one, 403 for a scoped one.

    Every route uses this unless it is one of the reads a scoped token is
    for (:func:`reader`), so a new route refuses scoped tokens by default.
    """
    caller = authenticated(request)
    caller.require_full()
    return caller


def reader(request: Request, generation_id: str) -> Principal:
    """The caller, who may hold a scoped token for ``generation:{id}``.

    For the reads of one generation (snapshot, long-poll, events, video
    links). Ownership is checked by the caller as for any token.
    """
    caller = authenticated(request)
    if not caller.allows_topic(generation_topic(generation_id)):
        raise ScopeDenied(
            f"this token does not cover generation {generation_id}",
            scopes=sorted(caller.scopes or ()),
        )
    return caller


def operator(request: Request) -> Principal:
    """The caller, who must have the admin or service role (403 otherwise)."""
    caller = principal(request)
    caller.require_operator()
    return caller


async def read_body(request: Request, kind: type[T]) -> tuple[T, bytes]:
    """Decode a JSON body into ``kind``; return it with the raw bytes.

    Refuses a non-JSON content type (415), a body over
    ``server.max_body_bytes`` (413), bytes that are not JSON (400) and a
    document of the wrong shape (422, with the JSON path of the bad field).
    """
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType("send the body as Content-Type: application/json")
    limit = services(request).settings.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body must be at most {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body must be at most {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(raw), raw
    except msgspec.ValidationError as exc:
        raise ValidationFailed([validation_item(str(exc))]) from None
    except msgspec.DecodeError as exc:
        raise MalformedJSON(f"the body is not valid JSON: {exc}") from None


def validation_item(message: str) -> dict[str, str]:
    """msgspec's "problem - at `$.path`" as a {path, message} item."""
    problem, sep, path = message.rpartition(" - at `")
    if not sep:
        return {"path": "$", "message": message}
    return {"path": path.rstrip("`"), "message": problem}


def query_int(
    request: Request, name: str, default: int, *, minimum: int, maximum: int
) -> int:
    """An integer query parameter within bounds; 422 with its path otherwise."""
    value = _query_number(
        request, name, int, minimum, maximum, f"an integer from {minimum} to {maximum}"
    )
    return default if value is None else int(value)


def query_float(
    request: Request, name: str, *, minimum: float, maximum: float
) -> float | None:
    """A numeric query value within bounds, or None when it is absent."""
    expected = f"a number from {minimum:g} to {maximum:g}"
    return _query_number(request, name, float, minimum, maximum, expected)


def _query_number(
    request: Request,
    name: str,
    parse: Callable[[str], float],
    minimum: float,
    maximum: float,
    expected: str,
) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = parse(raw)
    except ValueError:
        value = None
    # NaN fails both comparisons, so it is refused too.
    if value is None or not minimum <= value <= maximum:
        raise ValidationFailed(
            [{"path": f"$query.{name}", "message": f"must be {expected}"}]
        )
    return value


def encode_cursor(value: str) -> str:
    """An opaque cursor for the id a list page ended at."""
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(raw: str | None, name: str = "cursor") -> str | None:
    """The id inside a cursor made by :func:`encode_cursor`; 422 otherwise."""
    if raw is None or raw == "":
        return None
    try:
        padded = raw + "=" * (-len(raw) % 4)
        value = base64.b64decode(padded.encode(), altchars=b"-_", validate=True)
        if is_id(value.decode()):
            return value.decode()
    except (ValueError, UnicodeDecodeError):
        pass
    raise ValidationFailed(
        [{"path": f"$query.{name}", "message": "not a cursor from this API"}]
    )


def json_response(
    value: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """``value`` encoded with msgspec as an ``application/json`` answer."""
    return Response(
        _encoder.encode(value),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def problem_response(request: Request, error: NimuError) -> Response:
    """``error`` as an RFC 9457 problem+json answer with the request id."""
    doc = error.problem(
        request_id=request.scope.get("nimu.request_id"),
        instance=request.url.path,
    )
    return Response(
        encode(doc),
        status_code=error.status,
        media_type="application/problem+json",
        headers=dict(error.headers()),
    )
