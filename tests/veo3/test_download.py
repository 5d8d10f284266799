"""Downloads: redirects, Range resumes, dropped connections, bounded memory."""

from __future__ import annotations

import hashlib
import tracemalloc

import pytest

from nimu_rt.errors import Veo3Final, Veo3Retryable
from nimu_rt.veo3 import codes
from nimu_rt.veo3.client import Succeeded, VideoRef
from nimu_rt.veo3.gemini import GeminiClient
from tests.veo3.conftest import (
    PROMPT,
    SimEnv,
    SimFactory,
    options,
    probe,
    read_all,
    wait_done,
)


async def finished(client: GeminiClient, prompt: str) -> VideoRef:
    result = await wait_done(client, await client.generate_video(prompt, options()))
    assert isinstance(result, Succeeded), result
    return result.video


async def test_download_follows_the_redirect_to_a_second_url(sim: SimEnv) -> None:
    client = sim.gemini()
    video = await finished(client, PROMPT)
    data = await read_all(client.download(video))
    assert probe(data).frames == 96
    assert (await sim.stats())["requests"]["redirect"] == 1


async def test_download_without_redirect(sim_factory: SimFactory) -> None:
    sim = await sim_factory(simulator={"redirect_downloads": False})
    client = sim.gemini()
    data = await read_all(client.download(await finished(client, PROMPT)))
    assert probe(data).frames == 96
    assert (await sim.stats())["requests"]["redirect"] == 0


async def test_download_resumes_from_an_offset(sim: SimEnv) -> None:
    client = sim.gemini()
    video = await finished(client, PROMPT)
    whole = await read_all(client.download(video))
    tail = await read_all(client.download(video, offset=1000))
    assert tail == whole[1000:]
    # Starting at the end is not an error: there is nothing left to send.
    assert await read_all(client.download(video, offset=len(whole))) == b""


async def test_dropped_connections_resume_from_the_last_byte(
    sim: SimEnv, retry_log: pytest.LogCaptureFixture
) -> None:
    client = sim.gemini()
    reference = await read_all(client.download(await finished(client, PROMPT)))

    video = await finished(client, PROMPT + " [sim:drop*3]")
    data = await read_all(client.download(video))
    assert hashlib.sha256(data).digest() == hashlib.sha256(reference).digest()
    stats = await sim.stats()
    assert stats["faults"] == {"drop": 3}
    # The first download, then one request per drop plus the last one.
    assert stats["requests"]["download"] == 1 + 4
    # Each resume starts after the last byte that arrived, never over.
    resumed_at = [
        record.position_bytes  # type: ignore[attr-defined]
        for record in retry_log.records
        if getattr(record, "stage", None) == "download"
    ]
    assert len(resumed_at) == 3
    assert 0 < resumed_at[0] < resumed_at[1] < resumed_at[2] < len(reference)


@pytest.mark.parametrize("fault", ["429", "500", "503"])
async def test_download_errors_are_retried(sim: SimEnv, fault: str) -> None:
    client = sim.gemini()
    video = await finished(client, f"{PROMPT} [sim:{fault}@download*2]")
    assert probe(await read_all(client.download(video))).frames == 96
    assert (await sim.stats())["requests"]["download"] == 3


async def test_download_stalled_past_the_read_timeout_is_retried(
    sim: SimEnv,
) -> None:
    client = sim.gemini(download_read_timeout_s=0.3)
    video = await finished(client, f"{PROMPT} [sim:slow@download]")
    assert probe(await read_all(client.download(video))).frames == 96
    assert (await sim.stats())["requests"]["download"] == 2


async def test_download_that_keeps_failing_ends_retryable(sim: SimEnv) -> None:
    client = sim.gemini()
    video = await finished(client, f"{PROMPT} [sim:503@download*9]")
    with pytest.raises(Veo3Retryable) as caught:
        await read_all(client.download(video))
    assert caught.value.code == codes.UNAVAILABLE


async def test_expired_video_is_final(sim: SimEnv) -> None:
    client = sim.gemini()
    video = await finished(client, PROMPT + " [sim:expired]")
    with pytest.raises(Veo3Final) as caught:
        await read_all(client.download(video))
    assert caught.value.code == codes.VIDEO_NOT_FOUND


async def test_gs_uri_is_unsupported_on_gemini(sim: SimEnv) -> None:
    with pytest.raises(Veo3Final) as caught:
        await read_all(sim.gemini().download(VideoRef(uri="gs://bucket/video.mp4")))
    assert caught.value.code == codes.UNSUPPORTED


async def test_key_is_not_sent_to_a_foreign_host(sim: SimEnv) -> None:
    # The same simulator under another name: a different origin for the
    # client, so the key must stay home and the simulator refuses (403).
    client = sim.gemini()
    video = await finished(client, PROMPT)
    assert video.uri is not None
    foreign = video.uri.replace("127.0.0.1", "localhost")
    with pytest.raises(Veo3Final) as caught:
        await read_all(client.download(VideoRef(uri=foreign)))
    assert caught.value.code == codes.AUTH_FAILED


async def test_200_mb_download_streams_with_bounded_memory(sim: SimEnv) -> None:
    size_bytes = 200 * 1024 * 1024
    client = sim.gemini(download_chunk_bytes=1024 * 1024)
    video = await finished(client, f"{PROMPT} [sim:bytes={size_bytes}]")

    digest = hashlib.sha256()
    received = 0
    largest_chunk = 0
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        async for chunk in client.download(video):
            received += len(chunk)
            largest_chunk = max(largest_chunk, len(chunk))
            digest.update(chunk)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert received == size_bytes
    assert largest_chunk <= 1024 * 1024
    # Client and simulator share this process, so the peak counts both; it
    # must stay a few chunks, nowhere near the 200 MB that went through.
    assert peak_bytes < 24 * 1024 * 1024, peak_bytes
