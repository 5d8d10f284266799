"""The application factory: wires settings, store and routes into one ASGI app.

:class:`Services` owns every long-lived part of a running instance and is
the one place that starts and stops them, in order. Routes reach it through
``request.app.state.services``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nimu_rt import logs
from nimu_rt.api import all_routes
from nimu_rt.api.common import problem_response
from nimu_rt.api.metrics import MetricsServer
from nimu_rt.api.middleware import (
    AuthMiddleware,
    LimitsMiddleware,
    RateLimitMiddleware,
    SecurityHeadersMiddleware,
    send_problem,
)
from nimu_rt.auth import TokenAuthority, signing_secret
from nimu_rt.config import Settings
from nimu_rt.errors import (
    ConfigError,
    MethodNotAllowed,
    NimuError,
    NotFound,
)
from nimu_rt.events.hub import QUEUE_TOPIC, Hub
from nimu_rt.generations import Generations
from nimu_rt.jobs.runtime import JobRuntime
from nimu_rt.jobs.stats import QueueStats
from nimu_rt.metrics import Metrics
from nimu_rt.storage import Storage, create_storage
from nimu_rt.store import Store, create_store
from nimu_rt.veo3.client import Veo3Client
from nimu_rt.veo3.factory import create_veo3_client
from nimu_rt.veo3.simulator import SimulatorServer

if TYPE_CHECKING:
    from nimu_rt.events.bridge import PostgresBridge

log = logging.getLogger(__name__)


def default_instance_id() -> str:
    """A name for this process: host, pid and a few random hex digits."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Services:
    """Everything one running instance holds, started and stopped together."""

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or create_store(settings)
        self.storage = storage or create_storage(settings)
        self.instance_id = settings.server.instance_id or default_instance_id()
        self.auth = TokenAuthority(settings, signing_secret(settings))
        # One registry per instance of Services, never the global one.
        self.metrics = Metrics()
        self.storage.metrics = self.metrics
        self.generations = Generations(settings, self.store, self.storage)
        self.generations.metrics = self.metrics
        # Real-time fan-out: every committed event of this instance reaches
        # the hub; with PostgreSQL the bridge brings the other instances'.
        self.hub = Hub()
        self.hub.metrics = self.metrics
        self.store.add_listener(self.hub.publish_events)
        self.bridge: PostgresBridge | None = None
        self.started_monotonic = time.monotonic()
        # Made in start(): the simulator's address is known once it listens.
        self.simulator: SimulatorServer | None = None
        self._veo3: Veo3Client | None = None
        # The instance's actors, heartbeat and (when it leads) the queue.
        self.runtime: JobRuntime | None = None
        # /metrics on a port of its own, when metrics.separate is set.
        self.metrics_server: MetricsServer | None = None
        self._started = False
        self._stack = contextlib.AsyncExitStack()

    @property
    def veo3(self) -> Veo3Client:
        """The Veo 3 client (aimed at the simulator in the embedded default)."""
        if self._veo3 is None:
            raise RuntimeError("Services.start() has not run")
        return self._veo3

    async def _start_veo3(self) -> None:
        # With veo3.base_url the simulator runs elsewhere (`nimu-rt veo3-sim`,
        # shared by the instances of a cluster); without, this process runs it.
        cfg = self.settings.veo3
        if cfg.provider == "simulator" and not cfg.base_url:
            self.simulator = SimulatorServer(self.settings)
            base_url = await self.simulator.start()
            self._veo3 = create_veo3_client(self.settings, base_url=base_url)
        else:
            self._veo3 = create_veo3_client(self.settings)
        self._veo3.metrics = self.metrics

    async def _stop_veo3(self) -> None:
        client, self._veo3 = self._veo3, None
        if client is not None:
            await client.aclose()
        if self.simulator is not None:
            await self.simulator.stop()

    async def start(self) -> None:
        """Open the store and start background work; a second call does nothing.

        Each part's closing is registered as soon as it is open, so a part
        that fails to start closes exactly what was opened before it.
        """
        if self._started:
            return
        stack = contextlib.AsyncExitStack()
        try:
            await self.store.open()
            stack.push_async_callback(self.store.close)
            stack.push_async_callback(self.auth.aclose)
            await self._migrate()
            await self.storage.open()
            stack.push_async_callback(self.storage.close)
            await self._start_veo3()
            stack.push_async_callback(self._stop_veo3)
            if self.store.kind == "postgres":
                from nimu_rt.events.bridge import PostgresBridge
                from nimu_rt.store.postgres import PostgresStore

                assert isinstance(self.store, PostgresStore)
                self.bridge = PostgresBridge(
                    self.store, self.hub, self.settings.realtime
                )
                await self.bridge.start()
                stack.push_async_callback(self.bridge.close)
            stack.callback(self.hub.close)
            self.runtime = JobRuntime(
                self.settings,
                self.store,
                veo3=self.veo3,
                storage=self.storage,
                instance_id=self.instance_id,
                publish_stats=self._publish_queue_stats,
            )
            self.runtime.ctx.metrics = self.metrics
            await self.runtime.start()
            # Stopped first: its last writes (released leases) must still
            # reach the hub and, through the bridge, the other instances.
            stack.push_async_callback(self.runtime.stop)
            # Cancel and overrides must reach the actors of running jobs.
            self.generations.commands = self.runtime
            metrics = self.settings.metrics
            if metrics.enabled and metrics.separate:
                self.metrics_server = MetricsServer(self)
                await self.metrics_server.start()
                stack.push_async_callback(self.metrics_server.stop)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        self.started_monotonic = time.monotonic()
        self._started = True
        log.info(
            "instance %s started with the %s store",
            self.instance_id,
            self.store.kind,
            extra={"action": "instance.start", "instance_id": self.instance_id},
        )

    async def _migrate(self) -> None:
        if self.settings.embedded or self.settings.database.auto_migrate:
            applied = await self.store.migrate()
            if applied:
                log.info(
                    "migrations applied: %s",
                    applied,
                    extra={"action": "store.migrate"},
                )
            return
        pending = await self.store.pending_migrations()
        if pending:
            raise ConfigError(
                f"database: schema migrations {pending} are not applied;"
                " run `nimu-rt migrate` (the Procfile's release step)"
            )

    def _publish_queue_stats(self, stats: QueueStats) -> None:
        self.hub.publish(QUEUE_TOPIC, "stats", stats, retain=True)

    async def stop(self) -> None:
        """Stop everything start() started, in reverse; safe to call twice.

        A part that fails to stop does not keep the others open.
        """
        if not self._started:
            return
        self._started = False
        self.generations.commands = None
        await self._stack.aclose()
        log.info(
            "instance %s stopped",
            self.instance_id,
            extra={"action": "instance.stop", "instance_id": self.instance_id},
        )


def create_app(settings: Settings, *, services: Services | None = None) -> Starlette:
    """The ASGI app for ``settings``; its lifespan starts and stops Services."""
    svc = services or Services(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await svc.start()
        try:
            yield
        finally:
            await svc.stop()

    app = Starlette(
        routes=all_routes(),
        lifespan=lifespan,
        exception_handlers={
            NimuError: _nimu_error,
            HTTPException: _http_error,
        },
    )
    app.state.services = svc
    # add_middleware wraps what is there: the last added runs first. The
    # order is described in nimu_rt/api/middleware.py.
    security = settings.security
    if security.rate_limits:
        app.add_middleware(
            RateLimitMiddleware, settings=settings, metrics=svc.metrics
        )
    app.add_middleware(AuthMiddleware, auth=svc.auth)
    app.add_middleware(LimitsMiddleware, settings=settings)
    if security.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=security.cors_origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=security.cors_max_age_s,
        )
    app.add_middleware(RequestIdMiddleware, metrics=svc.metrics)
    app.add_middleware(
        SecurityHeadersMiddleware, hsts_max_age_s=security.hsts_max_age_s
    )
    return app


# Headers browsers may send cross-origin, and may read from the answers.
CORS_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "If-None-Match",
    "X-Request-ID",
]
CORS_EXPOSED_HEADERS = [
    "ETag",
    "Location",
    "Idempotent-Replayed",
    "X-Request-ID",
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "Retry-After",
]


# -- errors as problem+json ----------------------------------------------------


async def _nimu_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, NimuError)
    return problem_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette raises these for unknown paths and wrong methods.
    assert isinstance(exc, HTTPException)
    error: NimuError
    if exc.status_code == 404:
        error = NotFound(f"no route for {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed here")
    else:
        error = NimuError(str(exc.detail))
        error.status = exc.status_code  # type: ignore[misc]
    response = problem_response(request, error)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


# -- request ids -------------------------------------------------------------------


class RequestIdMiddleware:
    """Gives every request an id (the caller's X-Request-ID when sane).

    The id is returned in ``X-Request-ID``, written into problem documents
    and bound to every log record of the request. Here, too, each HTTP
    request is logged once (``http.request``) and counted in the metrics by
    its route template, and an exception no route handled becomes a 500
    problem (logged once, ``http.error``) that still carries the id and the
    security headers.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or secrets.token_hex(8)
        scope["nimu.request_id"] = request_id
        bound = logs.bind(request_id=request_id)
        started = time.perf_counter()
        status_holder: dict[str, Any] = {}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        # WebSocket frames go straight through: the wrapper only touches
        # HTTP responses, and a connection may send thousands of frames.
        outgoing = send_with_id if scope["type"] == "http" else send
        try:
            await self.app(scope, receive, outgoing)
        except Exception as exc:
            if scope["type"] != "http" or "status" in status_holder:
                raise
            # Logged once here, where the request ends; the client gets the
            # id to quote, not the traceback.
            log.error(
                "unhandled error in %s %s",
                scope["method"],
                scope["path"],
                exc_info=exc,
                extra={"action": "http.error", "request_id": request_id},
            )
            await send_problem(
                scope,
                receive,
                send_with_id,
                NimuError("an unexpected error happened"),
            )
        finally:
            if scope["type"] == "http":
                self._record(scope, status_holder.get("status"), started)
            logs.unbind(bound)

    def _record(self, scope: Scope, status: int | None, started: float) -> None:
        duration_s = time.perf_counter() - started
        log.info(
            "%s %s %s",
            scope["method"],
            scope["path"],
            status or "-",
            extra={
                "action": "http.request",
                # Also bound, but said here for handlers without the filter.
                "request_id": scope.get("nimu.request_id"),
                "status": status,
                "duration_ms": round(duration_s * 1000, 2),
            },
        )
        if self.metrics is not None:
            route = scope.get("route")
            # Templates, never raw paths: ids must not become labels.
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.http_request(
                scope["method"], template, status or 0, duration_s
            )


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            # Printable ASCII without spaces: it is echoed into logs.
            if 0 < len(text) <= 128 and all("!" <= c <= "~" for c in text):
                return text
    return None
