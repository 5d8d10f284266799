"""Client policies that need no server: polling, checks, prices, the factory."""

from __future__ import annotations

from pathlib import Path

import pytest

from nimu_rt.errors import ConfigError, ValidationFailed
from nimu_rt.veo3.factory import SimulatorClient, create_veo3_client
from nimu_rt.veo3.gemini import GeminiClient
from nimu_rt.veo3.transport import parse_duration_s
from nimu_rt.veo3.vertex import VertexClient
from tests.support import make_settings
from tests.veo3.conftest import PROMPT, options


def settings(tmp_path: Path, **veo3: object):  # type: ignore[no-untyped-def]
    return make_settings(tmp_path, {"veo3": veo3})


async def test_poll_delay_grows_towards_the_maximum(tmp_path: Path) -> None:
    client = create_veo3_client(
        settings(tmp_path, poll_initial_s=2.0, poll_growth=2.0, poll_max_s=20.0),
        base_url="http://127.0.0.1:9",
    )
    try:
        delays = [client.next_poll_delay_s(n) for n in range(6)]
        assert delays == [2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
        assert client.next_poll_delay_s(10_000) == 20.0
    finally:
        await client.aclose()
        await client.aclose()  # safe twice


async def test_validate_prompt_lists_every_problem(tmp_path: Path) -> None:
    client = GeminiClient(settings(tmp_path), api_key="k")
    try:
        assert client.validate_prompt(PROMPT, options()) == []
        problems = client.validate_prompt(
            "  bell\x07 ",
            options(resolution="1080p", generate_audio=False, model="veo-x"),
        )
        assert problems == [
            "prompt: contains the control character U+0007",
            "model: unknown model; known: veo-3.1-fast-generate-001,"
            " veo-3.1-generate-001",
            "durationSeconds: 1080p needs durationSeconds 8",
            "generateAudio: the Gemini API always generates audio; a silent"
            " video needs the Vertex AI provider",
        ]
        assert client.validate_prompt("   ", options()) == ["prompt: must not be empty"]
        # Over the model's token limit although under max_prompt_chars.
        long_cjk = "狐" * 1500
        assert "too long for Veo 3" in client.validate_prompt(long_cjk, options())[0]
    finally:
        await client.aclose()


async def test_estimate_cost_uses_the_price_table(tmp_path: Path) -> None:
    client = create_veo3_client(settings(tmp_path), base_url="http://127.0.0.1:9")
    try:
        cost = client.estimate_cost(options(duration_seconds=8))
        assert cost.usd == 3.20
        assert client.estimate_cost(options(generate_audio=False)).usd == 0.80
        with pytest.raises(ValidationFailed):
            client.estimate_cost(options(model="veo-unpriced"))
    finally:
        await client.aclose()


async def test_factory_picks_the_configured_provider(tmp_path: Path) -> None:
    made = [
        create_veo3_client(settings(tmp_path), base_url="http://127.0.0.1:9"),
        create_veo3_client(settings(tmp_path, provider="gemini", api_key="k")),
        create_veo3_client(
            settings(
                tmp_path,
                provider="vertex",
                vertex_project="p",
                vertex_location="europe-west4",
                vertex_access_token="t",
            )
        ),
    ]
    try:
        assert isinstance(made[0], SimulatorClient)
        assert made[0].typical_generation_s == 5.0  # the simulator's own
        assert isinstance(made[1], GeminiClient)
        assert made[1].base_url == "https://generativelanguage.googleapis.com"
        assert isinstance(made[2], VertexClient)
        assert made[2].base_url == "https://europe-west4-aiplatform.googleapis.com"
        assert made[2].typical_generation_s == 90.0
    finally:
        for client in made:
            await client.aclose()


@pytest.mark.parametrize(
    ("veo3", "key"),
    [
        ({"provider": "gemini"}, "veo3.api_key"),
        ({"provider": "vertex"}, "veo3.vertex_project"),
        ({"provider": "simulator"}, "veo3.base_url"),
    ],
)
def test_factory_names_the_missing_setting(
    tmp_path: Path, veo3: dict[str, object], key: str
) -> None:
    with pytest.raises(ConfigError, match=key):
        create_veo3_client(settings(tmp_path, **veo3))


def test_bad_provider_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="veo3.provider"):
        settings(tmp_path, provider="openai")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("19s", 19.0), ("1.5s", 1.5), ("0s", 0.0), ("19", None), ("-1s", None), (3, None)],
)
def test_retry_delay_durations(text: object, seconds: float | None) -> None:
    assert parse_duration_s(text) == seconds
