"""Liveness, readiness and the operators' summary."""

from __future__ import annotations

import logging
import time
from typing import Literal

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nimu_rt import __version__
from nimu_rt.api.common import json_response, operator, services
from nimu_rt.errors import NimuError, StoreUnavailable
from nimu_rt.models import Record

log = logging.getLogger(__name__)


class Liveness(Record, kw_only=True):
    """The answer of ``/healthz``: the process serves requests."""

    status: Literal["ok"] = "ok"


class Readiness(Record, kw_only=True):
    """The answer of ``/readyz``: the store answered."""

    status: Literal["ready"] = "ready"
    store: str


class HealthSummary(Record, kw_only=True):
    """The operators' summary of one instance."""

    status: Literal["ok"] = "ok"
    version: str
    instance_id: str
    store: str
    uptime_seconds: float
    generations_by_status: dict[str, int]


async def healthz(request: Request) -> Response:
    """The process is alive and serving. No I/O, no auth."""
    return json_response(Liveness())


async def readyz(request: Request) -> Response:
    """Ready for traffic: the store answers. 503 otherwise. No auth."""
    svc = services(request)
    try:
        await svc.store.ping()
    except NimuError as exc:
        # The cause (host names, addresses) is for the operator's log, not
        # for an unauthenticated caller.
        log.warning("not ready: %s", exc.detail, extra={"action": "health.ready"})
        raise StoreUnavailable("not ready: the database does not answer") from None
    return json_response(Readiness(store=svc.store.kind))


async def health(request: Request) -> Response:
    """Version, instance, store and generation counts (admin)."""
    operator(request)
    svc = services(request)
    counts = await svc.store.counts_by_status()
    return json_response(
        HealthSummary(
            version=__version__,
            instance_id=svc.instance_id,
            store=svc.store.kind,
            uptime_seconds=round(time.monotonic() - svc.started_monotonic, 3),
            generations_by_status=counts,
        )
    )


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/api/health", health, methods=["GET"]),
]
