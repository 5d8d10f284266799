"""The guards every request passes before (and after) its route.

From the outside in (``create_app`` adds them in this order):

1. request ids, log ids and HTTP metrics (``RequestIdMiddleware``, app.py);
2. :class:`SecurityHeadersMiddleware`: nosniff, no referrer, no framing,
   HSTS on https, on every answer including errors and refused handshakes;
3. CORS (Starlette's), when ``security.cors_origins`` lists origins;
4. :class:`LimitsMiddleware`: request head size (431), body size (413), and
   the time allowed until the answer starts (503 ``request_timeout``);
5. :class:`AuthMiddleware`: verifies the bearer token, once, for routes and
   ``/ws`` alike, and binds the user id to the request's log records;
6. :class:`RateLimitMiddleware`: token buckets per user and per client
   address on POST, PUT, PATCH and DELETE (429 ``rate_limited``).

Answers made here are problem+json like the routes' own, with the request
id. None of these read or buffer a body beyond counting its bytes.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nimu_rt import logs
from nimu_rt.api.common import AUTH_SCOPE_KEY, problem_response
from nimu_rt.auth import Principal, TokenAuthority
from nimu_rt.config import Settings
from nimu_rt.errors import (
    HeadersTooLarge,
    NimuError,
    PayloadTooLarge,
    RateLimited,
    RequestTimeout,
)
from nimu_rt.metrics import Metrics
from nimu_rt.ratelimit import Decision, RateLimiter, TokenBuckets

MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The local storage backend's stand-in for presigned R2 uploads takes
# reference images, far larger than any JSON body.
OBJECT_UPLOAD_PREFIX = "/api/storage/objects/"

_START_TYPES = ("http.response.start", "websocket.http.response.start")


async def send_problem(
    scope: Scope,
    receive: Receive,
    send: Send,
    error: NimuError,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer an HTTP request with ``error`` as problem+json."""
    response = problem_response(Request(scope), error)
    if headers:
        response.headers.update(headers)
    await response(scope, receive, send)


def _with_headers(
    send: Send, extra: list[tuple[bytes, bytes]], types: tuple[str, ...]
) -> Send:
    """``send`` that adds ``extra`` headers to the start of the answer."""

    async def sender(message: Message) -> None:
        if message["type"] in types:
            present = {name.lower() for name, _ in message.get("headers", [])}
            added = [(n, v) for n, v in extra if n not in present]
            if added:
                message = {
                    **message,
                    "headers": [*message.get("headers", []), *added],
                }
        await send(message)

    return sender


class SecurityHeadersMiddleware:
    """Headers that make browsers treat every answer conservatively.

    ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer``,
    ``X-Frame-Options: DENY`` with ``Content-Security-Policy:
    frame-ancestors 'none'``, and ``Strict-Transport-Security`` when the
    request came over https (as uvicorn saw it: behind a proxy, from
    ``X-Forwarded-Proto`` sent by a trusted address). A header a route set
    itself is left alone.
    """

    def __init__(self, app: ASGIApp, *, hsts_max_age_s: int) -> None:
        self.app = app
        self._headers = [
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY"),
            (b"content-security-policy", b"frame-ancestors 'none'"),
        ]
        self._https_headers = list(self._headers)
        if hsts_max_age_s > 0:
            self._https_headers.append(
                (
                    b"strict-transport-security",
                    f"max-age={hsts_max_age_s}; includeSubDomains".encode(),
                )
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        secure = scope.get("scheme") in ("https", "wss")
        headers = self._https_headers if secure else self._headers
        await self.app(scope, receive, _with_headers(send, headers, _START_TYPES))


class LimitsMiddleware:
    """Refuses oversized requests and answers slow ones with 503.

    - A request head over ``security.max_header_bytes`` gets 431. The HTTP
      parser has read it by then; uvicorn's h11 parser is capped at the
      same size (see :func:`nimu_rt.api.ws.uvicorn_options`).
    - A body over ``server.max_body_bytes`` gets 413: at once when
      Content-Length says so, or when the bytes read pass it. Local-storage
      object uploads have ``storage.max_reference_image_bytes`` instead.
    - An answer that has not started after ``security.request_timeout_s``
      (plus ``realtime.longpoll_max_wait_s`` for a long-poll) is replaced by
      503 ``request_timeout``; the route's work is cancelled. Once the
      answer has started, streaming it is not limited here.

    WebSocket handshakes pass untouched: their limits are the WebSocket
    layer's (``realtime.max_message_bytes``).
    """

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.max_header_bytes = settings.security.max_header_bytes
        self.max_body_bytes = settings.server.max_body_bytes
        self.max_object_bytes = settings.storage.max_reference_image_bytes
        self.timeout_s = settings.security.request_timeout_s
        self.longpoll_s = settings.realtime.longpoll_max_wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # 1. The head.
        head_bytes = sum(len(n) + len(v) for n, v in scope["headers"])
        if head_bytes > self.max_header_bytes:
            await send_problem(
                scope,
                receive,
                send,
                HeadersTooLarge(
                    f"the request headers must be at most {self.max_header_bytes}"
                    " bytes together"
                ),
            )
            return
        # 2. The body: declared, then counted.
        limit = self.max_body_bytes
        if scope["path"].startswith(OBJECT_UPLOAD_PREFIX):
            limit = self.max_object_bytes
        too_large = PayloadTooLarge(f"the body must be at most {limit} bytes")
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await send_problem(scope, receive, send, too_large)
                return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        # 3. The time until the answer starts.
        timeout_s = self.timeout_s
        if b"waitSeconds=" in scope.get("query_string", b""):
            timeout_s += self.longpoll_s
        started = False
        deadline = asyncio.timeout(timeout_s)

        async def timed_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                deadline.reschedule(None)
            await send(message)

        try:
            async with deadline:
                await self.app(scope, counted_receive, timed_send)
        except TimeoutError:
            # Only our own deadline, and only before anything was sent: a
            # TimeoutError of the route's own is the route's to answer.
            if started or not deadline.expired():
                raise
            await send_problem(
                scope,
                receive,
                send,
                RequestTimeout(
                    f"no answer within {timeout_s:g} seconds; try again",
                ),
            )


class AuthMiddleware:
    """Verifies the bearer token of HTTP requests and WebSocket handshakes.

    Leaves the principal (or the error that refused the token) in the scope
    for :func:`nimu_rt.api.common.principal`; a missing header is left for
    the route to judge (some routes need no token). Does not refuse
    anything itself.
    """

    def __init__(self, app: ASGIApp, *, auth: TokenAuthority) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = _header(scope, b"authorization")
            if header is not None:
                outcome: Principal | NimuError
                try:
                    outcome = await self.auth.authenticate(header)
                except NimuError as exc:
                    outcome = exc
                else:
                    # Unbound with the request id when the request ends.
                    logs.bind(user_id=outcome.user_id)
                scope[AUTH_SCOPE_KEY] = outcome
        await self.app(scope, receive, send)


class RateLimitMiddleware:
    """Token buckets per user and per client address on mutating requests.

    Every POST, PUT, PATCH and DELETE takes a token from the caller's
    address bucket and, with a valid token, from the user's; admin and
    service callers are not limited. The answer carries ``RateLimit-Limit``,
    ``RateLimit-Remaining`` and ``RateLimit-Reset`` (the IETF draft's
    names) for the tighter bucket; a refusal is 429 ``rate_limited`` with
    ``Retry-After``. Reads are not limited.
    """

    def __init__(
        self, app: ASGIApp, *, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        self.app = app
        sec = settings.security
        self.limiter = RateLimiter(
            [
                TokenBuckets(
                    "user",
                    rate_per_s=sec.user_rate_per_s,
                    burst=sec.user_burst,
                    max_keys=sec.rate_limit_max_keys,
                ),
                TokenBuckets(
                    "ip",
                    rate_per_s=sec.ip_rate_per_s,
                    burst=sec.ip_burst,
                    max_keys=sec.rate_limit_max_keys,
                ),
            ]
        )
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in MUTATING_METHODS:
            await self.app(scope, receive, send)
            return
        caller = scope.get(AUTH_SCOPE_KEY)
        keys: dict[str, str] = {}
        if isinstance(caller, Principal):
            if caller.is_operator:
                await self.app(scope, receive, send)
                return
            keys["user"] = caller.user_id
        client = scope.get("client")
        keys["ip"] = client[0] if client else "unknown"
        decision = self.limiter.check(keys)
        headers = rate_limit_headers(decision)
        if not decision.allowed:
            if self.metrics is not None:
                self.metrics.rate_limited.labels(decision.limited_by or "").inc()
            who = "address" if decision.limited_by == "ip" else "user"
            error = RateLimited(
                f"too many requests from this {who}; try again in"
                f" {decision.retry_after_s} s",
                retry_after_s=decision.retry_after_s,
            )
            # Which bucket ran dry: "user" or "ip".
            error.extra["limit"] = decision.limited_by
            await send_problem(
                scope,
                receive,
                send,
                error,
                {k.decode(): v.decode() for k, v in headers},
            )
            return
        await self.app(
            scope, receive, _with_headers(send, headers, ("http.response.start",))
        )


def rate_limit_headers(decision: Decision) -> list[tuple[bytes, bytes]]:
    """The RateLimit-* headers (and Retry-After on a refusal)."""
    headers = [
        (b"ratelimit-limit", str(decision.limit).encode()),
        (b"ratelimit-remaining", str(decision.remaining).encode()),
        (b"ratelimit-reset", str(decision.reset_s).encode()),
    ]
    if not decision.allowed:
        headers.append((b"retry-after", str(decision.retry_after_s).encode()))
    return headers


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None

