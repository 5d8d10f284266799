"""The Python client of nimu_rt: REST calls and a self-resuming event feed.

::

    async with NimuClient("http://127.0.0.1:8000", token) as client:
        generation = await client.create("A red fox in the snow at dawn")
        generation = await client.confirm(generation.id, generation.cost_estimate.usd)
        async with client.follow(generation.id) as feed:
            async for update in feed:
                print(update.generation.status, update.generation.progress)

The feed ends when the generation reaches a terminal status.
"""

from __future__ import annotations

from nimu_rt.client.rest import ApiError, RestClient, ServiceUnreachable
from nimu_rt.client.stream import Feed, StreamClosed, Update, apply_event, follow
from nimu_rt.models import Generation

__all__ = [
    "ApiError",
    "Feed",
    "NimuClient",
    "ServiceUnreachable",
    "StreamClosed",
    "Update",
    "apply_event",
]


class NimuClient(RestClient):
    """REST routes plus :meth:`follow`, for one bearer token.

    ``ws_url`` defaults to the base URL with ``ws``/``wss`` and ``/ws``.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        ws_url: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        super().__init__(base_url, token, timeout_s=timeout_s)
        if ws_url is None:
            scheme, _, rest = self.base_url.partition("://")
            ws_url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws"
        self.ws_url = ws_url

    async def __aenter__(self) -> NimuClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def follow(
        self,
        generation_id: str,
        *,
        since: Generation | None = None,
        stop_at_terminal: bool = True,
        give_up_after_s: float = 60.0,
    ) -> Feed:
        """Live updates of one generation, resuming by itself after drops.

        See :func:`nimu_rt.client.stream.follow`.
        """
        return follow(
            self.ws_url,
            self.token,
            generation_id,
            since=since,
            stop_at_terminal=stop_at_terminal,
            give_up_after_s=give_up_after_s,
        )
