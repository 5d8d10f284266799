"""Benchmark 5: what idleness costs. RSS per idle WebSocket, memory per queued job.

Connections: N clients (bench/node/fanout_clients.mjs) connect, subscribe to
one topic each and stay silent; the server's RSS once they are all
subscribed, minus its RSS before, divided by N. nimu_rt (``nimu-rt serve``)
against Socket.IO (bench/node/socketio_server.mjs).

Queued jobs: K generations created and confirmed with the queue paused, so
they stay queued: the server's RSS change per job, and the PostgreSQL bytes
per job (tables, indexes and TOAST of the schema, dead row versions of
updated rows included, as they are until autovacuum reclaims them).
Against BullMQ: K jobs of the same data added to a queue no worker reads,
Redis ``used_memory`` change per job.

    uv run python -m bench.idle --connections 10000 --jobs 2000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench import harness as h
from bench.fanout import (
    PROMPT,
    create_generations,
    settle_rss,
    start_clients,
    wait_ready,
)


def connections_nimu(n: int, workdir: Path, generations: int) -> dict[str, Any]:
    schema = h.new_schema()
    data_dir = Path(tempfile.mkdtemp(prefix="nimu-bench-"))
    port = h.free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        with h.processes() as procs:
            server = h.Proc(
                f"nimu-server-idle-{n}",
                [h.NIMU_RT, "serve", "--port", str(port)],
                env=h.nimu_env(schema, data_dir),
            )
            procs.append(server)
            server.wait_for(r"serving on", 60)
            topics, tokens = create_generations(url, generations)
            assignments = workdir / "nimu-idle.json"
            assignments.write_text(json.dumps({"topics": topics, "tokens": tokens}))
            before = settle_rss(server.pid, 2.0)
            clients = start_clients("nimu", f"ws://127.0.0.1:{port}/ws",
                                    assignments, n, procs)
            connect = wait_ready(clients, n)
            after = settle_rss(server.pid, 5.0)
            return _per_connection(before, after, n, connect)
    finally:
        h.drop_schema(schema)
        shutil.rmtree(data_dir, ignore_errors=True)


def connections_socketio(n: int, workdir: Path, generations: int) -> dict[str, Any]:
    port = h.free_port()
    topics = [f"generation:{uuid.uuid4()}" for _ in range(generations)]
    assignments = workdir / "socketio-idle.json"
    assignments.write_text(json.dumps({"topics": topics, "tokens": []}))
    with h.processes() as procs:
        server = h.Proc(
            f"socketio-server-idle-{n}",
            [h.NODE, "socketio_server.mjs", "--port", str(port),
             "--topics", str(assignments)],
            cwd=h.NODE_DIR,
            stdin=True,
        )
        procs.append(server)
        server.wait_result("ready", 30)
        before = settle_rss(server.pid, 2.0)
        clients = start_clients("socketio", f"http://127.0.0.1:{port}",
                                assignments, n, procs)
        connect = wait_ready(clients, n)
        after = settle_rss(server.pid, 5.0)
        return _per_connection(before, after, n, connect)


def _per_connection(
    before: int, after: int, n: int, connect: dict[str, Any]
) -> dict[str, Any]:
    return {
        "connections": n,
        "rss_mib_before": round(before / 2**20, 1),
        "rss_mib_after": round(after / 2**20, 1),
        "kib_per_connection": round((after - before) / n / 1024, 2),
        **connect,
    }


def _pg_bytes(schema: str) -> int:
    out = subprocess.run(
        ["psql", h.PG_URL, "-Atc",
         "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
         " JOIN pg_namespace n ON n.oid = c.relnamespace"
         f" WHERE n.nspname = '{schema}' AND c.relkind = 'r'"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return int(out.stdout.strip())


async def _create_queued(url: str, jobs: int, lanes: int = 16) -> int:
    confirmed = 0

    async def lane(index: int, http: httpx.AsyncClient) -> None:
        nonlocal confirmed
        auth = {"Authorization": f"Bearer {h.token(f'queue-user-{index}')}"}
        for _ in range(index, jobs, lanes):
            created = await http.post("/api/generations", json={"prompt": PROMPT},
                                      headers=auth)
            created.raise_for_status()
            doc = created.json()
            answer = await http.post(
                f"/api/generations/{doc['id']}/confirm",
                json={"acceptedCostUsd": doc["costEstimate"]["usd"]},
                headers=auth,
            )
            answer.raise_for_status()
            confirmed += 1

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(lane(i, http) for i in range(lanes)))
    return confirmed


def queued_nimu(jobs: int) -> dict[str, Any]:
    schema = h.new_schema()
    data_dir = Path(tempfile.mkdtemp(prefix="nimu-bench-"))
    port = h.free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        with h.processes() as procs:
            server = h.Proc(
                "nimu-server-queued",
                [h.NIMU_RT, "serve", "--port", str(port)],
                env=h.nimu_env(schema, data_dir),
            )
            procs.append(server)
            server.wait_for(r"serving on", 60)
            admin = {"Authorization": f"Bearer {h.token('bench-admin', 'admin')}"}
            httpx.post(f"{url}/api/queue/pause", headers=admin).raise_for_status()
            # One generation first, so lazily built state exists before.
            asyncio.run(_create_queued(url, 16))
            rss_before = settle_rss(server.pid, 3.0)
            pg_before = _pg_bytes(schema)
            confirmed = asyncio.run(_create_queued(url, jobs))
            rss_after = settle_rss(server.pid, 5.0)
            pg_after = _pg_bytes(schema)
            stats = httpx.get(f"{url}/api/queue", headers=admin).json()
            return {
                "jobs": confirmed,
                "queue_stats": stats,
                "server_rss_mib_before": round(rss_before / 2**20, 1),
                "server_rss_mib_after": round(rss_after / 2**20, 1),
                "server_bytes_per_job": round((rss_after - rss_before) / confirmed),
                "postgres_bytes_per_job": round((pg_after - pg_before) / confirmed),
            }
    finally:
        h.drop_schema(schema)
        shutil.rmtree(data_dir, ignore_errors=True)


def _redis_used(port: int) -> int:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "INFO", "memory"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    match = re.search(r"used_memory:(\d+)", out)
    assert match, out
    return int(match.group(1))


def queued_bullmq(jobs: int) -> dict[str, Any]:
    from bench.lifecycle import _drop_queue

    queue = f"bench-idle-{h.stamp()}"
    try:
        before = _redis_used(h.REDIS_PORT)
        with h.processes() as procs:
            fill = h.Proc(
                "bullmq-fill",
                [h.NODE, "bullmq_fill.mjs", "--queue", queue, "--jobs", str(jobs),
                 "--redis-port", str(h.REDIS_PORT)],
                cwd=h.NODE_DIR,
            )
            procs.append(fill)
            fill.wait_result("filled", 300)
        after = _redis_used(h.REDIS_PORT)
        return {
            "jobs": jobs,
            "redis_used_mib_before": round(before / 2**20, 1),
            "redis_used_mib_after": round(after / 2**20, 1),
            "redis_bytes_per_job": round((after - before) / jobs),
        }
    finally:
        _drop_queue(queue, h.REDIS_PORT)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    h.exit_on_sigterm()
    if args.smoke:
        args.connections, args.jobs = 500, 100
    doc: dict[str, Any] = {
        "bench": "idle",
        "command": "python -m bench.idle " + " ".join(argv),
        "machine": h.machine(),
        "started": h.stamp(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    try:
        doc["quiet_before"] = h.wait_until_quiet(enabled=not args.smoke)
        doc["connections"] = {
            "socketio": connections_socketio(args.connections, workdir,
                                             args.generations),
            "nimu_rt": connections_nimu(args.connections, workdir, args.generations),
        }
        doc["queued"] = {
            "bullmq": queued_bullmq(args.jobs),
            "nimu_rt": queued_nimu(args.jobs),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    path = h.save("idle", doc)
    print(render(doc))
    print(f"saved {path}")
    return 0


def render(doc: dict[str, Any]) -> str:
    c, q = doc["connections"], doc["queued"]
    rows = [
        [
            f"RSS per idle WebSocket ({c['nimu_rt']['connections']} subscribed)",
            f"{c['socketio']['kib_per_connection']} KiB (Socket.IO)",
            f"{c['nimu_rt']['kib_per_connection']} KiB",
            h.ratio(c["nimu_rt"]["kib_per_connection"],
                    c["socketio"]["kib_per_connection"]),
        ],
        [
            f"connect + subscribe {c['nimu_rt']['connections']} clients",
            f"{c['socketio']['connect_s']} s",
            f"{c['nimu_rt']['connect_s']} s",
            h.ratio(c["nimu_rt"]["connect_s"], c["socketio"]["connect_s"]),
        ],
        [
            f"memory per queued job ({q['nimu_rt']['jobs']} queued)",
            f"{q['bullmq']['redis_bytes_per_job']} B Redis (BullMQ)",
            f"{q['nimu_rt']['server_bytes_per_job']} B server RSS +"
            f" {q['nimu_rt']['postgres_bytes_per_job']} B PostgreSQL on disk",
            h.ratio(q["nimu_rt"]["postgres_bytes_per_job"],
                    q["bullmq"]["redis_bytes_per_job"]),
        ],
    ]
    return h.table(["what", "baseline", "nimu_rt", "ratio"], rows)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
