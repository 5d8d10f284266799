"""Several `nimu-rt serve` processes on one PostgreSQL, and SIGKILL.

Two instances share a schema, one standalone Veo 3 simulator
(`nimu-rt veo3-sim`) and one S3 bucket (moto). One instance is killed with
SIGKILL at the worst moments; the other must finish the job from its
persisted state, and the simulator must have been paid exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import S3Endpoint
from tests.jobs.conftest import CLEAR_PROMPT
from tests.support import WAIT_S

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent.parent
SECRET = "cluster-test-secret-of-at-least-32-bytes"
LEASE_S = 2.0


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[str]
    url: str
    log: Path

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=WAIT_S)


async def spawn(
    name: str, args: list[str], env: dict[str, str], cwd: Path, banner: str
) -> Process:
    """Start ``python -m nimu_rt ARGS``; return once it printed its URL."""
    log = cwd / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NIMU_")}
    full_env.update(env, PYTHONPATH=str(ROOT))
    full_env.pop("PORT", None)
    with log.open("w") as stderr:  # the child keeps its own copy
        popen = subprocess.Popen(
            [sys.executable, "-m", "nimu_rt", *args],
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert popen.stdout is not None
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(WAIT_S * 3):
        while True:
            line = await loop.run_in_executor(None, popen.stdout.readline)
            if not line:
                raise RuntimeError(f"{name} exited: {log.read_text()[-2000:]}")
            found = re.search(banner + r" (http://\S+)", line)
            if found:
                return Process(name, popen, found[1], log)


@dataclass
class Cluster:
    simulator: Process
    instances: dict[str, Process]
    http: httpx.AsyncClient

    def headers(self, user: str = "alice", role: str | None = None) -> dict[str, str]:
        claims: dict[str, Any] = {"sub": user, "exp": 2**31}
        if role:
            claims["role"] = role
        return {"Authorization": "Bearer " + jwt.encode(claims, SECRET, "HS256")}

    @property
    def admin(self) -> dict[str, str]:
        return self.headers("ops", "admin")

    def alive(self) -> list[Process]:
        return [p for p in self.instances.values() if p.popen.poll() is None]

    async def submit(self, via: Process, prompt: str) -> dict[str, Any]:
        r = await self.http.post(
            f"{via.url}/api/generations", json={"prompt": prompt},
            headers=self.headers(),
        )
        assert r.status_code == 201, r.text
        created = r.json()
        r = await self.http.post(
            f"{via.url}/api/generations/{created['id']}/confirm",
            json={"acceptedCostUsd": created["costEstimate"]["usd"]},
            headers=self.headers(),
        )
        assert r.status_code == 200, r.text
        return r.json()

    async def wait_for(
        self,
        via: Process,
        generation_id: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float = WAIT_S * 3,
    ) -> dict[str, Any]:
        seq = 0
        async with asyncio.timeout(timeout_s):
            while True:
                r = await self.http.get(
                    f"{via.url}/api/generations/{generation_id}",
                    params={"waitSeconds": 2, "sinceSeq": seq},
                    headers=self.headers(),
                )
                if r.status_code == 200:
                    if predicate(r.json()):
                        return r.json()
                    seq = r.json()["seq"]

    async def owner(self, via: Process, job_id: str) -> Process:
        r = await self.http.get(
            f"{via.url}/api/queue/jobs/{job_id}", headers=self.admin
        )
        return self.instances[r.json()["instanceId"]]

    async def submissions(self, prompt: str) -> int:
        r = await self.http.get(f"{self.simulator.url}/_sim/stats")
        return r.json()["submissions"]["byPrompt"].get(prompt, 0)

    async def history(self, via: Process, generation_id: str) -> list[str]:
        r = await self.http.get(
            f"{via.url}/api/generations/{generation_id}/events",
            params={"limit": 1000},
            headers=self.headers(),
        )
        return [
            e["data"]["status"] for e in r.json()["items"] if e["type"] == "status"
        ]


@pytest.fixture
async def cluster(
    tmp_path: Path, pg_url: str, pg_schema: str, s3_endpoint: S3Endpoint
) -> AsyncIterator[Cluster]:
    common = {
        "NIMU_SIMULATOR_GENERATION_S": "4",
        "NIMU_SIMULATOR_FRAME_SHORT_SIDE_PX": "64",
    }
    simulator = await spawn(
        "simulator", ["veo3-sim", "--port", "0"], common, tmp_path,
        "Veo 3 simulator on",
    )
    storage = s3_endpoint.storage_settings(part_size_bytes=5 * 1024 * 1024)
    env = {
        **common,
        "NIMU_DATABASE_URL": pg_url,
        "NIMU_DATABASE_SCHEMA_NAME": pg_schema,
        "NIMU_DATABASE_AUTO_MIGRATE": "true",
        "NIMU_AUTH_JWT_SECRET": SECRET,
        "NIMU_VEO3_BASE_URL": simulator.url,
        "NIMU_VEO3_POLL_INITIAL_S": "0.1",
        "NIMU_VEO3_POLL_MAX_S": "0.3",
        "NIMU_QUEUE_LEASE_S": str(LEASE_S),
        "NIMU_QUEUE_INSTANCE_TIMEOUT_S": str(LEASE_S),
        "NIMU_QUEUE_TICK_S": "0.2",
        "NIMU_QUEUE_LEADER_RETRY_S": "0.2",
        "NIMU_QUEUE_PROGRESS_INTERVAL_S": "0.2",
        **{f"NIMU_STORAGE_{k.upper()}": str(v) for k, v in storage.items()},
    }
    instances = {}
    for name in ("a", "b"):
        workdir = tmp_path / name
        workdir.mkdir()
        instances[name] = await spawn(
            name,
            ["serve", "--port", "0"],
            {**env, "NIMU_SERVER_INSTANCE_ID": name},
            workdir,
            "serving on",
        )
    http = httpx.AsyncClient(timeout=WAIT_S)
    try:
        yield Cluster(simulator, instances, http)
    finally:
        await http.aclose()
        for process in [*instances.values(), simulator]:
            if process.popen.poll() is None:
                process.popen.terminate()
        for process in [*instances.values(), simulator]:
            try:
                process.popen.wait(timeout=WAIT_S)
            except subprocess.TimeoutExpired:
                process.popen.kill()
            if process.popen.stdout:
                process.popen.stdout.close()


async def test_killed_while_generating_the_other_instance_finishes(cluster):
    prompt = CLEAR_PROMPT + " [sim:gen=4]"
    generation = await cluster.submit(cluster.instances["a"], prompt)
    gid = generation["id"]
    running = await cluster.wait_for(
        cluster.instances["a"], gid, lambda g: g["status"] == "generating"
    )
    owner = await cluster.owner(cluster.instances["a"], generation["jobId"])

    owner.kill()
    [survivor] = cluster.alive()

    done = await cluster.wait_for(survivor, gid, lambda g: g["status"] == "completed")
    assert done["video"]["sizeBytes"] > 0
    # The survivor resumed polling the same operation: one submission.
    assert await cluster.submissions(prompt) == 1
    assert await cluster.history(survivor, gid) == [
        "queued", "submitting", "generating", "uploading", "completed",
    ]
    assert done["attempts"] == running["attempts"] == 1
    r = await cluster.http.get(
        f"{survivor.url}/api/queue/jobs/{generation['jobId']}", headers=cluster.admin
    )
    assert r.json()["outcome"] == "completed"


async def test_killed_while_uploading_the_upload_resumes(cluster):
    size = 24 * 1024 * 1024
    prompt = CLEAR_PROMPT + f" [sim:gen=0.5] [sim:bytes={size}] [sim:rate=4000000]"
    generation = await cluster.submit(cluster.instances["b"], prompt)
    gid = generation["id"]
    # At least one 5 MiB part is stored (progress moves by part).
    await cluster.wait_for(
        cluster.instances["b"], gid,
        lambda g: g["status"] == "uploading" and g["progress"] > 85,
    )
    owner = await cluster.owner(cluster.instances["b"], generation["jobId"])

    owner.kill()
    [survivor] = cluster.alive()

    done = await cluster.wait_for(survivor, gid, lambda g: g["status"] == "completed")
    assert await cluster.submissions(prompt) == 1
    video = done["video"]
    assert video["sizeBytes"] == size
    # The object is whole: its bytes hash to what was recorded.
    r = await cluster.http.get(
        f"{survivor.url}/api/storage/videos/{gid}", headers=cluster.headers()
    )
    body = (await cluster.http.get(r.json()["url"], timeout=WAIT_S * 3)).content
    assert hashlib.sha256(body).hexdigest() == video["sha256"]
    assert await cluster.history(survivor, gid) == [
        "queued", "submitting", "generating", "uploading", "completed",
    ]


async def test_killed_coordinator_dispatch_goes_on(cluster):
    a = cluster.instances["a"]
    async with asyncio.timeout(WAIT_S):
        while True:
            r = await cluster.http.get(f"{a.url}/api/queue", headers=cluster.admin)
            if r.json()["coordinator"] in cluster.instances:
                break
            await asyncio.sleep(0.1)
    coordinator = cluster.instances[r.json()["coordinator"]]

    coordinator.kill()
    [survivor] = cluster.alive()

    prompt = CLEAR_PROMPT + " [sim:gen=0.2]"
    generation = await cluster.submit(survivor, prompt)
    done = await cluster.wait_for(
        survivor, generation["id"], lambda g: g["status"] == "completed"
    )
    assert done["attempts"] == 1
    r = await cluster.http.get(f"{survivor.url}/api/queue", headers=cluster.admin)
    assert r.json()["coordinator"] == survivor.name
