"""Per-event cost of the worker's ingest step, in-process: no broker, no Redis.

    .venv/bin/python bench/ingest_cost.py [--events 50000] [--rounds 5] [--profile]
                                          [--against /path/to/other/checkout]

Decodes, combines and plans one batch of ``bench/throughput.py``'s zipf events against its 10
features, the way ``Pipeline`` does per batch, and prints microseconds of CPU time per event for
each step (process time, the best of ``--rounds`` rounds: the least disturbed by the other
processes of a shared machine). ``--against`` also loads ``streams/decode.py`` and
``tables/batch.py`` of another checkout (e.g. ``git worktree add /tmp/base <commit>``) into the
same process and alternates rounds of the two, so a before/after is measured in one run, on the
same events (both use this checkout's compiled fold: when ``tables/fold.py`` or the combiner's
layout differ, alternate whole trees instead, ``PYTHONPATH=<tree> python bench/ingest_cost.py``
from outside the checkout). ``--profile`` prints the cProfile of one round instead. The
end-to-end figure lives in ``bench/throughput.py``; this one isolates the per-event Python that
bounds it.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import pstats
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import features
from throughput import make_events

import eventpulse.streams.decode as this_decode
import eventpulse.tables.batch as this_batch
from eventpulse import gctune
from eventpulse.streams.schemas import BehaviourEvent
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.batch import PartitionPosition
from eventpulse.tables.spec import CompiledFeature, FeatureSpec, entity_key_reader

TOPIC = "events"


def load(path: Path, name: str) -> ModuleType:
    """A module of another checkout, beside this one's (its own imports resolve to this
    checkout's eventpulse: only the loaded file itself differs)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def one_round(decode_module: Any, batch_module: Any, compiled: list[CompiledFeature],
              events: list[bytes]) -> tuple[float, float, float]:
    """CPU seconds spent decoding, combining and planning ``events`` as one batch."""
    decoder = decode_module.RecordDecoder(RecordKind.BEHAVIOUR,
                                          keys=entity_key_reader(compiled, TOPIC))
    now = int(time.time() * 1000)
    tp = f"{TOPIC}:0"
    t0 = time.process_time()
    decode = decoder.decode
    records: list[Any] = [decode(raw, now) for raw in events]
    t1 = time.process_time()
    combiner = batch_module.BatchCombiner("bench", compiled, {tp: PartitionPosition()})
    add = combiner.add
    for offset, record in enumerate(records):
        if record.__class__ is not BehaviourEvent:
            raise SystemExit(f"event {offset} refused: {record}")
        add(tp, TOPIC, offset, record)
    t2 = time.process_time()
    combiner.plan()
    t3 = time.process_time()
    return t1 - t0, t2 - t1, t3 - t2


def line(label: str, best: list[float], n: int) -> str:
    decode_us, combine_us, plan_us = (1e6 * t / n for t in best)
    return (f"{label}decode_us_per_event={decode_us:.2f} combine_us_per_event={combine_us:.2f} "
            f"plan_us_per_event={plan_us:.2f} "
            f"total_us_per_event={decode_us + combine_us + plan_us:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    args = parser.parse_args()
    specs = [FeatureSpec.model_validate(f) for f in features(TOPIC)]
    compiled = [CompiledFeature(spec, i) for i, spec in enumerate(specs)]
    events = make_events(args.events)
    gctune.tune_for_good()  # as the worker does: the collector's cost is part of the per-event cost
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(one_round, this_decode, this_batch, compiled, events)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    versions = {"": (this_decode, this_batch)}
    if args.against:
        versions = {"this: ": (this_decode, this_batch), "other: ": (
            load(args.against / "eventpulse/streams/decode.py", "other_decode"),
            load(args.against / "eventpulse/tables/batch.py", "other_batch"))}
    best = {label: [float("inf")] * 3 for label in versions}
    for _ in range(args.rounds):
        for label, (decode_module, batch_module) in versions.items():
            times = one_round(decode_module, batch_module, compiled, events)
            best[label] = [min(b, t) for b, t in zip(best[label], times, strict=True)]
    for label in versions:
        print(line(label, best[label], args.events))
    if args.against:
        this, other = sum(best["this: "]), sum(best["other: "])
        print(f"ingest_speedup_vs_other={other / this:.2f}")


if __name__ == "__main__":
    main()
