"""The Vertex-format client against the simulator over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from nimu_rt.errors import ConfigError, SafetyFiltered, Veo3Final
from nimu_rt.veo3 import codes
from nimu_rt.veo3.client import Failed, Succeeded
from nimu_rt.veo3.factory import create_veo3_client
from nimu_rt.veo3.vertex import VertexClient
from tests.support import make_settings
from tests.veo3.conftest import (
    FAST_SIMULATOR,
    FAST_VEO3,
    PROMPT,
    SimEnv,
    SimFactory,
    options,
    probe,
    read_all,
    retries,
    wait_done,
)


async def test_inline_video_round_trip(sim: SimEnv) -> None:
    client = sim.vertex()
    name = await client.generate_video(PROMPT, options(generate_audio=False))
    assert name.startswith(
        "projects/test-project/locations/us-central1/publishers/google/models/"
        "veo-3.1-generate-001/operations/"
    )
    result = await wait_done(client, name)
    assert isinstance(result, Succeeded)
    assert result.video.data is not None and result.video.uri is None
    # Vertex honours generateAudio: no sound track.
    video = probe(await read_all(client.download(result.video)))
    assert (video.width, video.height, video.frames) == (56, 32, 96)
    assert not video.has_audio
    tail = await read_all(client.download(result.video, offset=500))
    assert tail == result.video.data[500:]


async def test_storage_uri_video_is_downloaded_from_cloud_storage(
    sim: SimEnv, retry_log: pytest.LogCaptureFixture
) -> None:
    client = sim.vertex(
        vertex_storage_uri="gs://videos-bucket/out/", gcs_base_url=sim.base_url
    )
    name = await client.generate_video(PROMPT + " [sim:drop]", options())
    result = await wait_done(client, name)
    assert isinstance(result, Succeeded)
    assert result.video.uri is not None
    assert result.video.uri.startswith("gs://videos-bucket/out/")
    data = await read_all(client.download(result.video))
    assert probe(data).has_audio
    # The dropped first transfer was resumed with a Range request.
    assert retries(retry_log, "download") == 1
    assert (await sim.stats())["requests"]["download"] == 2


async def test_safety_block_on_vertex(sim: SimEnv) -> None:
    client = sim.vertex()
    result = await wait_done(
        client, await client.generate_video(PROMPT + " [sim:safety]", options())
    )
    assert isinstance(result, Failed)
    assert isinstance(result.error, SafetyFiltered)
    assert result.error.reasons and result.error.filtered_count == 1


async def test_poll_fault_is_retried_on_vertex(sim: SimEnv) -> None:
    client = sim.vertex()
    name = await client.generate_video(PROMPT + " [sim:500@poll]", options())
    assert isinstance(await client.poll(name), Succeeded)
    assert (await sim.stats())["requests"]["poll"] == 2


async def test_bad_token_is_final(sim_factory: SimFactory) -> None:
    sim = await sim_factory(simulator={"api_key": "the-token"})
    with pytest.raises(Veo3Final) as caught:
        await sim.vertex(token="stale").generate_video(PROMPT, options())
    assert caught.value.code == codes.AUTH_FAILED
    assert (await sim.stats())["submissions"]["total"] == 0


async def test_service_account_token_from_google_auth(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    # Only tokens minted by the simulator's token endpoint are accepted.
    sim = await sim_factory(simulator={"api_key": "not-this"})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    credentials = tmp_path / "service-account.json"
    credentials.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "test-project",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "nimu@test-project.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": f"{sim.base_url}/_sim/oauth2/token",
            }
        )
    )
    settings = make_settings(
        tmp_path / "data",
        {
            "veo3": {
                **FAST_VEO3,
                "provider": "vertex",
                "base_url": sim.base_url,
                "vertex_credentials_file": str(credentials),
            },
            "simulator": FAST_SIMULATOR,
        },
    )
    client = create_veo3_client(settings)
    sim.clients.append(client)
    assert isinstance(client, VertexClient)
    name = await client.generate_video(PROMPT, options())
    assert isinstance(await wait_done(client, name), Succeeded)
    assert len(sim.simulator.issued_tokens) == 1  # minted once, then reused


def test_unreadable_credentials_file_names_the_setting(tmp_path: Path) -> None:
    settings = make_settings(
        tmp_path,
        {
            "veo3": {
                "provider": "vertex",
                "vertex_project": "p",
                "vertex_credentials_file": str(tmp_path / "missing.json"),
            }
        },
    )
    with pytest.raises(ConfigError, match="veo3.vertex_credentials_file"):
        create_veo3_client(settings)
