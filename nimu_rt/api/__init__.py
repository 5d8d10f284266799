"""HTTP and WebSocket routes, one module per resource."""

from __future__ import annotations

from starlette.routing import BaseRoute

from nimu_rt.api import (
    generations,
    health,
    metrics,
    openapi,
    queue,
    static,
    storage,
    tokens,
    ws,
)


def all_routes() -> list[BaseRoute]:
    """Every HTTP and WebSocket route of the app, in matching order."""
    return [
        *health.routes,
        *generations.routes,
        *queue.routes,
        *storage.routes,
        *tokens.routes,
        *metrics.routes,
        *openapi.routes,
        *ws.routes,
        *static.routes,
    ]
