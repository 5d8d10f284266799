"""The application factory: wires settings, store and routes into one ASGI app.

:class:`Services` owns every long-lived part of a running instance and is
the one place that starts and stops them, in order. Routes reach it through
``request.app.state.services``.
"""

from __future__ import annotations

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
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nimu_rt.api import all_routes
from nimu_rt.auth import TokenAuthority, signing_secret
from nimu_rt.config import Settings
from nimu_rt.errors import (
    ConfigError,
    MethodNotAllowed,
    NimuError,
    NotFound,
)
from nimu_rt.events.hub import Hub
from nimu_rt.generations import Generations
from nimu_rt.jobs.runtime import JobRuntime
from nimu_rt.models import encode
from nimu_rt.storage import Storage, create_storage
from nimu_rt.store import Store, create_store
from nimu_rt.veo3.client import Veo3Client
from nimu_rt.veo3.factory import create_veo3_client
from nimu_rt.veo3.simulator import SimulatorServer

if TYPE_CHECKING:
    from nimu_rt.events.bridge import PostgresBridge

log = logging.getLogger(__name__)


def default_instance_id() -> str:
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
        self.generations = Generations(settings, self.store)
        # Real-time fan-out: every committed event of this instance reaches
        # the hub; with PostgreSQL the bridge brings the other instances'.
        self.hub = Hub()
        self.store.add_listener(self.hub.publish_events)
        self.bridge: PostgresBridge | None = None
        self.started_monotonic = time.monotonic()
        # Made in start(): the simulator's address is known once it listens.
        self.simulator: SimulatorServer | None = None
        self._veo3: Veo3Client | None = None
        # The instance's actors, heartbeat and (when it leads) the queue.
        self.runtime: JobRuntime | None = None
        self._started = False

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

    async def _stop_veo3(self) -> None:
        client, self._veo3 = self._veo3, None
        if client is not None:
            await client.aclose()
        if self.simulator is not None:
            await self.simulator.stop()

    async def start(self) -> None:
        """Open the store and start background work; a second call does nothing."""
        if self._started:
            return
        await self.store.open()
        if self.settings.embedded or self.settings.database.auto_migrate:
            applied = await self.store.migrate()
            if applied:
                log.info(
                    "migrations applied: %s",
                    applied,
                    extra={"action": "store.migrate"},
                )
        else:
            pending = await self.store.pending_migrations()
            if pending:
                await self.store.close()
                raise ConfigError(
                    f"database: schema migrations {pending} are not applied;"
                    " run `nimu-rt migrate` (the Procfile's release step)"
                )
        try:
            await self.storage.open()
            await self._start_veo3()
            if self.store.kind == "postgres":
                from nimu_rt.events.bridge import PostgresBridge
                from nimu_rt.store.postgres import PostgresStore

                assert isinstance(self.store, PostgresStore)
                self.bridge = PostgresBridge(
                    self.store, self.hub, self.settings.realtime
                )
                await self.bridge.start()
            self.runtime = JobRuntime(
                self.settings,
                self.store,
                veo3=self.veo3,
                storage=self.storage,
                instance_id=self.instance_id,
            )
            await self.runtime.start()
            # Cancel and overrides must reach the actors of running jobs.
            self.generations.commands = self.runtime
        except BaseException:
            if self.runtime is not None:
                await self.runtime.stop()
            if self.bridge is not None:
                await self.bridge.close()
            await self._stop_veo3()
            await self.storage.close()
            await self.store.close()
            raise
        self.started_monotonic = time.monotonic()
        self._started = True
        log.info(
            "instance %s started with the %s store",
            self.instance_id,
            self.store.kind,
            extra={"action": "instance.start", "instance_id": self.instance_id},
        )

    async def stop(self) -> None:
        """Stop background work and close the store; safe to call twice."""
        if not self._started:
            return
        self._started = False
        # First: the runtime's last writes (released leases) must still reach
        # the hub and, through the bridge, the other instances.
        if self.runtime is not None:
            await self.runtime.stop()
        self.hub.close()
        if self.bridge is not None:
            await self.bridge.close()
        await self._stop_veo3()
        await self.storage.close()
        await self.store.close()
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
            Exception: _unexpected_error,
        },
    )
    app.state.services = svc
    app.add_middleware(RequestIdMiddleware)
    return app


# -- errors as problem+json ----------------------------------------------------


def problem_response(request: Request, error: NimuError) -> Response:
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


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    # Logged once here, where the request ends; the client gets the id to
    # quote, not the traceback.
    log.error(
        "unhandled error in %s %s",
        request.method,
        request.url.path,
        exc_info=exc,
        extra={
            "action": "http.error",
            "request_id": request.scope.get("nimu.request_id"),
        },
    )
    return problem_response(request, NimuError("an unexpected error happened"))


# -- request ids -------------------------------------------------------------------


class RequestIdMiddleware:
    """Gives every request an id (the caller's X-Request-ID when sane).

    The id is returned in ``X-Request-ID``, written into problem documents
    and log records, so a user's report can be matched to the server's logs.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or secrets.token_hex(8)
        scope["nimu.request_id"] = request_id
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
        finally:
            if scope["type"] == "http":
                log.info(
                    "%s %s %s",
                    scope["method"],
                    scope["path"],
                    status_holder.get("status", "-"),
                    extra={
                        "action": "http.request",
                        "request_id": request_id,
                        "status": status_holder.get("status"),
                        "duration_ms": round(
                            (time.perf_counter() - started) * 1000, 2
                        ),
                    },
                )


def _incoming_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            # Printable ASCII without spaces: it is echoed into logs.
            if 0 < len(text) <= 128 and all("!" <= c <= "~" for c in text):
                return text
    return None
