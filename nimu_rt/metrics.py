"""Prometheus metrics of one running instance.

:class:`Metrics` owns a registry of its own (not prometheus-client's global
one), so several apps in one process (tests, a benchmark) never share or
clash over a family. Components get the instance from
:class:`~nimu_rt.app.Services` and call its hooks; a component without one
records nothing.

Hooks run on hot paths (every request, every event written to a socket):
each is a few dictionary lookups and an add under prometheus-client's lock,
with label children resolved once where the labels are fixed.

What is exported (every name starts with ``nimu_``):

- ``http_requests_total{method,route,status}`` and
  ``http_request_duration_seconds{method,route}``: by route template
  (``/api/generations/{id}``), so ids never become labels;
- ``ws_connections`` (open now), ``ws_connections_opened_total``,
  ``ws_frames_written_total`` and ``event_fanout_seconds``: from the hub
  taking a message to its frame written to a socket;
- ``events_published_total{kind}``: stored and ephemeral hub messages;
- ``queue_depth`` and ``jobs_running`` (the cluster's, read from the store
  at scrape time) and ``instance_actors`` (this instance's);
- ``veo3_calls_total{stage,outcome}`` and
  ``veo3_call_duration_seconds{stage}``: submit and poll calls, retries
  included; ``outcome`` is ``ok`` or the error code;
- ``upload_bytes_total`` and ``upload_duration_seconds{outcome}``;
- ``job_duration_seconds{outcome}``: running time of jobs that ended;
- ``spend_usd_total{stage}``: USD accepted at confirm and retry
  (``confirmed``) and of stored videos (``completed``);
- ``rate_limited_total{limit}`` and ``spend_cap_refusals_total``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from nimu_rt.app import Services

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
)
_FANOUT_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    1.0,
)
_VEO3_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LONG_BUCKETS_S = (
    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 3600.0,
)


class Metrics:
    """The metric families of one instance, and the hooks that move them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "nimu_http_requests",
            "HTTP requests answered, by route template and status.",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "nimu_http_request_duration_seconds",
            "Time from request start to the end of the answer.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ws_connections = Gauge(
            "nimu_ws_connections", "Open WebSocket connections.", registry=r
        )
        self.ws_opened = Counter(
            "nimu_ws_connections_opened",
            "WebSocket connections accepted.",
            registry=r,
        )
        self.ws_frames = Counter(
            "nimu_ws_frames_written",
            "Frames written to WebSocket clients.",
            registry=r,
        )
        self.fanout = Histogram(
            "nimu_event_fanout_seconds",
            "From the hub taking a live message to its frame written to a socket.",
            buckets=_FANOUT_BUCKETS_S,
            registry=r,
        )
        published = Counter(
            "nimu_events_published",
            "Messages the hub fanned out, stored events or ephemeral ones.",
            ["kind"],
            registry=r,
        )
        self.published_stored = published.labels("stored")
        self.published_ephemeral = published.labels("ephemeral")
        self.queue_depth = Gauge(
            "nimu_queue_depth",
            "Jobs waiting in the queue (whole cluster), read at scrape time.",
            registry=r,
        )
        self.jobs_running = Gauge(
            "nimu_jobs_running",
            "Jobs running (whole cluster), read at scrape time.",
            registry=r,
        )
        self.instance_actors = Gauge(
            "nimu_instance_actors",
            "Job actors running on this instance.",
            registry=r,
        )
        self.veo3_calls = Counter(
            "nimu_veo3_calls",
            "Veo 3 submit and poll calls (retries included), by outcome.",
            ["stage", "outcome"],
            registry=r,
        )
        self.veo3_duration = Histogram(
            "nimu_veo3_call_duration_seconds",
            "Veo 3 call time, retries included.",
            ["stage"],
            buckets=_VEO3_BUCKETS_S,
            registry=r,
        )
        self.upload_bytes = Counter(
            "nimu_upload_bytes",
            "Bytes stored by finished video uploads.",
            registry=r,
        )
        self.upload_duration = Histogram(
            "nimu_upload_duration_seconds",
            "Streaming upload time (the Veo 3 download included).",
            ["outcome"],
            buckets=_LONG_BUCKETS_S,
            registry=r,
        )
        self.job_duration = Histogram(
            "nimu_job_duration_seconds",
            "Running time of jobs that ended, summed over attempts.",
            ["outcome"],
            buckets=_LONG_BUCKETS_S,
            registry=r,
        )
        spend = Counter(
            "nimu_spend_usd",
            "USD of generations accepted (confirmed) and of videos stored"
            " (completed).",
            ["stage"],
            registry=r,
        )
        self.spend_confirmed = spend.labels("confirmed")
        self.spend_completed = spend.labels("completed")
        self.rate_limited = Counter(
            "nimu_rate_limited",
            "Requests refused by a rate limit, by the limit that refused.",
            ["limit"],
            registry=r,
        )
        self.spend_cap_refusals = Counter(
            "nimu_spend_cap_refusals",
            "Confirms and retries refused by the daily spend cap.",
            registry=r,
        )

    # -- hooks ---------------------------------------------------------------------

    def http_request(
        self, method: str, route: str, status: int, duration_s: float
    ) -> None:
        """One answered request; ``route`` must be a template, never a path."""
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(duration_s)

    def frame_written(self, born: float | None, now: float) -> None:
        """A frame reached a socket; ``born`` is when the hub took it."""
        self.ws_frames.inc()
        if born is not None:
            self.fanout.observe(now - born)

    def veo3_call(self, stage: str, outcome: str, duration_s: float) -> None:
        """One submit or poll, retries included; ``outcome`` ok or a code."""
        self.veo3_calls.labels(stage, outcome).inc()
        self.veo3_duration.labels(stage).observe(duration_s)

    def upload_finished(self, outcome: str, size_bytes: int, duration_s: float) -> None:
        """An upload ended (``completed`` or ``failed``; cancels not counted)."""
        if size_bytes:
            self.upload_bytes.inc(size_bytes)
        self.upload_duration.labels(outcome).observe(duration_s)

    def job_finished(self, outcome: str, run_s: float) -> None:
        """A job ended; counted when its end is written, before the commit."""
        self.job_duration.labels(outcome).observe(max(run_s, 0.0))

    # -- exposition ------------------------------------------------------------------

    async def refresh(self, services: Services) -> None:
        """Read the gauges that live elsewhere (store, hub, runtime) now.

        Two store queries per scrape; Prometheus scrapes every 15-60 s.
        """
        from nimu_rt.jobs import queries

        depth = await queries.queued_count_by_priority(services.store)
        self.queue_depth.set(sum(depth.values()))
        self.jobs_running.set(len(await queries.running_jobs(services.store)))
        runtime = services.runtime
        self.instance_actors.set(len(runtime.actors) if runtime is not None else 0)
        self.ws_connections.set(services.hub.connection_count)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
