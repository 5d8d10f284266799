"""HTTP and WebSocket routes, one module per resource."""

from __future__ import annotations

from starlette.routing import BaseRoute

from nimu_rt.api import generations, health, storage


def all_routes() -> list[BaseRoute]:
    return [*health.routes, *generations.routes, *storage.routes]
