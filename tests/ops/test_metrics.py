"""/metrics: a real generation through the simulator moves every family."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Api
from tests.realtime.conftest import CLEAR_PROMPT, open_ws
from tests.support import WAIT_S

# A generation completes in about a second: no waiting in the simulator,
# tiny frames, quick polls.
FAST = {
    "simulator": {"generation_s": 0.2, "frame_short_side_px": 32},
    "veo3": {"poll_initial_s": 0.05, "poll_max_s": 0.2},
    "queue": {"progress_interval_s": 0.05},
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by name and labels."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, where: Callable[[dict], bool]) -> float:
    return sum(
        v for (n, labels), v in samples.items() if n == name and where(dict(labels))
    )


async def scrape(api: Api) -> Samples:
    r = await api.client.get("/metrics", headers=api.headers("ops", "admin"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


async def run_generation(api: Api) -> dict[str, Any]:
    """Create, confirm and follow one generation over /ws to completion."""
    created = await api.create(prompt=CLEAR_PROMPT, durationSeconds=4)
    topic = f"generation:{created['id']}"
    async with open_ws(api) as ws:
        assert (await ws.subscribe(topic))["op"] == "subscribed"
        r = await api.client.post(
            f"/api/generations/{created['id']}/confirm",
            json={"acceptedCostUsd": created["costEstimate"]["usd"]},
            headers=api.headers(),
        )
        assert r.status_code == 200, r.text
        status = "queued"
        while status not in ("completed", "failed", "cancelled"):
            frame = await ws.event()
            status = frame["data"].get("status", status)
    assert status == "completed"
    return created


async def test_a_generation_moves_every_family(api_factory: Callable[..., Any]):
    api = await api_factory(FAST)
    before = await scrape(api)
    created = await run_generation(api)
    after = await scrape(api)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # HTTP, by route template (never by id).
    assert grew(
        "nimu_http_requests_total",
        method="POST",
        route="/api/generations/{id}/confirm",
        status="200",
    ) == 1
    assert grew(
        "nimu_http_request_duration_seconds_count",
        method="POST",
        route="/api/generations",
    ) == 1
    assert not any(created["id"] in str(labels) for _, labels in after)
    # WebSocket: the connection, the frames and how fast they went out.
    assert grew("nimu_ws_connections_opened_total") == 1
    assert grew("nimu_ws_frames_written_total") >= 5
    assert grew("nimu_event_fanout_seconds_count") >= 4
    assert grew("nimu_events_published_total", kind="stored") >= 4
    # The queue and jobs are read at scrape time; all done now.
    assert value(after, "nimu_queue_depth") == 0
    assert value(after, "nimu_jobs_running") == 0
    assert ("nimu_instance_actors", frozenset()) in after
    # Veo 3: one submit, at least one poll, all answered.
    assert grew("nimu_veo3_calls_total", stage="submit", outcome="ok") == 1
    assert grew("nimu_veo3_calls_total", stage="poll", outcome="ok") >= 1
    assert grew("nimu_veo3_call_duration_seconds_count", stage="submit") == 1
    # The upload and the job.
    assert grew("nimu_upload_bytes_total") > 1000
    assert grew("nimu_upload_duration_seconds_count", outcome="completed") == 1
    assert grew("nimu_job_duration_seconds_count", outcome="completed") == 1
    assert grew("nimu_job_duration_seconds_sum", outcome="completed") > 0
    # Spend: accepted at confirm, and billed when stored.
    usd = created["costEstimate"]["usd"]
    assert grew("nimu_spend_usd_total", stage="confirmed") == usd
    assert grew("nimu_spend_usd_total", stage="completed") == usd


async def test_metrics_need_an_operator(api: Api):
    for headers, status, code in [
        ({}, 401, "unauthorized"),
        (api.headers("alice"), 403, "forbidden"),
    ]:
        r = await api.client.get("/metrics", headers=headers)
        assert (r.status_code, r.json()["code"]) == (status, code)
    assert (await api.client.get(
        "/metrics", headers=api.headers("svc", "service")
    )).status_code == 200


async def test_metrics_on_a_separate_port_need_no_token(
    api_factory: Callable[..., Any],
):
    api = await api_factory({"metrics": {"separate": True, "port": 0}})
    server = api.services.metrics_server
    assert server is not None and server.url is not None
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        r = await http.get(server.url)
    assert r.status_code == 200
    families = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"nimu_http_requests", "nimu_queue_depth", "nimu_spend_usd"} <= families
    # ... and the service's own port no longer serves them, even to admins.
    r = await api.client.get("/metrics", headers=api.headers("ops", "admin"))
    assert (r.status_code, r.json()["code"]) == (404, "not_found")


async def test_two_apps_in_one_process_keep_their_own_counts(
    api_factory: Callable[..., Any],
):
    first = await api_factory()
    second = await api_factory()
    for _ in range(3):
        assert (await first.client.get("/healthz")).status_code == 200
    count = "nimu_http_requests_total"
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    assert value(await scrape(first), count, **labels) == 3
    assert value(await scrape(second), count, **labels) == 0
