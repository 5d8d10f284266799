"""Load generator of the lifecycle benchmark: closed-loop lanes of generations.

Each lane is one user with one WebSocket (a browser tab) and loops:

1. ``POST /api/generations`` (a prompt that needs no clarification);
2. subscribe to ``generation:{id}`` with ``sinceSeq`` of the created
   snapshot, and wait for ``subscribed``;
3. ``POST /confirm``; read the topic's events until its ``completed`` (or
   ``failed``) status event, checking that every seq arrives once, in order;
4. unsubscribe, and start the next generation.

So the number of lanes is the number of generations in flight. Lanes start
at ``--start-at`` (epoch seconds, so several processes start together); the
window ``[start + warmup, start + warmup + measure]`` counts completions.
After the window lanes finish their current generation (bounded) and stop.

Prints one line ``{"bench": "lifecycle-load", ...}`` with the counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import httpx
import msgspec
from websockets.asyncio.client import connect

from bench.harness import percentile, token

PROMPT = (
    "A golden retriever chases a red ball across a wet lawn in a park at dawn,"
    " cinematic handheld close-up."
)
_decode = msgspec.json.decode


class Stats:
    def __init__(self, window: tuple[float, float]) -> None:
        self.window = window
        self.completed = 0
        self.completed_in_window = 0
        self.failed = 0
        self.errors: list[str] = []
        self.events = 0
        self.events_in_window = 0
        self.gaps = 0
        self.latencies_ms: list[float] = []

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t < self.window[1]


async def lane(
    index: int,
    user: str,
    base_url: str,
    http: httpx.AsyncClient,
    stats: Stats,
    stop_at: float,
    job_timeout_s: float,
) -> None:
    auth = {"Authorization": f"Bearer {token(user)}"}
    ws_url = base_url.replace("http://", "ws://") + "/ws"
    async with connect(
        ws_url, additional_headers=auth, compression=None, open_timeout=30
    ) as ws:
        while time.time() < stop_at:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(job_timeout_s):
                    outcome, events, gaps = await one_generation(ws, http, auth)
            except Exception as exc:  # counted, and the lane goes on
                stats.errors.append(f"lane {index}: {exc!r}"[:300])
                if len(stats.errors) > 50:
                    raise
                continue
            now = time.time()
            stats.events += events
            stats.gaps += gaps
            if outcome == "completed":
                stats.completed += 1
            else:
                stats.failed += 1
            if stats.in_window(now):
                stats.events_in_window += events
                if outcome == "completed":
                    stats.completed_in_window += 1
                    stats.latencies_ms.append((time.perf_counter() - started) * 1000)


async def one_generation(
    ws: Any, http: httpx.AsyncClient, auth: dict[str, str]
) -> tuple[str, int, int]:
    """Run one generation; return its final status, events seen, seq gaps."""
    answer = await http.post(
        "/api/generations",
        json={"prompt": PROMPT, "durationSeconds": 4},
        headers=auth,
    )
    answer.raise_for_status()
    created = answer.json()
    gid, last_seq = created["id"], created["seq"]
    if created["status"] != "awaiting_confirmation":
        raise RuntimeError(f"created as {created['status']}")
    topic = f"generation:{gid}"
    await ws.send(
        json.dumps({"op": "subscribe", "topic": topic, "sinceSeq": last_seq})
    )
    while True:
        frame = _decode(await ws.recv())
        if frame.get("op") == "subscribed" and frame.get("topic") == topic:
            break
        if frame.get("op") == "error":
            raise RuntimeError(f"subscribe refused: {frame}")
    answer = await http.post(
        f"/api/generations/{gid}/confirm",
        json={"acceptedCostUsd": created["costEstimate"]["usd"]},
        headers=auth,
    )
    answer.raise_for_status()
    events = gaps = 0
    status = None
    while status not in ("completed", "failed", "cancelled"):
        frame = _decode(await ws.recv())
        if frame.get("op") != "event" or frame.get("topic") != topic:
            if frame.get("op") == "error":
                raise RuntimeError(f"error frame: {frame}")
            continue
        events += 1
        seq = frame["seq"]
        if seq != last_seq + 1:
            gaps += 1
        last_seq = seq
        if frame["type"] == "status":
            status = frame["data"]["status"]
    await ws.send(json.dumps({"op": "unsubscribe", "topic": topic}))
    return status, events, gaps


async def main(args: argparse.Namespace) -> dict[str, Any]:
    start = args.start_at or time.time()
    window = (start + args.warmup_s, start + args.warmup_s + args.measure_s)
    stats = Stats(window)
    delay = start - time.time()
    # Kept-alive connections are dropped before uvicorn's 5 s idle timeout,
    # so a request never races the server closing its connection.
    limits = httpx.Limits(
        max_connections=args.lanes + 4,
        max_keepalive_connections=args.lanes + 4,
        keepalive_expiry=4.0,
    )
    async with httpx.AsyncClient(
        base_url=args.url, timeout=60, limits=limits
    ) as http:
        if delay > 0:
            await asyncio.sleep(delay)
        tasks = [
            asyncio.create_task(
                lane(
                    i,
                    f"{args.user_prefix}{args.first_lane + i}",
                    args.url,
                    http,
                    stats,
                    window[1],
                    args.job_timeout_s,
                )
            )
            for i in range(args.lanes)
        ]
        done = await asyncio.gather(*tasks, return_exceptions=True)
    for result in done:
        if isinstance(result, BaseException):
            stats.errors.append(f"lane ended: {result!r}"[:300])
    return {
        "bench": "lifecycle-load",
        "lanes": args.lanes,
        "measure_s": args.measure_s,
        "completed": stats.completed,
        "completed_in_window": stats.completed_in_window,
        "failed": stats.failed,
        "events": stats.events,
        "events_in_window": stats.events_in_window,
        "seq_gaps": stats.gaps,
        "latency_ms_p50": percentile(stats.latencies_ms, 0.5),
        "latency_ms_p99": percentile(stats.latencies_ms, 0.99),
        "errors": stats.errors[:10],
        "error_count": len(stats.errors),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--lanes", type=int, default=1)
    parser.add_argument("--first-lane", type=int, default=0)
    parser.add_argument("--user-prefix", default="bench-user-")
    parser.add_argument("--start-at", type=float, default=0.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--measure-s", type=float, default=15.0)
    parser.add_argument("--job-timeout-s", type=float, default=60.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    result = asyncio.run(main(parse(sys.argv[1:])))
    print(json.dumps(result), flush=True)
