"""``POST /api/tokens``: short-lived read tokens for browser pages.

A page that shows a generation needs a token, but should not hold the
user's full credential. A signed-in user (or a service, on a user's
behalf) asks for a token scoped to:

- ``generationIds``: reading those generations (snapshot, long-poll,
  events, video links; ``generation:{id}`` over ``/ws``);
- ``userTopic``: the user's own ``user:{id}`` topic over ``/ws``;

and nothing else: every other route answers 403 ``scope_denied``. The
token is signed with the service's shared secret (``auth.jwt_secret``;
every instance needs the same one) and lives ``auth.scoped_token_ttl_s``
unless a shorter or longer one (up to ``auth.scoped_token_max_ttl_s``) is
asked for. It cannot be revoked: keep it short.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Annotated

from msgspec import Meta
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nimu_rt.api.common import json_response, principal, read_body, services
from nimu_rt.api.schemas import Body, check_token
from nimu_rt.auth import Principal, principal_from_claims
from nimu_rt.errors import Forbidden, Unauthorized, ValidationFailed
from nimu_rt.events.hub import generation_topic, user_topic
from nimu_rt.models import Record

log = logging.getLogger(__name__)

MAX_GENERATIONS_PER_TOKEN = 100


class TokenBody(Body, kw_only=True):
    """What a scoped token may read, and for whom."""

    generation_ids: Annotated[
        list[str], Meta(max_length=MAX_GENERATIONS_PER_TOKEN)
    ] = []
    user_topic: bool = False
    ttl_seconds: Annotated[int, Meta(ge=1)] | None = None
    # Service callers only: mint for this user instead of themselves.
    user_id: str | None = None


class ScopedToken(Record, kw_only=True):
    """A minted token: send it as ``Authorization: Bearer <token>``."""

    token: str
    token_type: str = "Bearer"
    user_id: str
    scopes: list[str]
    expires_at: dt.datetime
    expires_in_seconds: int


async def mint(request: Request) -> Response:
    """Mint a scoped read token (201); the caller must own what it names."""
    caller = principal(request)
    svc = services(request)
    body, _ = await read_body(request, TokenBody)
    auth = svc.settings.auth
    problems: list[dict[str, str]] = []
    # 1. Whose token: the caller's own, or a user's when a service asks.
    owner = caller
    if body.user_id is not None and body.user_id != caller.user_id:
        if caller.role != "service":
            raise Forbidden("only a service may mint tokens for another user")
        try:
            owner = principal_from_claims({"sub": body.user_id})
        except Unauthorized as exc:
            problems.append({"path": "$.userId", "message": exc.detail})
    # 2. What it may read: at least one thing, each named once.
    if not body.generation_ids and not body.user_topic:
        problems.append(
            {"path": "$", "message": "name generationIds or set userTopic"}
        )
    for index, generation_id in enumerate(body.generation_ids):
        problems += check_token(f"$.generationIds[{index}]", generation_id)
    ttl_s = body.ttl_seconds or auth.scoped_token_ttl_s
    if ttl_s > auth.scoped_token_max_ttl_s:
        problems.append(
            {
                "path": "$.ttlSeconds",
                "message": f"must be at most {auth.scoped_token_max_ttl_s}",
            }
        )
    if problems:
        raise ValidationFailed(problems)
    # 3. Ownership: another user's generation is "not found", as elsewhere.
    reader = Principal(user_id=owner.user_id)
    scopes = set()
    for generation_id in dict.fromkeys(body.generation_ids):
        await svc.generations.get(reader, generation_id)
        scopes.add(generation_topic(generation_id))
    if body.user_topic:
        scopes.add(user_topic(owner.user_id))
    token, expires_at = svc.auth.mint_scoped(owner.user_id, scopes, ttl_s)
    log.info(
        "scoped token minted for %d topics",
        len(scopes),
        extra={
            "action": "auth.mint",
            "user_id": owner.user_id,
            "minted_by": caller.user_id,
            "ttl_s": ttl_s,
        },
    )
    return json_response(
        ScopedToken(
            token=token,
            user_id=owner.user_id,
            scopes=sorted(scopes),
            expires_at=expires_at,
            expires_in_seconds=ttl_s,
        ),
        201,
        headers={"Cache-Control": "no-store"},
    )


routes = [Route("/api/tokens", mint, methods=["POST"])]
