"""The archive and training sets: throughput, and what the archive costs the feature pipeline.

    .venv/bin/python bench/archive.py [--events 200000] [--rounds 4] [--modes process] \
        [--training-events 1000000] [--labels 100000]

1. Preloads N behaviour events (bench/throughput.py's data and 10 features) into a 4-partition
   topic, then, each round, runs the worker without the archive and with it (``--modes``:
   ``process``, the default deployment, a child process of the worker; ``inline``, in the
   worker's event loop; ``sidecar``, a separately started ``eventpulse archive``) back to back,
   in alternating order, each time in fresh consumer groups, and measures the feature
   pipeline's events/s (from the offsets it commits to Kafka, after Redis holds them) and the
   archive's (from its committed offsets), first record to last. D = median over the rounds of
   1 - (features with the archive) / (features alone, same round): pairs share the load of
   their moment on a shared machine.
2. Writes an archive of M events with the archive's own writer, and builds a training set of L
   label rows (timestamps spread over the archive, whole seconds) with the 10 features, in a
   fresh process (bench/training_compare.py, as the command runs) with a private Redis, on as
   many processes as ``eventpulse training-set`` starts by default (``--jobs``); prints
   archived events/s and label rows/s of the whole build.

Last line: ``archive_events_per_s=A feature_throughput_drop=D training_events_per_s=T
training_rows_per_s=L``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import redis.asyncio as aioredis
from common import (
    PARTITIONS,
    Rate,
    commit_watcher,
    committed_total,
    preload,
    redis_holds,
    start,
    stop,
    worker_env,
)
from throughput import make_events

from eventpulse.archive.layout import KindLayout
from eventpulse.archive.segment import CutRules, PartitionSegmenter
from eventpulse.archive.store import ArchiveStore
from eventpulse.archive.writer import encode
from eventpulse.local.servers import LocalRedis, TansuBroker, free_port, wait_for_port
from eventpulse.offline import parallel, training
from eventpulse.streams.decode import RecordDecoder
from eventpulse.streams.topics import RecordKind


def archive_committed(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("eventpulse_archive_committed_offset{"))


async def run_worker(broker_url: str, bootstrap: str, redis_url: str, topic: str, n: int,
                     workdir: Path, mode: str, round_no: int) -> tuple[float, float | None]:
    """Feature events/s and (with the archive) archive events/s, first record to last.
    ``mode``: ``none`` (features only), ``process`` (the default: the worker runs the archive as
    its child process), ``inline`` (the archive in the worker's event loop), ``sidecar`` (the
    archive as a separately started ``eventpulse archive``)."""
    group = f"bench-{topic}-{round_no}-{mode}"
    port = free_port()
    env = worker_env(broker_url, redis_url, topic, group, workdir, port,
                     EVENTPULSE_SESSION_TIMEOUT_MS="6000")
    archive_env = {"EVENTPULSE_ARCHIVE_URL": str(workdir / f"archive-{group}"),
                   "EVENTPULSE_ARCHIVE_IDLE_FLUSH_MS": "1000"}
    if mode in ("process", "inline"):
        env.update(archive_env, EVENTPULSE_ARCHIVE_MODE=mode,
                   EVENTPULSE_ARCHIVE_METRICS_PORT=str(free_port()))
    processes = [start("worker", env, workdir / f"worker-{group}.log")]
    archive_port = int(env.get("EVENTPULSE_ARCHIVE_METRICS_PORT", port)) if mode == "process" \
        else port
    if mode == "sidecar":
        archive_port = free_port()
        processes.append(start("archive", {**env, **archive_env,
                                           "EVENTPULSE_METRICS_PORT": str(archive_port)},
                               workdir / f"archive-{group}.log"))
    client = aioredis.Redis.from_url(redis_url)
    watcher = commit_watcher(bootstrap, group)
    await watcher.start()
    archive = mode != "none"
    try:
        wait_for_port(port, timeout=60, process=processes[0])
        if archive_port != port:
            wait_for_port(archive_port, timeout=60)
        features_rate, archive_rate = Rate(n, time.perf_counter), Rate(n, time.perf_counter)
        archive_polled = -1.0
        while True:
            features_done = features_rate.see(await committed_total(watcher, topic))
            # the archive's metrics page every 0.1 s while the features are measured, every
            # 10 ms after: a scrape costs the archive process about 1 ms of CPU, and a poll every
            # 10 ms (twice per turn, as this loop did) took a tenth of a core or more from the
            # features' round with the archive alone (docs/performance.md, 2026-12-03 evening)
            now = time.perf_counter()
            if archive and (features_done or now - archive_polled >= 0.1):
                archive_polled = now
                if archive_rate.see(archive_committed(archive_port)) and features_done:
                    break
            elif features_done and not archive:
                break
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"a process exited; see {workdir}")
            await asyncio.sleep(0.01)
        await redis_holds(client, group, n)
        return features_rate.per_s, archive_rate.per_s if archive else None
    finally:
        stop(processes)
        await watcher.stop()
        await client.aclose()


def write_archive(root: Path, topic: str, events: list[bytes]) -> None:
    """The archive the worker would write for these events (4 partitions, round robin),
    through the archive's decoder, row layout and writer."""
    layout, decoder = KindLayout(RecordKind.BEHAVIOUR), RecordDecoder(RecordKind.BEHAVIOUR)
    store = ArchiveStore.open(str(root))
    rules = CutRules(max_records=50_000, max_span_ms=300_000)
    segmenters = [PartitionSegmenter(topic, p, rules) for p in range(PARTITIONS)]
    for i, raw in enumerate(events):
        partition, offset = i % PARTITIONS, i // PARTITIONS
        record = decoder.decode(raw, check_now(raw))
        seg = segmenters[partition]
        ts = record.timestamp  # type: ignore[union-attr]
        row = layout.row(record, partition, offset, ts + 5)  # type: ignore[arg-type]
        if seg.closes_before(offset, ts):
            for name, data, _ in encode(layout, seg.close()):
                store.put(name, data)
        if not seg.is_open:
            seg.begin(offset, None)
        if seg.append(offset, len(raw), ts, row):
            for name, data, _ in encode(layout, seg.close()):
                store.put(name, data)
    for seg in segmenters:
        if seg.is_open:
            for name, data, _ in encode(layout, seg.close()):
                store.put(name, data)


def check_now(raw: bytes) -> int:
    return int(json.loads(raw)["timestamp"]) + 5


def bench_labels(first: int, last: int, n: int) -> training.Labels:
    """``n`` label rows, half users and half items, at whole-second moments over the events'
    span: the same draw in every bench run (and in bench/training_compare.py)."""
    rng = random.Random(5)
    times = [(rng.randint(first, last + 5) // 1000) * 1000 for _ in range(n)]
    entities = [rng.choice(["user", "item"]) for _ in range(n)]
    ids = [f"u{rng.randint(1, 20_000)}" if e == "user" else f"i{rng.randint(1, 2_000)}"
           for e in entities]
    return training.labels_of(pa.table({"entity": entities, "entity_id": ids,
                                        "timestamp": times}))


def training_bench(workdir: Path, m: int, labels_n: int, settle_ms: int = 1000,
                   jobs: int = 0) -> tuple[float, float, float]:
    """Archive ``m`` events, then build the training set in a fresh process, as
    ``eventpulse training-set`` runs (bench/training_compare.py on that archive): built in
    this process, which had just run the rounds and generated the events, the same build
    measured less than from a fresh process (109.4k and 108.1k against 126.9k and 110.7k
    events/s, alternating; docs/performance.md, 2026-12-03 01:03)."""
    topic = "events"
    events = make_events(m)
    started = time.perf_counter()
    write_archive(workdir / "training-archive", topic, events)
    print(f"wrote an archive of {m} events in {time.perf_counter() - started:.1f}s", flush=True)
    first = json.loads(events[0])["timestamp"]
    last = json.loads(events[-1])["timestamp"]
    del events
    gc.collect()
    os.sync()  # the archive's pages on disk, as an archive written earlier
    here = Path(__file__).resolve().parent
    done = subprocess.run(
        [sys.executable, str(here / "training_compare.py"), str(here.parent),
         "--archive", str(workdir / "training-archive"), "--span", f"{first},{last}",
         "--labels", str(labels_n), "--settle-ms", str(settle_ms),
         "--jobs", str(jobs or parallel.default_jobs())],
        capture_output=True, text=True, check=False, env={**os.environ, "PYTHONSAFEPATH": "1"})
    found = dict(re.findall(r"(\w+)=([\d.]+)", done.stdout))
    if done.returncode != 0 or "seconds" not in found:
        raise SystemExit(f"the training set failed:\n{done.stdout}{done.stderr[-3000:]}")
    return (float(found["training_events_per_s"]), float(found["training_rows_per_s"]),
            float(found["seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--training-events", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--jobs", type=int, default=0,
                        help="training-set processes (0: the command's default, one per CPU)")
    parser.add_argument("--settle-ms", type=int, default=1000,
                        help="the training set's lag_sensitive marking (the command's default)")
    parser.add_argument("--modes", default="process",
                        help="archive deployments to compare with features alone "
                        "(process, inline, sidecar; comma-separated)")
    args = parser.parse_args()
    n = args.events
    workdir = Path(tempfile.mkdtemp(prefix="eventpulse-bench-archive-"))
    modes = ("none", *args.modes.split(","))
    rates: dict[str, list[float]] = {m: [] for m in modes}
    archive_rates: dict[str, list[float]] = {m: [] for m in modes[1:]}
    with TansuBroker() as broker, LocalRedis() as redis_server:
        topic = f"bench-{int(time.time())}"
        asyncio.run(preload(broker.bootstrap, topic, make_events(n)))
        print(f"preloaded {n} events", flush=True)
        for round_no in range(args.rounds):
            # back to back, in alternating order: a pair shares the machine's load of the moment
            for mode in modes if round_no % 2 == 0 else modes[::-1]:
                rate, archived = asyncio.run(run_worker(broker.url, broker.bootstrap,
                                                        redis_server.url, topic, n,
                                                        workdir, mode, round_no))
                rates[mode].append(rate)
                if archived is not None:
                    archive_rates[mode].append(archived)
                print(f"round {round_no}: archive {mode:<8} features {rate:,.0f} events/s"
                      + (f", archive {archived:,.0f} events/s" if archived else "")
                      + f" (load {os.getloadavg()[0]:.1f})", flush=True)
    t_events = t_rows = float("nan")
    if args.training_events:  # 0: skip the training-set part
        t_events, t_rows, seconds = training_bench(workdir, args.training_events, args.labels,
                                                   args.settle_ms, args.jobs)
        print(f"training set: {args.labels} rows x 10 features from {args.training_events} "
              f"archived events in {seconds:.1f}s", flush=True)
    drops: dict[str, float] = {}
    for mode in modes[1:] if args.rounds else ():  # --rounds 0: the training set alone
        # the drop of each round's pair, then their median: the pairs cancel the load drift
        # between rounds that medians of each mode's rates alone keep
        pairs = [1 - with_archive / alone
                 for with_archive, alone in zip(rates[mode], rates["none"], strict=True)]
        drops[mode] = statistics.median(pairs)
        print(f"archive {mode}: features {statistics.median(rates[mode]):,.0f} events/s "
              f"(alone {statistics.median(rates['none']):,.0f}); drop per round "
              f"{', '.join(f'{d:.3f}' for d in pairs)}, median {drops[mode]:.3f}; archive "
              f"{statistics.median(archive_rates[mode]):,.0f} events/s", flush=True)
    default = "process" if "process" in modes else modes[1]
    archived = statistics.median(archive_rates[default]) if args.rounds else float("nan")
    print(f"archive_events_per_s={archived:.0f} "
          f"feature_throughput_drop={drops.get(default, float('nan')):.3f} "
          f"training_events_per_s={t_events:.0f} "
          f"training_rows_per_s={t_rows:.0f}")


if __name__ == "__main__":
    main()
