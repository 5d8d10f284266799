"""Benchmark 2: WebSocket fan-out, nimu_rt against Socket.IO.

N subscribers (node processes, bench/node/fanout_clients.mjs, a share of the
connections each) over M generations; each generation gets ``--rate``
progress events per second for ``--duration-s``, so the server delivers
``N x rate`` events per second. Every event carries the publisher's stamp;
clients measure publish-to-receipt latency and count every arrival against
what was published (a run that loses or duplicates an event fails).

nimu_rt: ``nimu-rt serve`` on PostgreSQL; subscribers authenticate with
their generation owner's token and subscribe to ``generation:{id}``; the
events are stored by :mod:`bench.fanout_publisher`, a second process
writing through the store as another instance would, and reach the server
over LISTEN/NOTIFY. Socket.IO (bench/node/socketio_server.mjs): one room per
topic, the same frames emitted by a publisher inside the server process.

The same run gives benchmark 5's RSS per idle connection: the server's RSS
before the clients connect and once all are subscribed.

    uv run python -m bench.fanout --clients 1000,5000,10000 --generations 100
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import harness as h

PROMPT = (
    "A golden retriever chases a red ball across a wet lawn in a park at dawn,"
    " cinematic handheld close-up."
)


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def settle_rss(pid: int, wait_s: float = 2.0) -> int:
    """RSS once it stops moving (allocations after connects settle)."""
    time.sleep(wait_s)
    return rss(pid)


def create_generations(url: str, m: int) -> tuple[list[str], list[str]]:
    topics, tokens = [], []
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in range(m):
            tok = h.token(f"fan-user-{i}")
            answer = http.post(
                "/api/generations",
                json={"prompt": PROMPT},
                headers={"Authorization": f"Bearer {tok}"},
            )
            answer.raise_for_status()
            topics.append(f"generation:{answer.json()['id']}")
            tokens.append(tok)
    return topics, tokens


def start_clients(
    mode: str, url: str, assignments: Path, n: int, procs: list[h.Proc]
) -> list[h.Proc]:
    count = max(1, math.ceil(n / 2500))
    clients = []
    for i in range(count):
        share = n // count + (1 if i < n % count else 0)
        first = sum(n // count + (1 if j < n % count else 0) for j in range(i))
        client = h.Proc(
            f"{mode}-clients{i}-n{n}",
            [
                h.NODE, "fanout_clients.mjs", "--mode", mode, "--url", url,
                "--assignments", str(assignments),
                "--first", str(first), "--count", str(share),
            ],
            cwd=h.NODE_DIR,
            stdin=True,
        )
        procs.append(client)
        clients.append(client)
    return clients


def wait_ready(clients: list[h.Proc], n: int) -> dict[str, Any]:
    ready = [c.wait_result("ready", 300) for c in clients]
    subscribed = sum(r["subscribed"] for r in ready)
    if subscribed != n:
        raise RuntimeError(f"only {subscribed} of {n} clients subscribed: {ready}")
    return {"connect_s": round(max(r["connect_s"] for r in ready), 2)}


def collect(
    clients: list[h.Proc], published: dict[str, Any], duration_s: float
) -> dict[str, Any]:
    per_topic = published["per_topic"]
    results = []
    for client in clients:
        client.send("report " + json.dumps(per_topic))
        results.append(client.wait_result("received", 60))
    hist: dict[int, int] = {}
    for r in results:
        for bucket, n in r["hist"].items():
            hist[int(bucket)] = hist.get(int(bucket), 0) + n
    received = sum(r["received"] for r in results)
    return {
        "published": published["events"],
        "received": received,
        "expected": sum(r["expected"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "seq_gaps": sum(r["seq_gaps"] for r in results),
        "closed_early": sum(r["closed_early"] for r in results),
        "deliveries_per_s": round(received / duration_s),
        "p50_ms": _pct(hist, 0.5),
        "p99_ms": _pct(hist, 0.99),
        "max_ms": _pct(hist, 1.0),
        "publisher_late_max_ms": published.get("late_max_ms"),
    }


def _pct(hist: dict[int, int], q: float) -> float | None:
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            if bucket < 10000:
                return round((bucket + 0.5) / 100, 2)
            return round(100 + (bucket - 10000) + 0.5, 1)
    return None


def finish(
    result: dict[str, Any], report: dict[str, Any], server_role: str, n: int
) -> dict[str, Any]:
    result["ledger"] = report
    cores = report["cores"].get(server_role, 0.0)
    if result["received"]:
        result["server_cpu_us_per_delivery"] = round(
            cores * report["wall_s"] / result["received"] * 1e6, 2
        )
    result["ok"] = (
        result["lost"] == 0
        and result["closed_early"] == 0
        and result["seq_gaps"] == 0
        and result["received"] == result["expected"]
    )
    return result


def run_nimu(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    schema = h.new_schema()
    data_dir = Path(tempfile.mkdtemp(prefix="nimu-bench-"))
    port = h.free_port()
    url = f"http://127.0.0.1:{port}"
    env = h.nimu_env(schema, data_dir, NIMU_LOGGING_LEVEL=args.log_level)
    try:
        with h.processes() as procs:
            server = h.Proc(
                f"nimu-server-n{n}",
                [*args.server_cmd.split(), "serve", "--port", str(port)],
                env=env,
            )
            procs.append(server)
            server.wait_for(r"serving on", 60)
            topics, tokens = create_generations(url, args.generations)
            assignments = workdir / f"nimu-{n}.json"
            assignments.write_text(json.dumps({"topics": topics, "tokens": tokens}))
            ids = workdir / f"nimu-ids-{n}.json"
            ids.write_text(json.dumps({"generations": [t[11:] for t in topics]}))
            rss_before = settle_rss(server.pid, 1.0)
            clients = start_clients("nimu", url.replace("http", "ws") + "/ws",
                                    assignments, n, procs)
            connect = wait_ready(clients, n)
            rss_connected = settle_rss(server.pid)
            publisher: list[h.Proc] = []
            ledger = h.Ledger(
                {
                    "server": server.pids,
                    "clients": lambda: set().union(*(c.pids() for c in clients)),
                    "publisher": lambda: set().union(*(p.pids() for p in publisher)),
                },
                pg_clients=["server", "publisher"],
            )
            ledger.start()
            if args.profile:
                result_profile = h.profile(
                    f"fanout-nimu-{n}", server.pid, args.duration_s, procs
                )
            pub = h.Proc(
                f"nimu-publisher-n{n}",
                [
                    h.PYTHON, "-m", "bench.fanout_publisher",
                    "--database-url", h.PG_URL, "--schema", schema,
                    "--generations", str(ids),
                    "--rate", str(args.rate), "--duration-s", str(args.duration_s),
                ],
            )
            procs.append(pub)
            publisher.append(pub)
            published = pub.wait_result("published", args.duration_s + 120)
            time.sleep(args.drain_s)
            report = ledger.stop()
            result = collect(clients, published, args.duration_s)
            result.update(connect)
            result["publish_failures"] = published.get("failures", 0)
            if args.profile:
                result["profile"] = str(result_profile)
            result["rss_mib_before"] = round(rss_before / 2**20, 1)
            result["rss_mib_connected"] = round(rss_connected / 2**20, 1)
            result["rss_kib_per_connection"] = round(
                (rss_connected - rss_before) / n / 1024, 1
            )
            return finish(result, report, "server", n)
    finally:
        h.drop_schema(schema)
        shutil.rmtree(data_dir, ignore_errors=True)


def run_socketio(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = h.free_port()
    topics = [f"generation:{uuid.uuid4()}" for _ in range(args.generations)]
    assignments = workdir / f"socketio-{n}.json"
    assignments.write_text(json.dumps({"topics": topics, "tokens": []}))
    with h.processes() as procs:
        server = h.Proc(
            f"socketio-server-n{n}",
            [h.NODE, "socketio_server.mjs", "--port", str(port),
             "--topics", str(assignments)],
            cwd=h.NODE_DIR,
            stdin=True,
        )
        procs.append(server)
        server.wait_result("ready", 30)
        rss_before = settle_rss(server.pid, 1.0)
        clients = start_clients("socketio", f"http://127.0.0.1:{port}",
                                assignments, n, procs)
        connect = wait_ready(clients, n)
        rss_connected = settle_rss(server.pid)
        ledger = h.Ledger(
            {
                "server": server.pids,
                "clients": lambda: set().union(*(c.pids() for c in clients)),
            }
        )
        ledger.start()
        server.send(f"publish {args.rate} {args.duration_s}")
        published = server.wait_result("published", args.duration_s + 120)
        time.sleep(args.drain_s)
        report = ledger.stop()
        result = collect(clients, published, args.duration_s)
        result.update(connect)
        result["rss_mib_before"] = round(rss_before / 2**20, 1)
        result["rss_mib_connected"] = round(rss_connected / 2**20, 1)
        result["rss_kib_per_connection"] = round(
            (rss_connected - rss_before) / n / 1024, 1
        )
        return finish(result, report, "server", n)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1000,5000,10000")
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--rate", type=float, default=2.0,
                        help="events per second per generation")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--drain-s", type=float, default=1.0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--only", choices=["nimu", "socketio"], default=None)
    parser.add_argument("--server-cmd", default=h.NIMU_RT,
                        help="what runs `serve` (to try a wrapped server)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the nimu_rt server while it publishes")
    parser.add_argument("--smoke", action="store_true",
                        help="short, and no wait for a quiet machine")
    args = parser.parse_args(argv)
    h.exit_on_sigterm()
    if args.smoke:
        args.duration_s = 4.0
    levels = [int(x) for x in args.clients.split(",")]
    doc: dict[str, Any] = {
        "bench": "fanout",
        "command": "python -m bench.fanout " + " ".join(argv),
        "machine": h.machine(),
        "started": h.stamp(),
        "generations": args.generations,
        "rate_per_generation": args.rate,
        "duration_s": args.duration_s,
        "levels": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    try:
        for n in levels:

            def one_run(n: int = n) -> dict[str, Any]:
                out: dict[str, Any] = {}
                if args.only != "nimu":
                    out["socketio"] = run_socketio(n, args, workdir)
                if args.only != "socketio":
                    out["nimu_rt"] = run_nimu(n, args, workdir)
                out["ledgers"] = [v["ledger"] for v in out.values()]
                return out

            result = h.measured(one_run, quiet=not args.smoke)
            doc["levels"][n] = result
            print(render_level(n, result), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    path = h.save("fanout", doc)
    print(render(doc))
    print(f"saved {path}")
    return 0


def _side(r: dict[str, Any]) -> str:
    cores = ", ".join(f"{k} {v}" for k, v in r["ledger"]["cores"].items())
    return (
        f"{r['deliveries_per_s']}/s p50 {r['p50_ms']} p99 {r['p99_ms']} ms,"
        f" lost {r['lost']}, ok {r['ok']}, {r.get('server_cpu_us_per_delivery')}"
        f" us/delivery, rss {r['rss_mib_connected']} MiB"
        f" ({r['rss_kib_per_connection']} KiB/conn), connect {r['connect_s']} s;"
        f" cores: {cores}"
    )


def render_level(n: int, result: dict[str, Any]) -> str:
    lines = [f"N={n}"]
    for name in ("socketio", "nimu_rt"):
        if name in result:
            lines.append(f"  {name}: {_side(result[name])}")
    return "\n".join(lines)


def render(doc: dict[str, Any]) -> str:
    rows = []
    for n, result in doc["levels"].items():
        s, m = result.get("socketio"), result.get("nimu_rt")
        if not s or not m:
            continue
        rows.append(
            [
                n,
                f"{s['deliveries_per_s']} / {m['deliveries_per_s']}",
                f"{s['p50_ms']} / {m['p50_ms']}",
                f"{s['p99_ms']} / {m['p99_ms']}",
                h.ratio(m["p99_ms"], s["p99_ms"]),
                f"{s.get('server_cpu_us_per_delivery')} /"
                f" {m.get('server_cpu_us_per_delivery')}",
                h.ratio(
                    m.get("server_cpu_us_per_delivery"),
                    s.get("server_cpu_us_per_delivery"),
                ),
                f"{s['ledger']['peak_rss_mib'].get('server')} /"
                f" {m['ledger']['peak_rss_mib'].get('server')}",
                f"{s['lost']} / {m['lost']}",
                max(led["foreign_cores"] for led in result["ledgers"]),
            ]
        )
    return h.table(
        [
            "clients",
            "deliveries/s Socket.IO / nimu_rt",
            "p50 ms",
            "p99 ms",
            "p99 ratio",
            "server CPU us/delivery",
            "CPU ratio",
            "server peak RSS MiB",
            "lost",
            "foreign cores",
        ],
        rows,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
