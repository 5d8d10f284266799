"""The Gemini-format client against the simulator over real HTTP."""

from __future__ import annotations

import pytest

from nimu_rt.errors import SafetyFiltered, Veo3Final, Veo3Retryable
from nimu_rt.veo3 import codes
from nimu_rt.veo3.client import Failed, ImageInput, Running, Succeeded
from nimu_rt.veo3.media import render_mp4
from tests.support import free_socket
from tests.veo3.conftest import (
    PROMPT,
    SimEnv,
    SimFactory,
    options,
    probe,
    read_all,
    retries,
    wait_done,
)


async def test_generate_poll_download_makes_a_playable_video(sim: SimEnv) -> None:
    client = sim.gemini()
    name = await client.generate_video(PROMPT, options(aspect_ratio="9:16"))
    assert name.startswith("models/veo-3.1-generate-001/operations/")

    result = await wait_done(client, name)
    assert isinstance(result, Succeeded), result
    assert result.video.uri is not None and ":download" in result.video.uri
    video = probe(await read_all(client.download(result.video)))
    # Portrait, as asked; 4 s at 24 fps; the Gemini API always adds sound.
    assert (video.width, video.height) == (32, 56)
    assert video.fps == 24 and video.frames == 96
    assert video.duration_s == pytest.approx(4, abs=0.1)
    assert video.codec == "h264" and video.has_audio

    stats = await sim.stats()
    assert stats["submissions"] == {"total": 1, "byPrompt": {PROMPT: 1}}
    # Google answers downloads with a redirect; the client followed it.
    assert stats["requests"]["redirect"] == 1


async def test_image_to_video_is_accepted(sim: SimEnv) -> None:
    client = sim.gemini()
    image = ImageInput(data=b"\x89PNG\r\n\x1a\nfirst-frame", mime_type="image/png")
    name = await client.generate_video(PROMPT, options(duration_seconds=8), image=image)
    assert isinstance(await wait_done(client, name), Succeeded)


async def test_operation_is_running_until_generation_time_passed(sim: SimEnv) -> None:
    client = sim.gemini()
    name = await client.generate_video(PROMPT + " [sim:gen=60]", options())
    assert await client.poll(name) == Running(name=name)


async def test_safety_block_reports_google_reasons(sim: SimEnv) -> None:
    client = sim.gemini()
    name = await client.generate_video(PROMPT + " [sim:safety]", options())
    result = await wait_done(client, name)
    assert isinstance(result, Failed)
    error = result.error
    assert isinstance(error, SafetyFiltered)
    assert error.code == codes.SAFETY_FILTERED and not error.retryable
    assert error.filtered_count == 1
    assert "You have not been charged" in error.reasons[0]
    assert "You have not been charged" in error.detail


async def test_operation_errors_keep_google_code_and_retryability(
    sim: SimEnv,
) -> None:
    client = sim.gemini()
    bad = await wait_done(
        client, await client.generate_video(PROMPT + " [sim:error=3]", options())
    )
    assert isinstance(bad, Failed) and isinstance(bad.error, Veo3Final)
    assert bad.error.code == codes.OPERATION_FAILED
    assert "code 3" in bad.error.detail

    internal = await wait_done(
        client, await client.generate_video(PROMPT + " [sim:error]", options())
    )
    assert isinstance(internal, Failed) and isinstance(internal.error, Veo3Retryable)
    assert internal.error.code == codes.OPERATION_TRANSIENT


@pytest.mark.parametrize(
    ("model", "says"),
    [("veo-3.0-generate-001", "no longer available"), ("veo-9-nope", "not found")],
)
async def test_retired_or_unknown_model_is_final(
    sim: SimEnv, model: str, says: str
) -> None:
    client = sim.gemini()
    with pytest.raises(Veo3Final) as caught:
        await client.generate_video(PROMPT, options(model=model))
    assert caught.value.code == codes.MODEL_UNAVAILABLE
    assert says in caught.value.detail
    assert (await sim.stats())["submissions"]["total"] == 0


async def test_request_veo3_refuses_is_final_with_its_message(sim: SimEnv) -> None:
    client = sim.gemini()
    # 1080p needs 8 s; validate_prompt would have said so, Veo 3 says 400.
    assert client.validate_prompt(PROMPT, options(resolution="1080p")) == [
        "durationSeconds: 1080p needs durationSeconds 8"
    ]
    with pytest.raises(Veo3Final) as caught:
        await client.generate_video(PROMPT, options(resolution="1080p"))
    assert caught.value.code == codes.INVALID_REQUEST
    assert "needs durationSeconds 8" in caught.value.detail


async def test_wrong_api_key_is_final(sim_factory: SimFactory) -> None:
    sim = await sim_factory(simulator={"api_key": "right"})
    with pytest.raises(Veo3Final) as caught:
        await sim.gemini(api_key="wrong").generate_video(PROMPT, options())
    assert caught.value.code == codes.AUTH_FAILED
    assert "API key not valid" in caught.value.detail


async def test_unknown_operation_is_final(sim: SimEnv) -> None:
    client = sim.gemini()
    with pytest.raises(Veo3Final) as caught:
        await client.poll("models/veo-3.1-generate-001/operations/nosuchop")
    assert caught.value.code == codes.OPERATION_NOT_FOUND
    with pytest.raises(Veo3Final) as caught:
        await client.poll("../../v1beta/files/x")
    assert caught.value.code == codes.OPERATION_NOT_FOUND


# -- faults on submit -----------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "503"])
async def test_submit_refused_before_acceptance_is_resent(
    sim: SimEnv, retry_log: pytest.LogCaptureFixture, fault: str
) -> None:
    client = sim.gemini()
    prompt = f"{PROMPT} [sim:{fault}*2]"
    name = await client.generate_video(prompt, options())
    assert isinstance(await wait_done(client, name), Succeeded)
    stats = await sim.stats()
    assert stats["requests"]["submit"] == 3
    assert stats["faults"] == {fault: 2}
    assert stats["submissions"]["byPrompt"] == {prompt: 1}
    assert retries(retry_log, "submit") == 2


async def test_quota_exhausted_past_attempts_hands_the_hint_over(
    sim: SimEnv, retry_log: pytest.LogCaptureFixture
) -> None:
    client = sim.gemini()
    with pytest.raises(Veo3Retryable) as caught:
        await client.generate_video(PROMPT + " [sim:429*9]", options())
    assert caught.value.code == codes.RATE_LIMITED
    assert caught.value.retry_after_s == pytest.approx(0.01)
    stats = await sim.stats()
    assert stats["requests"]["submit"] == sim.settings.veo3.retry_attempts == 4
    assert stats["submissions"]["total"] == 0
    assert retries(retry_log, "submit") == 3


async def test_long_retry_hint_is_not_waited_out(sim_factory: SimFactory) -> None:
    sim = await sim_factory(
        simulator={"retry_delay_s": 45.0}, veo3={"retry_hint_max_s": 1.0}
    )
    with pytest.raises(Veo3Retryable) as caught:
        await sim.gemini().generate_video(PROMPT + " [sim:429]", options())
    assert caught.value.retry_after_s == 45.0
    assert (await sim.stats())["requests"]["submit"] == 1


@pytest.mark.parametrize("fault", ["500", "malformed"])
async def test_submit_that_may_have_been_accepted_is_not_resent(
    sim: SimEnv, retry_log: pytest.LogCaptureFixture, fault: str
) -> None:
    client = sim.gemini()
    prompt = f"{PROMPT} [sim:{fault}]"
    with pytest.raises(Veo3Retryable) as caught:
        await client.generate_video(prompt, options())
    assert caught.value.code == codes.SUBMIT_AMBIGUOUS
    stats = await sim.stats()
    # Google did accept it: a second submit would have paid twice.
    assert stats["submissions"]["byPrompt"] == {prompt: 1}
    assert stats["requests"]["submit"] == 1
    assert retries(retry_log, "submit") == 0


async def test_submit_answer_too_slow_is_ambiguous(sim: SimEnv) -> None:
    client = sim.gemini(request_timeout_s=0.3)
    prompt = f"{PROMPT} [sim:slow]"
    with pytest.raises(Veo3Retryable) as caught:
        await client.generate_video(prompt, options())
    assert caught.value.code == codes.SUBMIT_AMBIGUOUS
    assert "in time" in caught.value.detail
    stats = await sim.stats()
    assert stats["submissions"]["byPrompt"] == {prompt: 1}
    assert stats["requests"]["submit"] == 1


async def test_connection_refused_is_resent_then_retryable(
    sim: SimEnv, retry_log: pytest.LogCaptureFixture
) -> None:
    # A port that was bound and released: nothing listens there.
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    client = sim.gemini(connect_timeout_s=1.0)
    client.base_url = f"http://127.0.0.1:{port}"
    with pytest.raises(Veo3Retryable) as caught:
        await client.generate_video(PROMPT, options())
    assert caught.value.code == codes.CONNECTION_FAILED
    assert retries(retry_log, "submit") == 3


# -- faults on poll ---------------------------------------------------------------


@pytest.mark.parametrize("fault", ["429", "500", "503", "malformed", "slow"])
async def test_poll_faults_are_retried(
    sim: SimEnv, retry_log: pytest.LogCaptureFixture, fault: str
) -> None:
    client = sim.gemini(request_timeout_s=0.5)
    prompt = f"{PROMPT} [sim:{fault}@poll*2]"
    name = await client.generate_video(prompt, options())
    result = await client.poll(name)
    assert isinstance(result, Succeeded)
    stats = await sim.stats()
    assert stats["requests"]["poll"] == 3
    assert stats["faults"] == {fault: 2}
    assert retries(retry_log, "poll") == 2


async def test_poll_gives_up_after_its_attempts(sim: SimEnv) -> None:
    client = sim.gemini()
    name = await client.generate_video(PROMPT + " [sim:503@poll*9]", options())
    with pytest.raises(Veo3Retryable) as caught:
        await client.poll(name)
    assert caught.value.code == codes.UNAVAILABLE
    assert (await sim.stats())["requests"]["poll"] == 4


# -- seeded random faults --------------------------------------------------------


async def test_seeded_random_faults_replay_identically(
    sim_factory: SimFactory,
) -> None:
    rates = {
        "fault_429_rate": 0.3,
        "fault_503_rate": 0.2,
        "fault_seed": 7,
    }
    seen = []
    for _ in range(2):
        sim = await sim_factory(simulator=rates, veo3={"retry_attempts": 10})
        client = sim.gemini()
        for index in range(6):
            await client.generate_video(f"{PROMPT} {index}", options())
        seen.append((await sim.stats())["faults"])
        assert (await sim.stats())["submissions"]["total"] == 6
    assert seen[0] == seen[1]
    assert sum(seen[0].values()) > 0


async def test_operation_error_rate_ends_operations_in_error(
    sim_factory: SimFactory,
) -> None:
    sim = await sim_factory(simulator={"operation_error_rate": 1.0})
    client = sim.gemini()
    result = await wait_done(client, await client.generate_video(PROMPT, options()))
    assert isinstance(result, Failed)
    assert result.error.code == codes.OPERATION_TRANSIENT


async def test_silent_video_from_the_simulator_client(sim: SimEnv) -> None:
    from nimu_rt.veo3.factory import create_veo3_client

    client = create_veo3_client(sim.settings, base_url=sim.base_url)
    sim.clients.append(client)
    silent = options(generate_audio=False)
    assert client.validate_prompt(PROMPT, silent) == []
    result = await wait_done(client, await client.generate_video(PROMPT, silent))
    assert isinstance(result, Succeeded)
    data = await read_all(client.download(result.video))
    assert not probe(data).has_audio
    assert data == render_mp4(56, 32, 4, False)
