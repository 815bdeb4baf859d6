"""The archive and training sets: throughput, and what the archive costs the feature pipeline.

    .venv/bin/python bench/archive.py [--events 200000] [--rounds 2] \
        [--training-events 1000000] [--labels 100000]

1. Preloads N behaviour events (bench/throughput.py's data and 10 features) into a 4-partition
   topic, then runs the worker in turn without the archive, with it (the default: a child
   process of the worker), with it inline (in the worker's event loop) and as a separately
   started ``eventpulse archive``, each time in fresh consumer groups,
   and measures the feature pipeline's events/s (from Redis' applied offsets) and the archive's
   (from its committed offsets), first record to last. D = 1 - (features with the archive, as
   deployed by default) / (features alone), medians over the rounds; the other modes' figures
   are printed beside it.
2. Writes an archive of M events with the archive's own writer, and builds a training set of L
   label rows (timestamps spread over the archive, whole seconds) with the 10 features;
   prints archived events/s and label rows/s of the whole build.

Last line: ``archive_events_per_s=A feature_throughput_drop=D training_events_per_s=T
training_rows_per_s=L``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import redis.asyncio as aioredis
import yaml
from throughput import PARTITIONS, features, make_events, preload

from eventpulse.archive.layout import KindLayout
from eventpulse.archive.segment import CutRules, PartitionSegmenter
from eventpulse.archive.store import ArchiveStore
from eventpulse.archive.writer import encode
from eventpulse.config import parse_config
from eventpulse.local.servers import LocalRedis, TansuBroker, free_port, wait_for_port
from eventpulse.offline import training
from eventpulse.streams.decode import RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.store import FeatureStore


def archive_committed(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("eventpulse_archive_committed_offset{"))


async def run_worker(broker_url: str, redis_url: str, topic: str, n: int, workdir: Path,
                     mode: str, round_no: int) -> tuple[float, float | None]:
    """Feature events/s and (with the archive) archive events/s, first record to last.
    ``mode``: ``none`` (features only), ``process`` (the default: the worker runs the archive as
    its child process), ``inline`` (the archive in the worker's event loop), ``sidecar`` (the
    archive as a separately started ``eventpulse archive``)."""
    group = f"bench-{topic}-{round_no}-{mode}"
    config = {"topics": {topic: "behaviour"}, "partitions": PARTITIONS,
              "features": features(topic), "alerts": {"rules": []}}
    config_path = workdir / "bench.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "EVENTPULSE_BROKER_URL": broker_url, "EVENTPULSE_REDIS_URL": redis_url,
           "EVENTPULSE_CONFIG_PATH": str(config_path), "EVENTPULSE_CONSUMER_GROUP": group,
           "EVENTPULSE_METRICS_PORT": str(port), "EVENTPULSE_SESSION_TIMEOUT_MS": "6000",
           "EVENTPULSE_LOG_LEVEL": "WARNING"}
    archive_env = {"EVENTPULSE_ARCHIVE_URL": str(workdir / f"archive-{group}"),
                   "EVENTPULSE_ARCHIVE_IDLE_FLUSH_MS": "1000"}
    if mode in ("process", "inline"):
        env.update(archive_env, EVENTPULSE_ARCHIVE_MODE=mode,
                   EVENTPULSE_ARCHIVE_METRICS_PORT=str(free_port()))
    processes = [subprocess.Popen([sys.executable, "-m", "eventpulse", "worker"], env=env,
                                  stdout=open(workdir / f"worker-{group}.log", "wb"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT)]
    archive_port = int(env.get("EVENTPULSE_ARCHIVE_METRICS_PORT", port)) if mode == "process" \
        else port
    if mode == "sidecar":
        archive_port = free_port()
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "eventpulse", "archive"],
            env={**env, **archive_env, "EVENTPULSE_METRICS_PORT": str(archive_port)},
            stdout=open(workdir / f"archive-{group}.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT))
    client = aioredis.Redis.from_url(redis_url)
    archive = mode != "none"
    try:
        wait_for_port(port, timeout=60, process=processes[0])
        if archive_port != port:
            wait_for_port(archive_port, timeout=60)
        f_first = a_first = f_done = a_done = None
        f_base = a_base = 0
        while f_done is None or (archive and a_done is None):
            held = await FeatureStore(client, "ep", group).all_positions()
            applied = sum(p.offset + 1 for p in held.values() if p is not None)
            now = time.perf_counter()
            if applied and f_first is None:
                f_first, f_base = now, applied
            if applied >= n and f_done is None:
                f_done = now
            if archive:
                landed = archive_committed(archive_port)
                if landed and a_first is None:
                    a_first, a_base = now, landed
                if landed >= n and a_done is None:
                    a_done = now
            if any(p.poll() is not None for p in processes):
                raise RuntimeError(f"a process exited; see {workdir}")
            await asyncio.sleep(0.01)
        assert f_first is not None and f_done is not None
        feature_rate = (n - f_base) / (f_done - f_first)
        archive_rate = None
        if archive:
            assert a_first is not None and a_done is not None
            archive_rate = (n - a_base) / (a_done - a_first)
        return feature_rate, archive_rate
    finally:
        for process in processes:
            process.terminate()
            process.wait(30)
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


async def training_bench(redis_url: str, workdir: Path, m: int, labels_n: int,
                         ) -> tuple[float, float, float]:
    topic = "events"
    events = make_events(m)
    started = time.perf_counter()
    write_archive(workdir / "training-archive", topic, events)
    print(f"wrote an archive of {m} events in {time.perf_counter() - started:.1f}s", flush=True)
    job = parse_config({"topics": {topic: "behaviour"}, "features": features(topic)})
    first = json.loads(events[0])["timestamp"]
    last = json.loads(events[-1])["timestamp"]
    rng = random.Random(5)
    times = [(rng.randint(first, last + 5) // 1000) * 1000 for _ in range(labels_n)]
    entities = [rng.choice(["user", "item"]) for _ in range(labels_n)]
    ids = [f"u{rng.randint(1, 20_000)}" if e == "user" else f"i{rng.randint(1, 2_000)}"
           for e in entities]
    labels = training.labels_of(pa.table({"entity": entities, "entity_id": ids,
                                          "timestamp": times}))
    specs = training.choose_features(job, labels, None)
    client = aioredis.Redis.from_url(redis_url)
    try:
        _, stats = await training.build(job, ArchiveStore.open(str(workdir / "training-archive")),
                                        labels, specs, client)
    finally:
        await client.aclose()
    return stats.events / stats.seconds, stats.rows / stats.seconds, stats.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--training-events", type=int, default=1_000_000)
    parser.add_argument("--labels", type=int, default=100_000)
    parser.add_argument("--modes", default="process,inline,sidecar",
                        help="archive deployments to compare with features alone")
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
            for mode in modes:
                rate, archived = asyncio.run(run_worker(broker.url, redis_server.url, topic, n,
                                                        workdir, mode, round_no))
                rates[mode].append(rate)
                if archived is not None:
                    archive_rates[mode].append(archived)
                print(f"round {round_no}: archive {mode:<8} features {rate:,.0f} events/s"
                      + (f", archive {archived:,.0f} events/s" if archived else ""), flush=True)
    t_events = t_rows = float("nan")
    if args.training_events:  # 0: skip the training-set part
        with LocalRedis() as redis_server:
            t_events, t_rows, seconds = asyncio.run(training_bench(
                redis_server.url, workdir, args.training_events, args.labels))
        print(f"training set: {args.labels} rows x 10 features from {args.training_events} "
              f"archived events in {seconds:.1f}s", flush=True)
    base = statistics.median(rates["none"])
    for mode in modes[1:]:
        print(f"archive {mode}: features {statistics.median(rates[mode]):,.0f} events/s "
              f"(drop {1 - statistics.median(rates[mode]) / base:.3f}), archive "
              f"{statistics.median(archive_rates[mode]):,.0f} events/s", flush=True)
    default = "process" if "process" in modes else modes[1]
    drop = 1 - statistics.median(rates[default]) / base
    print(f"archive_events_per_s={statistics.median(archive_rates[default]):.0f} "
          f"feature_throughput_drop={drop:.3f} training_events_per_s={t_events:.0f} "
          f"training_rows_per_s={t_rows:.0f}")

if __name__ == "__main__":
    main()
