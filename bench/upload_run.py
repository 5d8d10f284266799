"""One upload of the upload benchmark, in a process of its own (for its RSS).

Modes:

``pipeline``
    What a job actor does: the video is made by the Veo 3 simulator
    (``[sim:bytes=N]`` pads it to N bytes), then :func:`store_video`
    streams the download into R2 (here moto) while spooling it to disk,
    probes it with PyAV and stores a thumbnail.
``stream``
    :meth:`R2Storage.upload_stream` alone on the same download: the
    multipart engine without the spool and the PyAV work.
``plain``
    The baseline: the same bytes, downloaded into memory first (untimed),
    then a plain aiobotocore multipart upload (create, parts 4 at a time,
    complete) with the same part size.

Prints ``{"bench": "upload", "mode": ..., "mb_per_s": ..., "peak_rss_mib":
...}``; peak RSS is the process's maximum resident size (getrusage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any

import psutil
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from nimu_rt.config import load_settings
from nimu_rt.models import GenerationOptions
from nimu_rt.storage.r2 import R2Storage
from nimu_rt.storage.video import store_video
from nimu_rt.veo3.client import Succeeded, VideoRef
from nimu_rt.veo3.factory import create_veo3_client

MiB = 2**20


def settings_for(args: argparse.Namespace) -> Any:
    return load_settings(
        env={},
        overrides={
            "veo3": {"provider": "gemini", "api_key": "bench", "poll_initial_s": 0.2},
            "storage": {
                "backend": "r2",
                "endpoint_url": args.endpoint,
                "bucket": args.bucket,
                "access_key_id": "bench",
                "secret_access_key": "bench",
            },
        },
    )


async def make_video(settings: Any, sim_url: str, size: int) -> tuple[Any, VideoRef]:
    veo3 = create_veo3_client(settings, base_url=sim_url)
    options = GenerationOptions(model=settings.generations.default_model)
    name = await veo3.generate_video(
        "A calm lake under the stars at night, cinematic drone shot"
        f" [sim:bytes={size}]",
        options,
    )
    for polls in range(100):
        result = await veo3.poll(name)
        if isinstance(result, Succeeded):
            return veo3, result.video
        await asyncio.sleep(veo3.next_poll_delay_s(polls))
    raise RuntimeError("the simulator did not finish the video")


async def plain_upload(settings: Any, key: str, data: memoryview) -> None:
    s = settings.storage
    config = AioConfig(
        region_name=s.region,
        signature_version="s3v4",
        s3={"addressing_style": s.addressing_style},
        max_pool_connections=s.max_connections,
    )
    async with get_session().create_client(
        "s3",
        endpoint_url=s.endpoint_url,
        aws_access_key_id=s.access_key_id,
        aws_secret_access_key=s.secret_access_key,
        config=config,
    ) as client:
        created = await client.create_multipart_upload(
            Bucket=s.bucket, Key=key, ContentType="video/mp4"
        )
        upload_id = created["UploadId"]
        part = s.part_size_bytes
        slots = asyncio.Semaphore(s.max_parallel_parts)
        parts: list[dict[str, Any]] = []

        async def send(number: int, offset: int) -> None:
            async with slots:
                answer = await client.upload_part(
                    Bucket=s.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=bytes(data[offset : offset + part]),
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})

        await asyncio.gather(
            *(
                send(i + 1, offset)
                for i, offset in enumerate(range(0, len(data), part))
            )
        )
        parts.sort(key=lambda p: p["PartNumber"])
        await client.complete_multipart_upload(
            Bucket=s.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    settings = settings_for(args)
    veo3, video = await make_video(settings, args.sim_url, args.size)
    key = f"videos/bench/{args.mode}-{args.size}.mp4"
    rss_before = psutil.Process().memory_info().rss
    extra: dict[str, Any] = {}
    if args.mode == "plain":
        # Read into one buffer of the final size: the baseline's memory is
        # the video once, plus the parts in flight.
        buffer = bytearray(args.size)
        at = 0
        async for chunk in veo3.download(video):
            buffer[at : at + len(chunk)] = chunk
            at += len(chunk)
        data = memoryview(buffer)[:at]
        rss_before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        await plain_upload(settings, key, data)
        elapsed = time.perf_counter() - started
        size = len(data)
    else:
        storage = R2Storage(settings.storage)
        await storage.open()
        try:
            started = time.perf_counter()
            if args.mode == "pipeline":
                info = await store_video(
                    storage,
                    key,
                    lambda offset: veo3.download(video, offset=offset),
                    settings=settings.storage,
                )
                size = info.size_bytes
                extra["thumbnail"] = info.thumbnail_key is not None
            else:
                stored = await storage.upload_stream(
                    key,
                    lambda offset: veo3.download(video, offset=offset),
                    content_type="video/mp4",
                )
                size = stored.size_bytes
            elapsed = time.perf_counter() - started
        finally:
            await storage.close()
    await veo3.aclose()
    if size != args.size:
        raise RuntimeError(f"uploaded {size} bytes, expected {args.size}")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "bench": "upload",
        "mode": args.mode,
        "bytes": size,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(size / MiB / elapsed, 1),
        "rss_mib_before": round(rss_before / MiB, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "cpu_s": round(cpu.ru_utime + cpu.ru_stime, 2),
        **extra,
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["pipeline", "stream", "plain"])
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--sim-url", required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse(sys.argv[1:])))), flush=True)
