"""Summarise a py-spy ``--format raw`` profile: where the samples went.

    uv run py-spy record -p PID -d 15 -r 200 -f raw -o prof.txt --nonblocking
    uv run python -m bench.profile_summary prof.txt [--top 30] [--match TEXT]

Prints the functions with the most samples on the stack (inclusive) and at
the top of the stack (self), as shares of all samples. Idle samples (the
event loop waiting in ``select``/``epoll``) are counted apart, so the shares
are of busy time.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys

_IDLE = re.compile(r"\b(select|poll|_run_once|epoll)\b.*\(selectors\.py")


def load(path: str) -> list[tuple[list[str], int]]:
    stacks = []
    with open(path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            if not line:
                continue
            frames, _, count = line.rpartition(" ")
            stacks.append((frames.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    # "func (path/to/module.py:123)" -> "func (module.py)"
    match = re.match(r"(.*) \((.*?):?(\d*)\)$", frame)
    if not match:
        return frame
    name, path, _ = match.groups()
    parts = path.split("/")
    where = "/".join(parts[-2:])
    return f"{name} ({where})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default="", help="only stacks containing this")
    args = parser.parse_args(argv)
    stacks = load(args.path)
    idle = busy = 0
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        leaf = frames[-1] if frames else ""
        if "selectors.py" in leaf or "select (" in leaf or "epoll" in leaf:
            idle += count
            continue
        if args.match and not any(args.match in f for f in frames):
            continue
        busy += count
        own[short(leaf)] += count
        for name in {short(f) for f in frames}:
            inclusive[name] += count
    total = idle + busy
    print(f"samples {total}: busy {busy} ({100 * busy / max(total, 1):.0f} %),"
          f" idle {idle}")
    print("\ninclusive (share of busy samples):")
    for name, count in inclusive.most_common(args.top):
        print(f"  {100 * count / max(busy, 1):5.1f} %  {name}")
    print("\nself:")
    for name, count in own.most_common(args.top):
        print(f"  {100 * count / max(busy, 1):5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
