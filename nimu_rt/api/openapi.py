"""``GET /openapi.json``: the API's OpenAPI 3.1 document, built from the code.

The document is generated, never written by hand: the paths and methods
come from the app's route table, and the schemas from the very msgspec
types the routes decode and encode (``msgspec.json.schema_components``).
What the code cannot tell (a summary, who may call, which query parameters
a route reads) is the small :data:`OPERATIONS` table below; a test checks
that every route has an entry and every entry a route, so the two cannot
drift apart.

Error answers are derived from what a route does: every route may answer
431 and 503; one that needs a token 401 and 403; one with an ``{id}`` 404;
one that takes a JSON body 400, 413, 415 and 422; a mutating one 429. Each
is ``application/problem+json`` (:class:`Problem`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

import msgspec
from msgspec import Struct
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute

from nimu_rt import __version__
from nimu_rt.api import health, queue, storage, tokens
from nimu_rt.api.schemas import (
    ClarifyBody,
    ConfirmBody,
    CreateGenerationBody,
    StatusOverrideBody,
)
from nimu_rt.jobs.stats import QueueStats
from nimu_rt.models import Event, Generation, Page
from nimu_rt.storage.base import PresignedUpload

Access = Literal["public", "user", "reader", "operator", "signed"]

PROBLEM_MEDIA = "application/problem+json"
_COMPONENT = "#/components/schemas/{name}"


class ValidationItem(Struct, kw_only=True):
    """One bad field of a 422 answer."""

    path: str
    message: str


class Problem(Struct, kw_only=True, rename="camel", omit_defaults=True):
    """An RFC 9457 problem document; ``code`` is stable, clients branch on it.

    Problems may carry more members (e.g. ``currentStatus``,
    ``retryAfterSeconds``, ``remainingUsd``), named in the route's text.
    """

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[ValidationItem] | None = None


@dataclasses.dataclass(frozen=True)
class Param:
    """A query parameter or request header a route reads."""

    name: str
    schema: dict[str, Any]
    description: str
    where: Literal["query", "header"] = "query"


@dataclasses.dataclass(frozen=True)
class Operation:
    """What the route table cannot say about one method of one path."""

    summary: str
    access: Access
    ok: Any = None  # the success body's type; None: no JSON body
    status: int = 200
    body: type | None = None
    params: tuple[Param, ...] = ()
    # Statuses beyond those derived from the route (module docstring).
    errors: tuple[int, ...] = ()
    # Media type of a success body that is not JSON.
    media: str | None = None
    description: str = ""


def _q(name: str, type_: str, description: str, **extra: Any) -> Param:
    return Param(name, {"type": type_, **extra}, description)


_LIMIT = _q("limit", "integer", "Page size.", minimum=1)
_SINCE_SEQ = _q("sinceSeq", "integer", "Only what came after this seq.", minimum=0)

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("GET", "/healthz"): Operation(
        "Liveness: the process serves requests (no I/O)", "public", health.Liveness
    ),
    ("GET", "/readyz"): Operation(
        "Readiness: the store answers", "public", health.Readiness
    ),
    ("GET", "/api/health"): Operation(
        "Version, instance, store and generation counts", "operator",
        health.HealthSummary,
    ),
    ("POST", "/api/generations"): Operation(
        "Create a generation from a prompt; questions or a price come back",
        "user",
        Generation,
        status=201,
        body=CreateGenerationBody,
        params=(
            Param(
                "Idempotency-Key",
                {"type": "string", "maxLength": 255},
                "Repeating a create with the same key returns the first result.",
                "header",
            ),
        ),
    ),
    ("GET", "/api/generations"): Operation(
        "The caller's generations, newest first",
        "user",
        Page[Generation],
        params=(
            _q("status", "string", "Comma-separated statuses to keep."),
            _LIMIT,
            _q("cursor", "string", "nextCursor of the previous page."),
        ),
    ),
    ("GET", "/api/generations/{id}"): Operation(
        "A generation's snapshot; long-polls with waitSeconds",
        "reader",
        Generation,
        params=(
            _q("waitSeconds", "number", "Wait this long for a change.", minimum=0),
            _SINCE_SEQ,
            Param(
                "If-None-Match",
                {"type": "string"},
                "An ETag from an earlier answer: 304 while unchanged.",
                "header",
            ),
        ),
        errors=(304,),
    ),
    ("GET", "/api/generations/{id}/events"): Operation(
        "A generation's event history after a seq",
        "reader",
        Page[Event],
        params=(_SINCE_SEQ, _LIMIT),
    ),
    ("POST", "/api/generations/{id}/clarify"): Operation(
        "Answer the clarification questions", "user", Generation,
        body=ClarifyBody, errors=(409,),
    ),
    ("POST", "/api/generations/{id}/confirm"): Operation(
        "Accept the price and queue the job",
        "user",
        Generation,
        body=ConfirmBody,
        errors=(409,),
        description="409 codes: invalid_transition, cost_not_accepted,"
        " spend_cap_exceeded (with capUsd, spentUsd, remainingUsd, costUsd,"
        " resetsAt).",
    ),
    ("POST", "/api/generations/{id}/cancel"): Operation(
        "Cancel a live generation", "user", Generation, errors=(409,)
    ),
    ("POST", "/api/generations/{id}/retry"): Operation(
        "Queue a failed or cancelled generation again", "user", Generation,
        errors=(409,),
    ),
    ("PUT", "/api/generations/{id}/status"): Operation(
        "Operator override of the status, validated by the lifecycle",
        "operator",
        Generation,
        body=StatusOverrideBody,
        errors=(409,),
    ),
    ("GET", "/api/queue"): Operation(
        "Queue depth, load, limits, throughput and spend", "operator",
        QueueStats,
    ),
    ("POST", "/api/queue/pause"): Operation(
        "Stop dispatching queued jobs", "operator", QueueStats
    ),
    ("POST", "/api/queue/resume"): Operation(
        "Dispatch queued jobs again", "operator", QueueStats
    ),
    ("POST", "/api/queue/clear"): Operation(
        "Cancel every queued job", "operator", queue.ClearResult
    ),
    ("GET", "/api/queue/jobs/{id}"): Operation(
        "A job's queue state, position, attempts and timings", "user",
        queue.JobView,
    ),
    ("GET", "/api/queue/workers"): Operation(
        "Instances with heartbeat, load, concurrency and drain flag",
        "operator",
        queue.Workers,
    ),
    ("POST", "/api/queue/workers"): Operation(
        "Drain an instance or set its concurrency", "operator", queue.Workers,
        body=queue.WorkerBody, errors=(404,),
    ),
    ("GET", "/api/storage/videos/{id}"): Operation(
        "Playback links and metadata of a generation's video", "reader",
        storage.VideoLinks,
    ),
    ("DELETE", "/api/storage/videos/{id}"): Operation(
        "Delete a generation's video and thumbnail", "user", Generation,
        errors=(502,),
    ),
    ("POST", "/api/storage/uploads"): Operation(
        "A presigned PUT for a reference image",
        "user",
        PresignedUpload,
        status=201,
        body=storage.ReferenceUploadBody,
    ),
    ("GET", "/api/storage/objects/{key}"): Operation(
        "A stored object at a signed link (local storage only)",
        "signed",
        media="*/*",
        params=(
            _q("exp", "string", "From the signed link."),
            _q("sig", "string", "From the signed link."),
            Param("Range", {"type": "string"}, "One byte range.", "header"),
        ),
        errors=(206, 403, 404, 416),
    ),
    ("HEAD", "/api/storage/objects/{key}"): Operation(
        "A stored object's headers at a signed link (local storage only)",
        "signed",
        params=(
            _q("exp", "string", "From the signed link."),
            _q("sig", "string", "From the signed link."),
        ),
        errors=(206, 403, 404, 416),
    ),
    ("PUT", "/api/storage/objects/{key}"): Operation(
        "Upload an object to a signed link (local storage only)",
        "signed",
        params=(
            _q("exp", "string", "From the signed link."),
            _q("sig", "string", "From the signed link."),
            _q("type", "string", "From the signed link."),
            _q("len", "string", "From the signed link."),
            _q("max", "string", "From the signed link."),
        ),
        errors=(403, 404),
    ),
    ("POST", "/api/tokens"): Operation(
        "Mint a short-lived token scoped to reading generations or a user topic",
        "user",
        tokens.ScopedToken,
        status=201,
        body=tokens.TokenBody,
        description="A scoped token is refused (403 scope_denied) by every"
        " route but the reads of what it names. Only a service may set userId.",
    ),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics (404 when served on a separate port)",
        "operator",
        media="text/plain",
        errors=(404,),
    ),
    ("GET", "/openapi.json"): Operation(
        "This document", "public", media="application/json"
    ),
    ("GET", "/ws"): Operation(
        "The WebSocket endpoint (see the README's Real-time section)",
        "reader",
        errors=(101,),
        description="Upgrade to a WebSocket. Not callable as plain HTTP.",
    ),
}

WEBSOCKET_PATHS = frozenset({"/ws"})
_CONVERTER = re.compile(r"\{(\w+):\w+\}")
_PATH_PARAM = re.compile(r"\{(\w+)\}")


def route_operations(routes: list[BaseRoute]) -> list[tuple[str, str]]:
    """``(method, path)`` of every HTTP method and WebSocket in ``routes``.

    Paths are in OpenAPI spelling (``{key:path}`` becomes ``{key}``); the
    HEAD that Starlette adds to every GET counts only where it is declared.
    """
    found = []
    for route in routes:
        if isinstance(route, WebSocketRoute):
            found.append(("GET", route.path))
        elif isinstance(route, Route):
            path = _CONVERTER.sub(r"{\1}", route.path)
            methods = set(route.methods or ())
            declared = (
                OPERATIONS.get(("HEAD", path)) is not None and "HEAD" in methods
            )
            if "GET" in methods and not declared:
                methods.discard("HEAD")
            found += [(m, path) for m in sorted(methods)]
    return found


def build_openapi(routes: list[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``.

    Raises KeyError naming a route that has no entry in :data:`OPERATIONS`.
    """
    types: list[Any] = [Problem]
    for op in OPERATIONS.values():
        types += [t for t in (op.ok, op.body) if t is not None]
    schemas, components = msgspec.json.schema_components(
        list(dict.fromkeys(types)), ref_template=_COMPONENT
    )
    refs = dict(zip(dict.fromkeys(types), schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for method, path in route_operations(routes):
        op = OPERATIONS[(method, path)]
        paths.setdefault(path, {})[method.lower()] = _operation(
            method, path, op, refs
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nimu-rt",
            "version": __version__,
            "description": "Real-time backend for paid Veo 3 video generation.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def _operation(
    method: str, path: str, op: Operation, refs: dict[Any, Any]
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": _operation_id(method, path),
    }
    if op.description:
        doc["description"] = op.description
    needs_token = op.access in ("user", "reader", "operator")
    doc["security"] = [{"bearer": []}] if needs_token else []
    if op.access == "operator":
        doc["x-roles"] = ["admin", "service"]
    elif op.access == "reader":
        doc["x-scoped-token"] = True
    if path in WEBSOCKET_PATHS:
        doc["x-websocket"] = True
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(path)
    ]
    parameters += [
        {
            "name": p.name,
            "in": p.where,
            "required": False,
            "schema": p.schema,
            "description": p.description,
        }
        for p in op.params
    ]
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[op.body]}},
        }
    elif method == "PUT":
        doc["requestBody"] = {
            "required": True,
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    doc["responses"] = _responses(method, path, op, refs)
    return doc


def _responses(
    method: str, path: str, op: Operation, refs: dict[Any, Any]
) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    success: dict[str, Any] = {"description": "Success"}
    if op.ok is not None:
        success["content"] = {"application/json": {"schema": refs[op.ok]}}
    elif op.media == "application/json":
        success["content"] = {op.media: {"schema": {"type": "object"}}}
    elif op.media is not None:
        success["content"] = {op.media: {"schema": {"type": "string"}}}
    responses[str(op.status)] = success
    statuses = {431, 503, *op.errors}
    if op.access in ("user", "reader", "operator"):
        statuses |= {401, 403}
    if op.access == "signed" or "{id}" in path:
        statuses.add(404)
    if op.body is not None:
        statuses |= {400, 413, 415, 422}
    if any(p.where == "query" for p in op.params):
        statuses.add(422)
    if method in ("POST", "PUT", "PATCH", "DELETE"):
        statuses.add(429)
    if method == "PUT" and op.body is None:
        statuses.add(413)
    problem = {"content": {PROBLEM_MEDIA: {"schema": refs[Problem]}}}
    for status in sorted(statuses):
        if status == 304:
            responses["304"] = {"description": "Not modified"}
        elif status == 101:
            responses["101"] = {"description": "Switching to the WebSocket protocol"}
        elif status == 206:
            responses["206"] = {
                "description": "Partial content",
                "content": {"*/*": {"schema": {"type": "string"}}},
            }
        else:
            responses[str(status)] = {"description": _REASONS[status], **problem}
    return responses


_REASONS = {
    400: "Malformed request",
    401: "No valid bearer token",
    403: "Not allowed (role, scope or signature)",
    404: "Not found, or not the caller's",
    409: "Conflicts with the current state",
    413: "Body too large",
    415: "Body is not JSON",
    416: "Range not satisfiable",
    422: "Invalid request",
    429: "Rate limited; see Retry-After",
    431: "Request headers too large",
    502: "Storage failed",
    503: "Unavailable or timed out; try again",
}


def _operation_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.strip("/").replace(".", "_").split("/")]
    return method.lower() + "".join(w[:1].upper() + w[1:] for w in words if w)


async def openapi(request: Request) -> Response:
    """The document of this app's routes (no auth: the contract is public)."""
    cached = getattr(request.app.state, "openapi", None)
    if cached is None:
        cached = msgspec.json.encode(build_openapi(request.app.routes))
        request.app.state.openapi = cached
    return Response(cached, media_type="application/json")


routes = [Route("/openapi.json", openapi, methods=["GET"])]
