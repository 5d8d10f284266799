"""Markdown tables for RESULTS.md from saved result files.

    uv run python -m bench.report bench/results/lifecycle-full-....json ...

Each file is rendered by the module that wrote it, preceded by the command,
the date, the machine and how quiet it was.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench import fanout, idle, lifecycle, polling, upload

RENDER = {
    "lifecycle": lifecycle.render,
    "fanout": fanout.render,
    "polling": polling.render,
    "upload": upload.render,
    "idle": idle.render,
}


def quiet(doc: dict[str, Any]) -> str:
    """How much CPU other processes used, before and during the runs."""
    before: list[float] = []
    during: list[float] = []
    discarded = 0

    def visit(node: Any) -> None:
        nonlocal discarded
        if isinstance(node, dict):
            if "quiet_before" in node:
                before.append(node["quiet_before"]["foreign_cores"])
                discarded += len(node.get("discarded_runs", []))
            if "foreign_cores" in node and "wall_s" in node:
                during.append(node["foreign_cores"])
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(doc)
    parts = []
    if before:
        parts.append(f"before each run at most {max(before):.2f} cores")
    if during:
        parts.append(f"during the runs at most {max(during):.2f} cores")
    parts.append(f"{discarded} run(s) discarded for sharing the machine")
    return "other processes used " + ", ".join(parts)


def header(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    return "\n".join(
        [
            f"`uv run {doc['command'].strip()}` — {_when(doc['started'])}",
            "",
            f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB,"
            f" Linux {m['kernel']}, Python {m['python']}, Node {m['node']};"
            f" {quiet(doc)}.",
        ]
    )


def _when(stamp: str) -> str:
    """``20261204T081401Z`` as ``2026-12-04 08:14:01 UTC``."""
    d, t = stamp[:8], stamp[9:15]
    return f"{d[:4]}-{d[4:6]}-{d[6:]} {t[:2]}:{t[2:4]}:{t[4:]} UTC"


def main(argv: list[str]) -> int:
    for name in argv:
        doc = json.loads(Path(name).read_text())
        print(header(doc))
        print()
        print(RENDER[doc["bench"]](doc))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
