"""The simulator inside the service, and alone as `nimu-rt veo3-sim`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from nimu_rt.app import Services
from nimu_rt.cli import main
from nimu_rt.veo3.client import Succeeded
from tests.support import WAIT_S, make_settings
from tests.veo3.conftest import (
    FAST_SIMULATOR,
    PROMPT,
    options,
    probe,
    read_all,
    wait_done,
)


async def test_services_run_the_simulator_in_the_embedded_default(
    tmp_path: Path,
) -> None:
    settings = make_settings(
        tmp_path / "data",
        {"simulator": FAST_SIMULATOR, "veo3": {"poll_initial_s": 0.01}},
    )
    services = Services(settings)
    await services.start()
    try:
        assert services.simulator is not None
        client = services.veo3
        assert client.provider == "simulator"
        result = await wait_done(client, await client.generate_video(PROMPT, options()))
        assert isinstance(result, Succeeded)
        assert probe(await read_all(client.download(result.video))).frames == 96
        base_url = services.simulator.base_url
    finally:
        await services.stop()
        await services.stop()
    # Stopped with the service: nothing listens there any more.
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            await http.get(base_url + "/_sim/stats")


def test_veo3_sim_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["veo3-sim", "--help"])
    assert caught.value.code == 0
    assert "--port" in capsys.readouterr().out


async def test_veo3_sim_command_serves_the_documented_sequence(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "NIMU_SIMULATOR_GENERATION_S": "0",
        "NIMU_SIMULATOR_FRAME_SHORT_SIDE_PX": "32",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nimu_rt",
        "veo3-sim",
        "--port",
        "0",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(WAIT_S * 2):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("Veo 3 simulator on http://127.0.0.1:"), line
        base_url = line.split()[4]
        key = {"x-goog-api-key": "any-key"}
        async with httpx.AsyncClient(base_url=base_url, timeout=WAIT_S) as http:
            # The README's curl session, step by step.
            r = await http.post(
                "/v1beta/models/veo-3.1-generate-001:predictLongRunning",
                headers=key,
                json={
                    "instances": [{"prompt": PROMPT}],
                    "parameters": {"aspectRatio": "16:9", "durationSeconds": 4},
                },
            )
            assert r.status_code == 200, r.text
            name = r.json()["name"]
            done = (await http.get(f"/v1beta/{name}", headers=key)).json()
            assert done["done"] is True
            sample = done["response"]["generateVideoResponse"]["generatedSamples"][0]
            r = await http.get(
                sample["video"]["uri"], headers=key, follow_redirects=True
            )
            assert r.status_code == 200
            assert probe(r.content).frames == 96
            stats = (await http.get("/_sim/stats")).json()
            assert stats["submissions"]["total"] == 1
    finally:
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(WAIT_S):
            code = await process.wait()
    assert code == 130
