"""Routes of ``/api/generations``: the user's side of the lifecycle."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nimu_rt.api.common import (
    decode_cursor,
    encode_cursor,
    json_response,
    principal,
    query_float,
    query_int,
    read_body,
    reader,
    services,
)
from nimu_rt.api.schemas import (
    ClarifyBody,
    ConfirmBody,
    CreateGenerationBody,
    StatusOverrideBody,
)
from nimu_rt.errors import ValidationFailed
from nimu_rt.lifecycle import Status
from nimu_rt.models import Generation, Page

# Largest waitSeconds accepted at all; longer waits are cut to the
# configured cap rather than refused.
LONGPOLL_MAX_QUERY_S = 3600.0


def etag(generation: Generation) -> str:
    """The generation's ETag: its seq, which every stored change bumps."""
    return f'"{generation.seq}"'


def snapshot_response(generation: Generation, status: int = 200) -> Response:
    """A generation as JSON with its ETag."""
    return json_response(generation, status, headers={"ETag": etag(generation)})


async def create(request: Request) -> Response:
    """``POST /api/generations``: questions or a price (201)."""
    caller = principal(request)
    body, raw = await read_body(request, CreateGenerationBody)
    generation, replayed = await services(request).generations.create(
        caller,
        body,
        raw_body=raw,
        idempotency_key=request.headers.get("idempotency-key"),
    )
    response = snapshot_response(generation, 201)
    response.headers["Location"] = f"/api/generations/{generation.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def list_generations(request: Request) -> Response:
    """``GET /api/generations``: the caller's, newest first, paged."""
    caller = principal(request)
    limits = services(request).settings.generations
    limit = query_int(
        request,
        "limit",
        limits.default_page_size,
        minimum=1,
        maximum=limits.max_page_size,
    )
    statuses = []
    for raw in request.query_params.getlist("status"):
        for word in filter(None, raw.split(",")):
            try:
                statuses.append(Status(word))
            except ValueError:
                raise ValidationFailed(
                    [
                        {
                            "path": "$query.status",
                            "message": f"unknown status {word!r}; one of "
                            + ", ".join(s.value for s in Status),
                        }
                    ]
                ) from None
    before = decode_cursor(request.query_params.get("cursor"))
    # One extra row tells whether another page exists.
    rows = await services(request).generations.list(
        caller, statuses=statuses, before_id=before, limit=limit + 1
    )
    cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return json_response(Page(items=rows[:limit], next_cursor=cursor))


async def get(request: Request) -> Response:
    """The snapshot; 304 for a matching If-None-Match; long-polls on request.

    ``?waitSeconds=N&sinceSeq=S`` answers as soon as the generation's seq
    differs from S (at once if it already does), or 304 when N seconds
    (capped by ``realtime.longpoll_max_wait_s``) pass without a change.
    Without sinceSeq, the seq of an ``If-None-Match`` ETag is used.
    A scoped read token for this generation is enough.
    """
    svc = services(request)
    generation_id = request.path_params["id"]
    caller = reader(request, generation_id)
    wait_s = query_float(
        request, "waitSeconds", minimum=0, maximum=LONGPOLL_MAX_QUERY_S
    )
    if_none_match = request.headers.get("if-none-match")
    if wait_s is None:
        generation = await svc.generations.get(caller, generation_id)
        if if_none_match == etag(generation):
            return not_modified(generation)
        return snapshot_response(generation)
    since = query_int(request, "sinceSeq", -1, minimum=0, maximum=2**62)
    if since < 0:
        since = seq_of_etag(if_none_match)
    if since is None:
        raise ValidationFailed(
            [
                {
                    "path": "$query.sinceSeq",
                    "message": "needed with waitSeconds (or send If-None-Match)",
                }
            ]
        )
    wait_s = min(wait_s, svc.settings.realtime.longpoll_max_wait_s)
    deadline = asyncio.get_running_loop().time() + wait_s
    with svc.hub.watch(generation_id) as changed:
        # A client that leaves (a closed tab) must not hold the request,
        # nor delay a graceful shutdown, until the wait ends.
        gone = asyncio.create_task(_disconnected(request, changed))
        try:
            while True:
                # Cleared before the read: a change committed after the
                # read sets it again, so the wait below cannot miss it.
                changed.clear()
                generation = await svc.generations.get(caller, generation_id)
                if generation.seq != since:
                    return snapshot_response(generation)
                remaining_s = deadline - asyncio.get_running_loop().time()
                if remaining_s <= 0 or svc.hub.closed or gone.done():
                    return not_modified(generation)
                try:
                    async with asyncio.timeout(remaining_s):
                        await changed.wait()
                except TimeoutError:
                    return not_modified(generation)
        finally:
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)


async def _disconnected(request: Request, changed: asyncio.Event) -> None:
    """Return (and set ``changed``) once the client has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    changed.set()


def not_modified(generation: Generation) -> Response:
    """A 304 answer carrying the generation's current ETag."""
    return Response(status_code=304, headers={"ETag": etag(generation)})


def seq_of_etag(value: str | None) -> int | None:
    """The seq in one of our ETags (``"12"`` or ``W/"12"``), else None."""
    if value is None:
        return None
    text = value.strip().removeprefix("W/")
    if len(text) >= 3 and text[0] == text[-1] == '"' and text[1:-1].isdigit():
        return int(text[1:-1])
    return None


async def events(request: Request) -> Response:
    """A page of the event history; a scoped read token is enough."""
    caller = reader(request, request.path_params["id"])
    since = query_int(request, "sinceSeq", 0, minimum=0, maximum=2**62)
    limit = query_int(request, "limit", 100, minimum=1, maximum=1000)
    rows = await services(request).generations.events(
        caller, request.path_params["id"], since, limit + 1
    )
    # The cursor is the seq to pass as sinceSeq for the next page.
    cursor = str(rows[limit - 1].seq) if len(rows) > limit else None
    return json_response(Page(items=rows[:limit], next_cursor=cursor))


async def clarify(request: Request) -> Response:
    """``POST .../clarify``: merge the answers into the final prompt."""
    caller = principal(request)
    body, _ = await read_body(request, ClarifyBody)
    generation = await services(request).generations.clarify(
        caller, request.path_params["id"], body.answers
    )
    return snapshot_response(generation)


async def confirm(request: Request) -> Response:
    """``POST .../confirm``: accept the price and queue the job."""
    caller = principal(request)
    body, _ = await read_body(request, ConfirmBody)
    generation = await services(request).generations.confirm(
        caller, request.path_params["id"], body.accepted_cost_usd
    )
    return snapshot_response(generation)


async def cancel(request: Request) -> Response:
    """``POST .../cancel``: stop the generation wherever it runs."""
    caller = principal(request)
    generation = await services(request).generations.cancel(
        caller, request.path_params["id"]
    )
    return snapshot_response(generation)


async def retry(request: Request) -> Response:
    """``POST .../retry``: queue a failed or cancelled generation again."""
    caller = principal(request)
    generation = await services(request).generations.retry(
        caller, request.path_params["id"]
    )
    return snapshot_response(generation)


async def override_status(request: Request) -> Response:
    """``PUT .../status``: an operator's validated override."""
    caller = principal(request)
    caller.require_operator()
    body, _ = await read_body(request, StatusOverrideBody)
    generation = await services(request).generations.override(
        caller, request.path_params["id"], body.status, body.reason, body.error
    )
    return snapshot_response(generation)


routes = [
    Route("/api/generations", create, methods=["POST"]),
    Route("/api/generations", list_generations, methods=["GET"]),
    Route("/api/generations/{id}", get, methods=["GET"]),
    Route("/api/generations/{id}/events", events, methods=["GET"]),
    Route("/api/generations/{id}/clarify", clarify, methods=["POST"]),
    Route("/api/generations/{id}/confirm", confirm, methods=["POST"]),
    Route("/api/generations/{id}/cancel", cancel, methods=["POST"]),
    Route("/api/generations/{id}/retry", retry, methods=["POST"]),
    Route("/api/generations/{id}/status", override_status, methods=["PUT"]),
]
