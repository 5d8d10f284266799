"""Benchmark 3: status polling, nimu_rt against a bare Starlette route.

``GET /api/generations/{id}`` of ``nimu-rt serve`` (bearer token verified,
snapshot read from PostgreSQL, ETag compared, JSON answered, request logged)
against :mod:`bench.bare_server` (a constant body of the same bytes, same
uvicorn settings and loop), both loaded by ``wrk`` (one thread, a separate
process) for the 200 case and the 304 case (``If-None-Match`` matching).

    uv run python -m bench.polling --connections 32 --duration-s 15
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import harness as h
from bench.fanout import PROMPT

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    assert match, text
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """Requests/s, p50/p99 and errors from ``wrk --latency`` output."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert rate, output
    rps = float(rate.group(1))
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: (.*)", output)
    total = re.search(r"(\d+) requests in", output)
    return {
        "requests_per_s": round(rps),
        "p50_ms": _ms(p50.group(1)) if p50 else None,
        "p99_ms": _ms(p99.group(1)) if p99 else None,
        "requests": int(total.group(1)) if total else None,
        "non_2xx_3xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


def load(
    name: str, url: str, headers: dict[str, str], args: argparse.Namespace,
    server: h.Proc, procs: list[h.Proc],
) -> dict[str, Any]:
    cmd = [
        "wrk", "-t1", f"-c{args.connections}", f"-d{args.duration_s}s",
        "--latency", "--timeout", "5s",
    ]
    for key, value in headers.items():
        cmd += ["-H", f"{key}: {value}"]
    wrk = h.Proc(f"wrk-{name}", [*cmd, url])
    procs.append(wrk)
    profile = None
    if args.profile and name.startswith("nimu"):
        profile = h.profile(f"polling-{name}", server.pid, args.duration_s - 1, procs)
    ledger = h.Ledger(
        {"server": server.pids, "wrk": wrk.pids}, pg_clients=["server"]
    )
    ledger.start()
    # The window ends just before wrk does, so its own CPU is still readable.
    time.sleep(max(0.5, args.duration_s - 0.5))
    report = ledger.stop()
    wrk.wait(args.duration_s + 30)
    result = parse_wrk(wrk.output())
    result["ledger"] = report
    if profile is not None:
        result["profile"] = str(profile)
    served = result["requests_per_s"] * report["wall_s"]
    if served:
        result["server_cpu_us_per_request"] = round(
            report["cores"].get("server", 0.0) * report["wall_s"] / served * 1e6, 1
        )
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration-s", type=int, default=15)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--profile", action="store_true",
                        help="record py-spy profiles of nimu_rt's runs")
    parser.add_argument("--server-cmd", default=h.NIMU_RT,
                        help="what runs `serve` (e.g. an older checkout)")
    args = parser.parse_args(argv)
    h.exit_on_sigterm()
    if args.smoke:
        args.duration_s = 3
    doc: dict[str, Any] = {
        "bench": "polling",
        "command": "python -m bench.polling " + " ".join(argv),
        "machine": h.machine(),
        "started": h.stamp(),
        "connections": args.connections,
        "log_level": args.log_level,
    }
    schema = h.new_schema()
    data_dir = Path(tempfile.mkdtemp(prefix="nimu-bench-"))
    try:
        with h.processes() as procs:
            port = h.free_port()
            url = f"http://127.0.0.1:{port}"
            env = h.nimu_env(schema, data_dir, NIMU_LOGGING_LEVEL=args.log_level)
            nimu = h.Proc(
                "nimu-server-poll",
                [*args.server_cmd.split(), "serve", "--port", str(port)],
                env=env,
            )
            procs.append(nimu)
            nimu.wait_for(r"serving on", 60)
            auth = {"Authorization": f"Bearer {h.token('poll-user')}"}
            with httpx.Client(base_url=url, headers=auth) as http:
                created = http.post("/api/generations", json={"prompt": PROMPT})
                created.raise_for_status()
                gid = created.json()["id"]
                snap = http.get(f"/api/generations/{gid}")
                snap.raise_for_status()
            etag = snap.headers["etag"]
            snapshot = data_dir / "snapshot.json"
            snapshot.write_text(json.dumps({"body": snap.text, "etag": etag}))
            bare_port = h.free_port()
            bare = h.Proc("bare-server", [h.PYTHON, "-m", "bench.bare_server",
                                          "--port", str(bare_port),
                                          "--snapshot", str(snapshot)])
            procs.append(bare)
            bare.wait_for(r"bare server on", 30)
            path = f"/api/generations/{gid}"
            doc["body_bytes"] = len(snap.content)

            def one_run() -> dict[str, Any]:
                out: dict[str, Any] = {}
                for case, extra in (("200", {}), ("304", {"If-None-Match": etag})):
                    out[f"bare_{case}"] = load(
                        f"bare-{case}", f"http://127.0.0.1:{bare_port}{path}",
                        extra, args, bare, procs,
                    )
                    out[f"nimu_{case}"] = load(
                        f"nimu-{case}", url + path, {**auth, **extra}, args,
                        nimu, procs,
                    )
                out["ledgers"] = [v["ledger"] for v in out.values()]
                return out

            doc["result"] = h.measured(one_run, quiet=not args.smoke)
    finally:
        h.drop_schema(schema)
        shutil.rmtree(data_dir, ignore_errors=True)
    path = h.save("polling", doc)
    print(render(doc))
    print(f"saved {path}")
    return 0


def render(doc: dict[str, Any]) -> str:
    r = doc["result"]
    rows = []
    for case in ("200", "304"):
        b, n = r[f"bare_{case}"], r[f"nimu_{case}"]
        rows.append(
            [
                case,
                b["requests_per_s"],
                n["requests_per_s"],
                h.ratio(n["requests_per_s"], b["requests_per_s"]),
                f"{b['p50_ms']} / {n['p50_ms']}",
                f"{b['p99_ms']} / {n['p99_ms']}",
                f"{b['ledger']['cores'].get('server')} /"
                f" {n['ledger']['cores'].get('server')}",
                f"{b.get('server_cpu_us_per_request')} /"
                f" {n.get('server_cpu_us_per_request')}",
                f"{n['ledger']['cores'].get('postgres')}",
                f"{b['ledger']['cores'].get('wrk')} /"
                f" {n['ledger']['cores'].get('wrk')}",
                b["non_2xx_3xx"] + n["non_2xx_3xx"],
                max(b["ledger"]["foreign_cores"], n["ledger"]["foreign_cores"]),
            ]
        )
    return h.table(
        [
            "status",
            "bare req/s",
            "nimu_rt req/s",
            "nimu/bare",
            "p50 ms bare / nimu",
            "p99 ms bare / nimu",
            "server cores bare / nimu",
            "server CPU us/request",
            "postgres cores",
            "wrk cores",
            "errors",
            "foreign cores",
        ],
        rows,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
