"""Publisher of the fan-out benchmark: progress events at a fixed rate.

It plays a second nimu_rt instance whose job actors report progress: for
each of the given generations it stores a ``progress`` event through the
real store (one transaction each: lock the generation, write it and the
event, NOTIFY in the same statement) at ``--rate`` events per second per
generation, evenly spread, for ``--duration-s``. The server under test
hears of them through its LISTEN/NOTIFY bridge, as it hears of any other
instance's changes, and fans them out.

Each event carries ``sentAt`` (epoch seconds, taken just before its
transaction starts) in its data: latency is measured from there, so it
includes the write, the commit and the trip through PostgreSQL.

Prints ``{"bench": "published", "per_topic": {...}, ...}`` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from nimu_rt.config import RealtimeSettings
from nimu_rt.events.bridge import PostgresBridge
from nimu_rt.events.hub import Hub
from nimu_rt.models import EventType
from nimu_rt.store.postgres import PostgresStore


async def publish_one(store: PostgresStore, generation_id: str, value: int) -> bool:
    sent_at = time.time()
    async with store.transaction() as tx:
        generation = await tx.lock_generation(generation_id)
        if generation is None:
            return False
        await tx.change(
            generation,
            event_type=EventType.PROGRESS,
            progress=value,
            extra={"sentAt": sent_at},
        )
    return True


async def main(args: argparse.Namespace) -> dict[str, object]:
    ids = json.loads(Path(args.generations).read_text())["generations"]
    store = PostgresStore(
        args.database_url, schema=args.schema, min_size=4, max_size=args.pool
    )
    await store.open()
    bridge = PostgresBridge(store, Hub(), RealtimeSettings())
    await bridge.start()
    per_topic = {gid: 0 for gid in ids}
    pending: set[asyncio.Task[bool]] = set()
    late_max_s = 0.0
    failures: list[str] = []

    def count(task: asyncio.Task[bool], gid: str) -> None:
        # Only events that were committed reach subscribers.
        if task.cancelled() or task.exception() is not None or not task.result():
            failures.append(repr(task.exception()) if not task.cancelled() else "x")
        else:
            per_topic[gid] += 1

    try:
        period_s = 1.0 / args.rate
        # Event k of generation i is due at start + (k + i / M) * period.
        schedule = [(i * period_s / len(ids), gid) for i, gid in enumerate(ids)]
        start = time.time() + 0.2
        end = start + args.duration_s
        k = 0
        while True:
            for offset, gid in schedule:
                due = start + k * period_s + offset
                if due >= end:
                    break
                delay = due - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    late_max_s = max(late_max_s, -delay)
                task = asyncio.create_task(publish_one(store, gid, 5 + k % 80))
                pending.add(task)
                task.add_done_callback(pending.discard)
                task.add_done_callback(lambda t, gid=gid: count(t, gid))
            else:
                k += 1
                continue
            break
        if pending:
            await asyncio.wait(pending, timeout=30)
    finally:
        await bridge.close()
        await store.close()
    return {
        "bench": "published",
        "events": sum(per_topic.values()),
        "per_topic": {f"generation:{gid}": n for gid, n in per_topic.items()},
        "late_max_ms": round(late_max_s * 1000, 1),
        "failures": len(failures),
        "failure_samples": failures[:5],
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--generations", required=True, help="JSON file of ids")
    parser.add_argument("--rate", type=float, default=2.0, help="per generation")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--pool", type=int, default=10)
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse(sys.argv[1:])))), flush=True)
