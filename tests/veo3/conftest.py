"""Fixtures for the Veo 3 tests: the simulator under uvicorn, real clients."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from nimu_rt.config import Settings
from nimu_rt.models import GenerationOptions
from nimu_rt.veo3.client import PollResult, Running, Veo3Client
from nimu_rt.veo3.gemini import GeminiClient
from nimu_rt.veo3.simulator import Simulator, create_simulator_app
from nimu_rt.veo3.vertex import StaticToken, VertexClient
from tests.support import WAIT_S, make_settings, serve

# Fast settings: no generation time, tiny frames, tiny backoff.
FAST_SIMULATOR = {
    "generation_s": 0.0,
    "frame_short_side_px": 32,
    "retry_delay_s": 0.01,
    "slow_s": WAIT_S,
}
FAST_VEO3 = {
    "retry_initial_s": 0.005,
    "retry_max_s": 0.02,
    "poll_initial_s": 0.005,
    "poll_max_s": 0.02,
    "request_timeout_s": WAIT_S,
    "download_read_timeout_s": WAIT_S,
    "connect_timeout_s": WAIT_S,
    "vertex_project": "test-project",
}
PROMPT = "A red fox trots through a snowy forest at dawn"


@dataclass
class SimEnv:
    """A running simulator and the settings it was made from."""

    base_url: str
    settings: Settings
    simulator: Simulator
    admin: httpx.AsyncClient
    clients: list[Veo3Client]

    async def stats(self) -> dict[str, Any]:
        """The admin route's counts, read over HTTP like any user would."""
        response = await self.admin.get("/_sim/stats")
        assert response.status_code == 200
        return response.json()

    def gemini(self, api_key: str = "test-key", **veo3: Any) -> GeminiClient:
        client = GeminiClient(
            self._client_settings(veo3), api_key=api_key, base_url=self.base_url
        )
        self.clients.append(client)
        return client

    def vertex(self, token: str = "test-token", **veo3: Any) -> VertexClient:
        client = VertexClient(
            self._client_settings(veo3),
            tokens=StaticToken(token),
            base_url=self.base_url,
        )
        self.clients.append(client)
        return client

    def _client_settings(self, veo3: dict[str, Any]) -> Settings:
        if not veo3:
            return self.settings
        merged = {**FAST_VEO3, **veo3}
        return make_settings(
            Path(self.settings.server.data_dir),
            {"veo3": merged, "simulator": FAST_SIMULATOR},
        )


SimFactory = Callable[..., Any]


@pytest.fixture
async def sim_factory(tmp_path: Path) -> AsyncIterator[SimFactory]:
    """Starts simulators (with [simulator]/[veo3] overrides); all stopped after."""
    stack: list[Any] = []
    envs: list[SimEnv] = []

    async def start(
        simulator: dict[str, Any] | None = None, veo3: dict[str, Any] | None = None
    ) -> SimEnv:
        settings = make_settings(
            tmp_path / "data",
            {
                "simulator": {**FAST_SIMULATOR, **(simulator or {})},
                "veo3": {**FAST_VEO3, **(veo3 or {})},
            },
        )
        app = create_simulator_app(settings)
        server = serve(app)
        base_url = await server.__aenter__()
        stack.append(server)
        admin = httpx.AsyncClient(base_url=base_url, timeout=WAIT_S)
        stack.append(admin)
        env = SimEnv(base_url, settings, app.state.simulator, admin, [])
        envs.append(env)
        return env

    yield start
    for env in envs:
        for client in env.clients:
            await client.aclose()
    for item in reversed(stack):
        await item.__aexit__(None, None, None)


@pytest.fixture
async def sim(sim_factory: SimFactory) -> SimEnv:
    """A simulator with the fast test settings."""
    return await sim_factory()


def options(**fields: Any) -> GenerationOptions:
    fields.setdefault("model", "veo-3.1-generate-001")
    fields.setdefault("duration_seconds", 4)
    return GenerationOptions(**fields)


async def wait_done(client: Veo3Client, name: str) -> PollResult:
    """Poll as the job actor would, with the client's delays; bounded."""
    polls = 0
    async with asyncio.timeout(WAIT_S):
        while True:
            result = await client.poll(name)
            if not isinstance(result, Running):
                return result
            await asyncio.sleep(client.next_poll_delay_s(polls))
            polls += 1


async def read_all(stream: AsyncIterator[bytes]) -> bytes:
    async with asyncio.timeout(WAIT_S):
        return b"".join([chunk async for chunk in stream])


@dataclass
class Probe:
    """What a player sees in an MP4."""

    width: int
    height: int
    fps: float
    duration_s: float
    codec: str
    has_audio: bool
    frames: int


def probe(data: bytes) -> Probe:
    """Decode every video frame with PyAV: proves the file plays."""
    with av.open(io.BytesIO(data)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        return Probe(
            width=video.codec_context.width,
            height=video.codec_context.height,
            fps=float(video.average_rate or 0),
            duration_s=float(container.duration or 0) / 1_000_000,
            codec=video.codec_context.name,
            has_audio=bool(container.streams.audio),
            frames=frames,
        )


def retries(caplog: pytest.LogCaptureFixture, stage: str) -> int:
    """How many retries the client logged for ``stage``."""
    return sum(
        1
        for record in caplog.records
        if getattr(record, "action", None) == "veo3.retry"
        and getattr(record, "stage", None) == stage
    )


@pytest.fixture
def retry_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="nimu_rt.veo3.transport")
    return caplog
