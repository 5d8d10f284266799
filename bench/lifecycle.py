"""Benchmark 1: job lifecycle throughput, nimu_rt against BullMQ.

nimu_rt: ``nimu-rt serve`` on PostgreSQL (fsync on, a fresh schema per
level), the Veo 3 simulator as its own process (``nimu-rt veo3-sim``, zero
generation time, tiny videos), local video storage, and
:mod:`bench.lifecycle_load` driving closed-loop lanes: create, subscribe over
``/ws``, confirm, read every event until ``completed``. Each generation does
real work: two REST calls, six or seven stored events delivered over the
WebSocket, a submit, a poll and an MP4 download over HTTP, the file stored,
probed with PyAV and thumbnailed.

``--variant stripped`` runs :mod:`bench.stripped_server` instead: the same
app with an in-process Veo 3 that answers at once and a video step that
stores nothing, which isolates the queue, actor, store and event costs.

Baseline: BullMQ on the local Redis (no persistence) and on a Redis started
here with ``appendfsync always`` (durable against durable), with a job of
five awaited progress updates and a result, observed through QueueEvents in
the client process (bench/node/bullmq_client.mjs), the worker apart
(bench/node/bullmq_worker.mjs). Same lanes, same windows.

    uv run python -m bench.lifecycle --levels 1,10,50 --measure-s 15
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench import harness as h

SIM_ENV = {
    "NIMU_SIMULATOR_GENERATION_S": "0",
    "NIMU_SIMULATOR_FRAME_SHORT_SIDE_PX": "64",
    "NIMU_LOGGING_LEVEL": "WARNING",
}


def queue_env(level: int) -> dict[str, str]:
    """[queue] and [database] settings that do not cap the benchmark."""
    return {
        "NIMU_QUEUE_MAX_CONCURRENT_OPERATIONS": str(max(1000, level * 4)),
        "NIMU_QUEUE_SUBMISSIONS_PER_MINUTE": "100000000",
        "NIMU_QUEUE_INSTANCE_CONCURRENCY": str(max(1000, level * 4)),
        "NIMU_DATABASE_POOL_MAX_SIZE": "20",
    }


def listening_pid(port: int) -> set[int]:
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == "LISTEN" and conn.laddr.port == port and conn.pid:
            return {conn.pid}
    return set()


def summarize(
    results: list[dict[str, Any]], report: dict[str, Any], measure_s: float
) -> dict[str, Any]:
    completed = sum(r["completed_in_window"] for r in results)
    p50s = [r["latency_ms_p50"] for r in results if r["latency_ms_p50"]]
    p99s = [r["latency_ms_p99"] for r in results if r["latency_ms_p99"]]
    return {
        "jobs_per_s": round(completed / measure_s, 1),
        "completed_in_window": completed,
        "events_per_s": round(sum(r["events_in_window"] for r in results) / measure_s),
        "failed": sum(r["failed"] for r in results),
        "lost_events": sum(r["seq_gaps"] for r in results),
        "errors": sum(r["error_count"] for r in results),
        "error_samples": [e for r in results for e in r["errors"]][:5],
        "latency_ms_p50": round(max(p50s), 1) if p50s else None,
        "latency_ms_p99": round(max(p99s), 1) if p99s else None,
        "ledger": report,
    }


def run_nimu(
    level: int, args: argparse.Namespace, sim_url: str | None
) -> dict[str, Any]:
    schema = h.new_schema()
    data_dir = Path(tempfile.mkdtemp(prefix="nimu-bench-"))
    port = h.free_port()
    env = h.nimu_env(schema, data_dir, **queue_env(level))
    if args.variant == "full":
        assert sim_url is not None
        env.update(
            {
                "NIMU_VEO3_PROVIDER": "gemini",
                "NIMU_VEO3_API_KEY": "bench",
                "NIMU_VEO3_BASE_URL": sim_url,
                "NIMU_VEO3_POLL_INITIAL_S": "0",
            }
        )
        cmd = [*args.server_cmd.split(), "serve", "--port", str(port)]
    else:
        cmd = [*args.server_cmd.split(), "--port", str(port)]
    env["NIMU_LOGGING_LEVEL"] = args.log_level
    url = f"http://127.0.0.1:{port}"
    procs_n = 1 if level <= 10 else args.loadgen_procs
    try:
        with h.processes() as procs:
            server = h.Proc(f"nimu-server-c{level}", cmd, env=env)
            procs.append(server)
            server.wait_for(r"serving on", 60)
            start_at = time.time() + 2.0
            loads = []
            for i in range(procs_n):
                lanes = level // procs_n + (1 if i < level % procs_n else 0)
                first = sum(
                    level // procs_n + (1 if j < level % procs_n else 0)
                    for j in range(i)
                )
                load = h.Proc(
                    f"nimu-load{i}-c{level}",
                    [
                        h.PYTHON, "-m", "bench.lifecycle_load",
                        "--url", url,
                        "--lanes", str(lanes),
                        "--first-lane", str(first),
                        "--start-at", str(start_at),
                        "--warmup-s", str(args.warmup_s),
                        "--measure-s", str(args.measure_s),
                    ],
                )
                procs.append(load)
                loads.append(load)
            roles = {
                "server": server.pids,
                "loadgen": lambda: set().union(*(p.pids() for p in loads)),
            }
            if sim_url is not None:
                sim_port = int(sim_url.rsplit(":", 1)[1])
                roles["simulator"] = lambda: listening_pid(sim_port)
            ledger = h.Ledger(roles, pg_clients=["server"])
            time.sleep(max(0.0, start_at + args.warmup_s - time.time()))
            ledger.start()
            profile = None
            if args.profile:
                profile = h.profile(
                    f"lifecycle-{args.variant}-c{level}", server.pid,
                    args.measure_s, procs,
                )
            time.sleep(args.measure_s)
            report = ledger.stop()
            results = [
                p.wait_result("lifecycle-load", args.measure_s + 120) for p in loads
            ]
        summary = summarize(results, report, args.measure_s)
        if profile is not None:
            summary["profile"] = str(profile)
        return summary
    finally:
        h.drop_schema(schema)
        shutil.rmtree(data_dir, ignore_errors=True)


def run_bullmq(level: int, args: argparse.Namespace, redis_port: int) -> dict[str, Any]:
    queue = f"bench-{h.stamp()}-c{level}"
    try:
        with h.processes() as procs:
            worker = h.Proc(
                f"bullmq-worker-c{level}-{redis_port}",
                [
                    h.NODE, "bullmq_worker.mjs", "--queue", queue,
                    "--concurrency", str(level), "--redis-port", str(redis_port),
                ],
                cwd=h.NODE_DIR,
            )
            procs.append(worker)
            worker.wait_for(r'"bench":"ready"', 30)
            start_at = time.time() + 2.0
            client = h.Proc(
                f"bullmq-client-c{level}-{redis_port}",
                [
                    h.NODE, "bullmq_client.mjs", "--queue", queue,
                    "--lanes", str(level),
                    "--start-at", str(start_at),
                    "--warmup-s", str(args.warmup_s),
                    "--measure-s", str(args.measure_s),
                    "--redis-port", str(redis_port),
                ],
                cwd=h.NODE_DIR,
            )
            procs.append(client)
            ledger = h.Ledger(
                {
                    "worker": worker.pids,
                    "client": client.pids,
                    "redis": lambda: listening_pid(redis_port),
                }
            )
            time.sleep(max(0.0, start_at + args.warmup_s - time.time()))
            ledger.start()
            time.sleep(args.measure_s)
            report = ledger.stop()
            result = client.wait_result("lifecycle-load", args.measure_s + 120)
        return summarize([result], report, args.measure_s)
    finally:
        _drop_queue(queue, redis_port)


def _drop_queue(queue: str, port: int) -> None:
    keys = subprocess.run(
        ["redis-cli", "-p", str(port), "--scan", "--pattern", f"bull:{queue}:*"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.split()
    for i in range(0, len(keys), 500):
        subprocess.run(
            ["redis-cli", "-p", str(port), "DEL", *keys[i : i + 500]],
            capture_output=True,
            timeout=60,
        )


def start_aof_redis(procs: list[h.Proc]) -> int:
    port = h.free_port()
    directory = tempfile.mkdtemp(prefix="bench-redis-aof-")
    redis = h.Proc(
        "redis-aof",
        [
            "redis-server", "--port", str(port), "--bind", "127.0.0.1",
            "--appendonly", "yes", "--appendfsync", "always",
            "--dir", directory, "--save", "",
        ],
    )
    procs.append(redis)
    redis.wait_for(r"Ready to accept connections", 20)
    return port


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", default="1,10,50")
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--measure-s", type=float, default=15.0)
    parser.add_argument("--variant", choices=["full", "stripped"], default="full")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--loadgen-procs", type=int, default=2)
    parser.add_argument("--no-aof", action="store_true")
    parser.add_argument("--no-bullmq", action="store_true")
    parser.add_argument("--server-cmd", default=None,
                        help="what runs the server (e.g. an older checkout)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the nimu_rt server during the window")
    parser.add_argument(
        "--smoke", action="store_true", help="short, and no wait for a quiet machine"
    )
    args = parser.parse_args(argv)
    h.exit_on_sigterm()
    if args.smoke:
        args.warmup_s, args.measure_s = 1.0, 3.0
    if args.server_cmd is None:
        args.server_cmd = (
            h.NIMU_RT if args.variant == "full"
            else f"{h.PYTHON} -m bench.stripped_server"
        )
    levels = [int(x) for x in args.levels.split(",")]
    doc: dict[str, Any] = {
        "bench": "lifecycle",
        "variant": args.variant,
        "command": "python -m bench.lifecycle " + " ".join(argv),
        "machine": h.machine(),
        "started": h.stamp(),
        "levels": {},
    }
    with h.processes() as infra:
        sim_url = None
        if args.variant == "full":
            sim_port = h.free_port()
            sim = h.Proc(
                "veo3-sim",
                [h.NIMU_RT, "veo3-sim", "--port", str(sim_port)],
                env=SIM_ENV,
            )
            infra.append(sim)
            sim_url = sim.wait_for(r"simulator on (\S+)", 30).group(1)
        aof_port = None if args.no_aof else start_aof_redis(infra)
        for level in levels:

            def one_run(level: int = level) -> dict[str, Any]:
                out: dict[str, Any] = {}
                if not args.no_bullmq:
                    out["bullmq"] = run_bullmq(level, args, h.REDIS_PORT)
                out["nimu_rt"] = run_nimu(level, args, sim_url)
                if aof_port is not None and not args.no_bullmq:
                    out["bullmq_aof"] = run_bullmq(level, args, aof_port)
                out["ledgers"] = [v["ledger"] for v in out.values()]
                return out

            result = h.measured(one_run, quiet=not args.smoke)
            doc["levels"][level] = result
            print(render_level(level, result), flush=True)
    path = h.save(f"lifecycle-{args.variant}", doc)
    print(render(doc))
    print(f"saved {path}")
    return 0


def _cpu(side: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in side["ledger"]["cores"].items())


def render_level(level: int, result: dict[str, Any]) -> str:
    n = result["nimu_rt"]
    line = (
        f"c{level}: nimu_rt {n['jobs_per_s']} jobs/s ({_cpu(n)}; lost"
        f" {n['lost_events']}, errors {n['errors']})"
    )
    for name, label in (("bullmq", "BullMQ"), ("bullmq_aof", "BullMQ-AOF")):
        if name in result:
            b = result[name]
            line += (
                f"  {label} {b['jobs_per_s']} jobs/s ({_cpu(b)}; lost"
                f" {b['lost_events']})"
            )
    return line


def render(doc: dict[str, Any]) -> str:
    rows = []
    empty = {"jobs_per_s": None, "latency_ms_p50": None, "lost_events": 0}
    for level, result in doc["levels"].items():
        n = result["nimu_rt"]
        b = result.get("bullmq", empty)
        a = result.get("bullmq_aof", empty)
        rows.append(
            [
                level,
                b["jobs_per_s"] or "-",
                a["jobs_per_s"] or "-",
                n["jobs_per_s"],
                h.ratio(n["jobs_per_s"], b["jobs_per_s"]),
                h.ratio(n["jobs_per_s"], a["jobs_per_s"]),
                f"{n['latency_ms_p50']} / {b['latency_ms_p50']}",
                n["lost_events"] + b["lost_events"] + a["lost_events"],
                max(led["foreign_cores"] for led in result["ledgers"]),
            ]
        )
    return h.table(
        [
            "lanes",
            "BullMQ jobs/s",
            "BullMQ AOF jobs/s",
            f"nimu_rt ({doc['variant']}) jobs/s",
            "nimu_rt/BullMQ",
            "nimu_rt/AOF",
            "p50 ms nimu/BullMQ",
            "lost",
            "foreign cores",
        ],
        rows,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
