"""The training-set build alone, in-process, on a cached archive: for before/after comparisons.

    .venv/bin/python bench/training_compare.py TREE [--events 1000000] [--labels 100000] \
        [--settle-ms 1000]

``TREE`` is a source tree of eventpulse (this checkout, or an older commit exported with
``git archive <ref> | tar -x -C /tmp/base`` and the compiled ``.so`` files copied next to its
sources); its ``eventpulse`` is imported, so that runs of two trees alternate on the same data
and the same machine. The archive (bench/archive.py's ``write_archive`` of
bench/throughput.py's events) and the labels (``training_bench``'s: half users, half items,
whole-second moments over the events) are those of ``bench/archive.py``'s training part; the
archive is written once under /tmp and reused, with its time span, so that every run reads the
same rows. Prints one line: events/s, label rows/s, seconds, events, load. ``--archive DIR
--span FIRST,LAST``: another archive (bench/archive.py builds its training set so, in a fresh
process, as the command runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--settle-ms", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=0,
                        help="processes (eventpulse.offline.parallel; trees since 2026-12-02); "
                             "0: training.build in this process")
    parser.add_argument("--out", type=Path, help="write the training set here (parquet)")
    parser.add_argument("--archive", type=Path,
                        help="build from this archive (bench/archive.py's) instead of the cached "
                             "one; with --span")
    parser.add_argument("--span", help="FIRST,LAST: the archive's event-time span (ms)")
    parser.add_argument("--protocol", type=int, default=2,
                        help="RESP version of the private Redis connection (2, as "
                             "`eventpulse training-set`; 3 for trees before 2026-12-01 evening)")
    args = parser.parse_args()
    tree = str(args.tree.resolve())
    sys.path[:0] = [tree, f"{tree}/bench"]
    import eventpulse
    if not (eventpulse.__file__ or "").startswith(tree):
        raise SystemExit(f"imported {eventpulse.__file__}, not from {tree}")
    from eventpulse.local.servers import LocalRedis
    if args.archive:
        first, last = (int(t) for t in args.span.split(","))
        root, span = args.archive, (first, last)
    else:
        root, span = archive(args.events)
    with LocalRedis() as redis_server:
        print(asyncio.run(run(redis_server.url, tree, args, root, span)), flush=True)


def archive(m: int) -> tuple[Path, tuple[int, int]]:
    """The cached archive of ``m`` events and their event-time span (written on first use)."""
    from archive import write_archive  # type: ignore[import-not-found]
    from throughput import make_events  # type: ignore[import-not-found]

    root = Path(f"/tmp/eventpulse-training-archive-{m}")
    span = root.with_suffix(".json")
    if not span.exists():
        shutil.rmtree(root, ignore_errors=True)
        events = make_events(m)
        write_archive(root, "events", events)
        span.write_text(json.dumps([json.loads(events[0])["timestamp"],
                                    json.loads(events[-1])["timestamp"]]))
    first, last = json.loads(span.read_text())
    return root, (first, last)


async def run(url: str, tree: str, args: Any, root: Path, span: tuple[int, int]) -> str:
    import pyarrow.parquet as pq
    import redis.asyncio as aioredis
    from common import features  # type: ignore[import-not-found]

    from eventpulse.archive.store import ArchiveStore
    from eventpulse.config import parse_config
    from eventpulse.offline import training

    topic = "events"
    first, last = span
    job = parse_config({"topics": {topic: "behaviour"}, "features": features(topic)})
    from archive import bench_labels  # type: ignore[import-not-found]

    labels = bench_labels(first, last, args.labels)  # as training_bench draws them
    specs = training.choose_features(job, labels, None)
    started = time.perf_counter()  # the whole call: the output table and freeing included
    if args.jobs:  # the processes connect to the URL themselves
        from eventpulse.offline import parallel
        table, stats = await parallel.build(job, ArchiveStore.open(str(root)), labels, specs,
                                            url, args.jobs, settle_ms=args.settle_ms)
    else:
        client = aioredis.Redis.from_url(url, protocol=args.protocol)
        try:
            table, stats = await training.build(job, ArchiveStore.open(str(root)), labels,
                                                specs, client, settle_ms=args.settle_ms)
        finally:
            await client.aclose()
    seconds = time.perf_counter() - started
    if args.out:
        pq.write_table(table, args.out)
    return (f"{tree}: training_events_per_s={stats.events / seconds:.0f} "
            f"training_rows_per_s={stats.rows / seconds:.0f} seconds={seconds:.1f} "
            f"events={stats.events} load={os.getloadavg()[0]:.1f}"
            # older trees (before/after runs) do not report these
            + (f" applied={stats.applied}" if hasattr(stats, "applied") else "")
            + (" phases=" + ",".join(f"{name.replace(' ', '_')}:{s:.1f}"
                                     for name, s in stats.phases.items())
               if hasattr(stats, "phases") else ""))


if __name__ == "__main__":
    main()
