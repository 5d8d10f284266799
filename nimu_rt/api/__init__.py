"""HTTP and WebSocket routes, one module per resource."""

from __future__ import annotations

from starlette.routing import BaseRoute

from nimu_rt.api import generations, health, queue, static, storage, ws


def all_routes() -> list[BaseRoute]:
    return [
        *health.routes,
        *generations.routes,
        *queue.routes,
        *storage.routes,
        *ws.routes,
        *static.routes,
    ]
