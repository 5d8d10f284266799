"""The simulator's own contract, spoken to with plain HTTP as curl would."""

from __future__ import annotations

import pytest

from nimu_rt.errors import ConfigError
from nimu_rt.veo3.media import PaddedVideo, frame_size, render_mp4
from nimu_rt.veo3.simulator import create_simulator_app
from tests.support import make_settings
from tests.veo3.conftest import PROMPT, SimEnv, probe

KEY = {"x-goog-api-key": "k"}
SUBMIT = "/v1beta/models/veo-3.1-generate-001:predictLongRunning"


def body(prompt: str = PROMPT, **parameters: object) -> dict[str, object]:
    return {"instances": [{"prompt": prompt}], "parameters": parameters}


@pytest.mark.parametrize(
    ("aspect", "seconds", "audio", "size"),
    [("16:9", 8, True, (56, 32)), ("9:16", 6, False, (32, 56))],
)
def test_rendered_mp4_plays_with_the_asked_shape(
    aspect: str, seconds: int, audio: bool, size: tuple[int, int]
) -> None:
    width, height = frame_size(aspect, "720p", 32)
    video = probe(render_mp4(width, height, seconds, audio))
    assert (video.width, video.height) == size
    assert video.codec == "h264" and video.fps == 24
    assert video.frames == 24 * seconds
    assert video.duration_s == pytest.approx(seconds, abs=0.1)
    assert video.has_audio is audio


def test_real_frame_size_follows_the_resolution() -> None:
    assert frame_size("16:9", "720p", 0) == (1280, 720)
    assert frame_size("9:16", "1080p", 0) == (1080, 1920)


def test_padded_video_has_the_asked_size_and_still_plays() -> None:
    mp4 = render_mp4(56, 32, 4, True)
    padded = PaddedVideo(mp4, 3 * 1024 * 1024)
    data = b"".join(padded.iter_range(0, padded.size_bytes))
    assert len(data) == padded.size_bytes == 3 * 1024 * 1024
    assert data.startswith(mp4)
    assert probe(data).frames == 96
    # Any window reads the same bytes as the whole.
    assert b"".join(padded.iter_range(40_000, 50_000, 4096)) == data[40_000:50_000]


async def test_submission_counts_per_prompt_and_reset(sim: SimEnv) -> None:
    for prompt in ("one", "two", "two"):
        r = await sim.admin.post(SUBMIT, json=body(prompt), headers=KEY)
        assert r.status_code == 200, r.text
    stats = await sim.stats()
    assert stats["submissions"] == {"total": 3, "byPrompt": {"one": 1, "two": 2}}
    assert (await sim.admin.post("/_sim/reset")).status_code == 204
    assert (await sim.stats())["submissions"] == {"total": 0, "byPrompt": {}}


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"instances": []}, "No instances in the request."),
        (body(aspectRatio="4:3"), "aspectRatio"),
        (body(durationSeconds=5), "durationSeconds"),
        (body(resolution="4k", durationSeconds=4), "needs durationSeconds 8"),
        (body(sampleCount=2), "sampleCount"),
        (body(storageUri="gs://b/"), "storageUri"),
        (body(PROMPT + " [sim:explode]"), "unknown simulator marker"),
        (body(PROMPT + " [sim:drop@submit]"), "bad simulator marker"),
    ],
)
async def test_invalid_requests_get_google_400(
    sim: SimEnv, payload: dict[str, object], says: str
) -> None:
    r = await sim.admin.post(SUBMIT, json=payload, headers=KEY)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["status"] == "INVALID_ARGUMENT" and says in error["message"]
    assert (await sim.stats())["submissions"]["total"] == 0


async def test_both_image_spellings_and_string_duration_are_accepted(
    sim: SimEnv,
) -> None:
    for image in (
        {"bytesBase64Encoded": "aW1hZ2U=", "mimeType": "image/png"},
        {"inlineData": {"mimeType": "image/png", "data": "aW1hZ2U="}},
    ):
        payload = {
            "instances": [{"prompt": PROMPT, "image": image}],
            "parameters": {"durationSeconds": "8", "numberOfVideos": 1},
        }
        r = await sim.admin.post(SUBMIT, json=payload, headers=KEY)
        assert r.status_code == 200, r.text


async def test_missing_key_is_403_and_cancel_does_not_exist(sim: SimEnv) -> None:
    r = await sim.admin.post(SUBMIT, json=body())
    assert r.status_code == 403
    assert r.json()["error"]["status"] == "PERMISSION_DENIED"
    name = (await sim.admin.post(SUBMIT, json=body(), headers=KEY)).json()["name"]
    r = await sim.admin.post(f"/v1beta/{name}:cancel", headers=KEY)
    assert r.status_code in (404, 405)


async def test_range_requests(sim: SimEnv) -> None:
    name = (await sim.admin.post(SUBMIT, json=body(), headers=KEY)).json()["name"]
    done = (await sim.admin.get(f"/v1beta/{name}", headers=KEY)).json()
    uri = done["response"]["generateVideoResponse"]["generatedSamples"][0]["video"]
    r = await sim.admin.get(uri["uri"], headers=KEY, follow_redirects=True)
    whole = r.content
    assert r.headers["accept-ranges"] == "bytes"
    r = await sim.admin.get(
        uri["uri"], headers={**KEY, "Range": "bytes=10-19"}, follow_redirects=True
    )
    assert r.status_code == 206 and r.content == whole[10:20]
    assert r.headers["content-range"] == f"bytes 10-19/{len(whole)}"
    r = await sim.admin.get(
        uri["uri"],
        headers={**KEY, "Range": f"bytes={len(whole)}-"},
        follow_redirects=True,
    )
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(whole)}"


def test_fault_rates_above_one_are_refused(tmp_path: object) -> None:
    settings = make_settings(
        tmp_path,  # type: ignore[arg-type]
        {"simulator": {"fault_429_rate": 0.6, "fault_503_rate": 0.6}},
    )
    with pytest.raises(ConfigError, match="fault_"):
        create_simulator_app(settings)
