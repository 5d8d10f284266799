"""Builds the configured Veo 3 client: simulator, Gemini API or Vertex AI."""

from __future__ import annotations

from nimu_rt.config import Settings
from nimu_rt.errors import ConfigError
from nimu_rt.veo3.client import Veo3Client
from nimu_rt.veo3.gemini import GEMINI_BASE_URL, GeminiClient
from nimu_rt.veo3.vertex import GoogleAuthToken, StaticToken, TokenSource, VertexClient

# Sent to the simulator when no key is configured; it accepts any by default.
SIMULATOR_API_KEY = "simulator"


class SimulatorClient(GeminiClient):
    """The Gemini-format client aimed at the built-in simulator.

    Unlike Google's Gemini API, the simulator honours ``generateAudio``, so
    the embedded default can make (and price) silent videos. Progress
    estimates use the simulator's own generation time.
    """

    provider = "simulator"
    audio_switch = True


def create_veo3_client(
    settings: Settings, *, base_url: str | None = None
) -> Veo3Client:
    """The client for ``veo3.provider``, aimed at ``base_url`` when given.

    ``base_url`` wins over ``veo3.base_url``; with provider "simulator" one
    of the two is required (the running simulator's address). Raises
    ConfigError naming the missing setting (API key, Vertex project,
    credentials). Does not contact the provider.
    """
    cfg = settings.veo3
    url = base_url or cfg.base_url or None
    if cfg.provider == "simulator":
        if url is None:
            raise ConfigError(
                "veo3.base_url: the simulator's address is needed (nimu-rt serve"
                " starts one itself)"
            )
        return SimulatorClient(
            settings,
            api_key=cfg.api_key or SIMULATOR_API_KEY,
            base_url=url,
            # Never 0: progress is estimated as elapsed / typical.
            typical_generation_s=max(settings.simulator.generation_s, 0.001),
        )
    if cfg.provider == "gemini":
        if not cfg.api_key:
            raise ConfigError("veo3.api_key: required when veo3.provider is gemini")
        return GeminiClient(
            settings, api_key=cfg.api_key, base_url=url or GEMINI_BASE_URL
        )
    if not cfg.vertex_project:
        raise ConfigError("veo3.vertex_project: required when veo3.provider is vertex")
    tokens: TokenSource
    if cfg.vertex_access_token:
        tokens = StaticToken(cfg.vertex_access_token)
    else:
        tokens = GoogleAuthToken.from_settings(settings)
    return VertexClient(settings, tokens=tokens, base_url=url)
