"""Benchmark 4: the upload pipeline against a plain multipart upload.

A moto S3 server (``moto_server``) and the Veo 3 simulator run as their own
processes; each upload (:mod:`bench.upload_run`) runs in a fresh process so
its peak RSS is its own. For each size: ``plain`` (the baseline: the bytes
in memory, aiobotocore multipart), ``stream`` (``R2Storage.upload_stream``
from the simulator's download) and ``pipeline`` (``store_video``: stream,
spool, PyAV probe and thumbnail), all with 8 MiB parts, 4 in flight.

    uv run python -m bench.upload --sizes 268435456,1073741824
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from typing import Any

import httpx

from bench import harness as h

MODES = ("plain", "stream", "pipeline")


def make_bucket(moto_url: str) -> str:
    bucket = f"bench-{secrets.token_hex(4)}"
    body = (
        "<CreateBucketConfiguration><LocationConstraint>auto"
        "</LocationConstraint></CreateBucketConfiguration>"
    )
    httpx.put(f"{moto_url}/{bucket}", content=body, timeout=30).raise_for_status()
    return bucket


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=f"{256 * 2**20},{2**30}")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    h.exit_on_sigterm()
    if args.smoke:
        args.sizes = str(64 * 2**20)
    sizes = [int(x) for x in args.sizes.split(",")]
    doc: dict[str, Any] = {
        "bench": "upload",
        "command": "python -m bench.upload " + " ".join(argv),
        "machine": h.machine(),
        "started": h.stamp(),
        "sizes": {},
    }
    with h.processes() as infra:
        moto_port = h.free_port()
        moto = h.Proc(
            "moto",
            [str(h.ROOT / ".venv/bin/moto_server"), "-H", "127.0.0.1",
             "-p", str(moto_port)],
        )
        infra.append(moto)
        moto_url = f"http://127.0.0.1:{moto_port}"
        moto.wait_for(r"Running on", 30)
        sim_port = h.free_port()
        sim = h.Proc(
            "veo3-sim-upload",
            [h.NIMU_RT, "veo3-sim", "--port", str(sim_port)],
            env={"NIMU_SIMULATOR_GENERATION_S": "0", "NIMU_LOGGING_LEVEL": "WARNING"},
        )
        infra.append(sim)
        sim_url = sim.wait_for(r"simulator on (\S+)", 30).group(1)
        for size in sizes:

            def one_run(size: int = size) -> dict[str, Any]:
                out: dict[str, Any] = {}
                for mode in MODES:
                    httpx.post(f"{moto_url}/moto-api/reset", timeout=60)
                    bucket = make_bucket(moto_url)
                    with h.processes() as procs:
                        runner = h.Proc(
                            f"upload-{mode}-{size}",
                            [
                                h.PYTHON, "-m", "bench.upload_run",
                                "--mode", mode, "--size", str(size),
                                "--endpoint", moto_url, "--bucket", bucket,
                                "--sim-url", sim_url,
                            ],
                        )
                        procs.append(runner)
                        ledger = h.Ledger(
                            {"moto": moto.pids, "simulator": sim.pids}
                        )
                        ledger.start()
                        result = runner.wait_result("upload", 900)
                        report = ledger.stop()
                    report["cores"]["uploader"] = round(
                        result["cpu_s"] / report["wall_s"], 3
                    )
                    result["ledger"] = report
                    out[mode] = result
                    print(
                        f"{size >> 20} MiB {mode}: {result['mb_per_s']} MB/s,"
                        f" peak RSS {result['peak_rss_mib']} MiB,"
                        f" cores {report['cores']}",
                        flush=True,
                    )
                    time.sleep(1)
                out["ledgers"] = [v["ledger"] for v in out.values()]
                return out

            doc["sizes"][size] = h.measured(one_run, quiet=not args.smoke)
        httpx.post(f"{moto_url}/moto-api/reset", timeout=60)
    path = h.save("upload", doc)
    print(render(doc))
    print(f"saved {path}")
    return 0


def render(doc: dict[str, Any]) -> str:
    rows = []
    for size, result in doc["sizes"].items():
        p = result["plain"]
        for mode in MODES:
            r = result[mode]
            rows.append(
                [
                    f"{int(size) >> 20} MiB",
                    mode,
                    r["mb_per_s"],
                    h.ratio(r["mb_per_s"], p["mb_per_s"]),
                    r["peak_rss_mib"],
                    r["rss_mib_before"],
                    r["cpu_s"],
                    r["ledger"]["cores"].get("moto"),
                    r["ledger"]["foreign_cores"],
                ]
            )
    return h.table(
        [
            "size",
            "mode",
            "MB/s",
            "vs plain",
            "peak RSS MiB",
            "RSS before MiB",
            "uploader CPU s",
            "moto cores",
            "foreign cores",
        ],
        rows,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
