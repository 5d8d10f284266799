"""``GET /metrics``: the instance's Prometheus metrics.

By default it is a route of the service, for admin and service tokens only
(metrics tell how busy the service is and how much it spends). With
``metrics.separate`` it moves to a listener of its own
(:class:`MetricsServer`, ``metrics.host``:``metrics.port``) without auth,
meant for a private network, and the route on the service's port answers
404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nimu_rt.api.common import operator, services
from nimu_rt.errors import NotFound
from nimu_rt.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from nimu_rt.app import Services

log = logging.getLogger(__name__)

# How long the separate listener may take to start or to stop.
_LISTENER_WAIT_S = 10.0


async def scrape(svc: Services) -> Response:
    """The current metrics, gauges read from the store first."""
    await svc.metrics.refresh(svc)
    return Response(svc.metrics.exposition(), media_type=CONTENT_TYPE)


async def metrics(request: Request) -> Response:
    """Prometheus text format; admin or service role (see module doc)."""
    svc = services(request)
    config = svc.settings.metrics
    if not config.enabled or config.separate:
        raise NotFound("metrics are not served on this port")
    operator(request)
    return await scrape(svc)


routes = [Route("/metrics", metrics, methods=["GET"])]


class MetricsServer:
    """A plain HTTP listener that serves only ``/metrics``, without auth."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.url: str | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> None:
        """Listen on ``metrics.host``:``metrics.port`` (0: a free port)."""
        config = self.svc.settings.metrics

        async def endpoint(request: Request) -> Response:
            return await scrape(self.svc)

        app = Starlette(routes=[Route("/metrics", endpoint, methods=["GET"])])
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((config.host, config.port))
        except OSError:
            sock.close()
            raise
        self._socket = sock
        host, port = sock.getsockname()[:2]
        server = uvicorn.Server(
            uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        )
        # The service's own process handles signals.
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self._server = server
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        async with asyncio.timeout(_LISTENER_WAIT_S):
            while not server.started:
                if self._task.done():
                    await self._task
                    raise RuntimeError("the metrics listener stopped at start")
                await asyncio.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}/metrics"
        log.info(
            "metrics served at %s",
            self.url,
            extra={"action": "metrics.listen"},
        )

    async def stop(self) -> None:
        """Stop listening; safe to call twice."""
        server, task = self._server, self._task
        self._server = self._task = None
        if server is not None:
            server.should_exit = True
        if task is not None:
            try:
                async with asyncio.timeout(_LISTENER_WAIT_S):
                    await task
            except TimeoutError:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._socket is not None:
            self._socket.close()
            self._socket = None
