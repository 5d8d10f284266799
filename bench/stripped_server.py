"""nimu_rt with its external work cut out, to isolate queue and event costs.

Runs the real app (store, coordinator, actors, hub, ``/ws``, REST) exactly
as ``nimu-rt serve`` does, with two parts replaced for the benchmark only:

- Veo 3 is an in-process client that accepts a submission at once and
  answers the first poll with a finished video (no HTTP, no simulator);
- the job actor's video step (:func:`nimu_rt.storage.video.store_video`:
  download, upload, PyAV probe, thumbnail) returns the video's record at
  once and stores nothing.

What is left per generation is what a queue with durable events costs:
the REST calls, every transaction and stored event, the coordinator's
dispatch, the actor's phases and the WebSocket deliveries. The numbers of
this variant are labelled "stripped" wherever they appear.

    uv run python -m bench.stripped_server --port P   (settings from NIMU_*)
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

import nimu_rt.jobs.actor as actor_module
from nimu_rt import cli, logs
from nimu_rt.api.ws import uvicorn_options
from nimu_rt.app import Services, create_app
from nimu_rt.config import load_settings
from nimu_rt.models import CostEstimate, GenerationOptions, VideoInfo
from nimu_rt.sockets import listening_socket
from nimu_rt.storage.base import Storage
from nimu_rt.veo3.client import (
    ImageInput,
    PollResult,
    Succeeded,
    Veo3Client,
    VideoRef,
)
from nimu_rt.veo3.factory import create_veo3_client

VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(48)


class InstantVeo3(Veo3Client):
    """Accepts at once, finishes at once; pricing and checks are the real ones."""

    provider = "instant"

    def __init__(self, real: Veo3Client) -> None:
        self.real = real
        self.typical_generation_s = real.typical_generation_s

    async def generate_video(
        self,
        prompt: str,
        options: GenerationOptions,
        *,
        image: ImageInput | None = None,
    ) -> str:
        return f"models/instant/operations/{uuid.uuid4()}"

    async def poll(self, operation_name: str) -> PollResult:
        return Succeeded(name=operation_name, video=VideoRef(data=VIDEO))

    async def download(
        self, video: VideoRef, *, offset: int = 0
    ) -> AsyncIterator[bytes]:
        yield VIDEO[offset:]

    def validate_prompt(self, prompt: str, options: GenerationOptions) -> list[str]:
        return self.real.validate_prompt(prompt, options)

    def estimate_cost(self, options: GenerationOptions) -> CostEstimate:
        return self.real.estimate_cost(options)

    def next_poll_delay_s(self, polls_so_far: int) -> float:
        return 0.0

    async def aclose(self) -> None:
        await self.real.aclose()


async def stored_nothing(
    storage: Storage, key: str, open_source: Any, **_: Any
) -> VideoInfo:
    """Stands in for store_video: the record of a video that was not stored."""
    return VideoInfo(key=key, size_bytes=len(VIDEO), content_type="video/mp4")


class StrippedServices(Services):
    async def _start_veo3(self) -> None:
        real = create_veo3_client(self.settings, base_url="http://127.0.0.1:9")
        self._veo3 = InstantVeo3(real)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    settings = load_settings(overrides={"server": {"port": args.port}})
    logs.configure(settings.logging)
    cli._tune_garbage_collector()
    actor_module.store_video = stored_nothing  # type: ignore[assignment]
    sock = listening_socket(settings.server.host, args.port)

    async def run() -> None:
        services = StrippedServices(settings)
        await services.start()
        try:
            app = create_app(settings, services=services)
            config = uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                proxy_headers=True,
                **uvicorn_options(settings),
            )
            print(f"stripped nimu-rt serving on {settings.base_url}", flush=True)
            await uvicorn.Server(config).serve(sockets=[sock])
        finally:
            await services.stop()

    cli.run_server(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
