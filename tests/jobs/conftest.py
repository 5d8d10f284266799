"""A fast pipeline: the simulator answers at once, the queue reacts at once.

Every test here runs real job actors against the Veo 3 simulator over HTTP
and stores real videos; only the timings are shortened.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Api
from tests.support import WAIT_S

CLEAR_PROMPT = "A red fox trots through a snowy forest at dawn, cinematic tracking shot"

FAST: dict[str, Any] = {
    "simulator": {"generation_s": 0.2, "frame_short_side_px": 64},
    "veo3": {
        "poll_initial_s": 0.05,
        "poll_max_s": 0.2,
        "retry_initial_s": 0.01,
        "retry_max_s": 0.05,
    },
    "queue": {
        "tick_s": 0.2,
        "progress_interval_s": 0.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "lease_s": 5.0,
        "instance_timeout_s": 5.0,
    },
}


def merged(extra: dict[str, Any] | None) -> dict[str, Any]:
    result = {section: dict(values) for section, values in FAST.items()}
    for section, values in (extra or {}).items():
        result.setdefault(section, {}).update(values)
    return result


@pytest.fixture
def fast_api(api_factory: Callable[..., Any]) -> Callable[..., Any]:
    """Starts apps with the fast pipeline settings plus ``extra``."""

    async def start(extra: dict[str, Any] | None = None) -> Api:
        return await api_factory(merged(extra))

    return start


async def submit(api: Api, prompt: str = CLEAR_PROMPT, user: str = "alice",
                 **options: Any) -> dict[str, Any]:
    """Create and confirm a generation; returns it as confirmed."""
    created = await api.create(user=user, prompt=prompt, **options)
    r = await api.client.post(
        f"/api/generations/{created['id']}/confirm",
        json={"acceptedCostUsd": created["costEstimate"]["usd"]},
        headers=api.headers(user),
    )
    assert r.status_code == 200, r.text
    return r.json()


async def wait_for(
    api: Api,
    generation_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    user: str = "alice",
    timeout_s: float = WAIT_S,
) -> dict[str, Any]:
    """Long-poll the generation until ``predicate`` holds for it."""
    seq = 0
    async with asyncio.timeout(timeout_s):
        while True:
            r = await api.client.get(
                f"/api/generations/{generation_id}",
                params={"waitSeconds": 5, "sinceSeq": seq},
                headers=api.headers(user),
            )
            if r.status_code == 200:
                generation = r.json()
                if predicate(generation):
                    return generation
                seq = generation["seq"]


def status_is(*statuses: str) -> Callable[[dict[str, Any]], bool]:
    return lambda g: g["status"] in statuses


async def events(api: Api, generation_id: str, user: str = "alice") -> list[dict]:
    r = await api.client.get(
        f"/api/generations/{generation_id}/events",
        params={"limit": 1000},
        headers=api.headers(user),
    )
    return r.json()["items"]


async def simulator_stats(api: Api) -> dict[str, Any]:
    simulator = api.services.simulator
    assert simulator is not None
    async with httpx.AsyncClient(timeout=WAIT_S) as client:
        r = await client.get(f"{simulator.base_url}/_sim/stats")
    return r.json()


def statuses(history: list[dict]) -> list[str]:
    return [e["data"]["status"] for e in history if e["type"] == "status"]
