"""Redis CPU per event of the write script (``apply.lua``), measured on one local Redis.

    .venv/bin/python bench/apply_cost.py [--events 50000] [--batches 3] [--rounds 3]
                                         [--against /path/to/other/checkout]

Combines ``bench/throughput.py``'s zipf events against its 10 features in batches and applies
each batch's plan with ``FeatureStore.apply`` to a local redis-server, reading the server's CPU
time (``INFO cpu``, user + sys) around every apply: microseconds of Redis CPU per event, the
best of ``--rounds``. CPU time, not wall time, so other processes on the machine matter less.
``--against`` also runs the ``apply.lua`` of another checkout (with this checkout's prologue
of kinds constants where that script expects one) on the same plans, alternating rounds, in
other namespaces of the same Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import features, redis_cpu_seconds
from ingest_cost import TOPIC
from throughput import make_events

from eventpulse.local.servers import LocalRedis
from eventpulse.redisconn import connect_async
from eventpulse.streams.decode import RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables import kinds, store
from eventpulse.tables.batch import BatchCombiner
from eventpulse.tables.spec import CompiledFeature, FeatureSpec, entity_key_reader


async def run(script: str, namespace: str, client: object, compiled: list[CompiledFeature],
              batches: list[list[object]], n: int) -> float:
    """Redis CPU seconds for applying every batch, each combined against the fences Redis
    holds after the one before."""
    feature_store = store.FeatureStore(client, namespace, "bench")  # type: ignore[arg-type]
    feature_store._apply = client.register_script(script)  # type: ignore[attr-defined]
    await feature_store.prepare_layout()
    tp = f"{TOPIC}:0"
    spent = 0.0
    offset = 0
    for records in batches:
        fences = await feature_store.fences([tp])
        combiner = BatchCombiner(namespace, compiled, fences, shards=feature_store.shards)
        for record in records:
            combiner.add(tp, TOPIC, offset, record)
            offset += 1
        plan = combiner.plan()
        before = await redis_cpu_seconds(client)
        conflict = await feature_store.apply(plan)
        spent += await redis_cpu_seconds(client) - before
        if conflict is not None:
            raise SystemExit(f"unexpected conflict {conflict}")
    return spent


async def main_async(args: argparse.Namespace) -> None:
    specs = [FeatureSpec.model_validate(f) for f in features(TOPIC)]
    compiled = [CompiledFeature(spec, i) for i, spec in enumerate(specs)]
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, keys=entity_key_reader(compiled, TOPIC))
    now = int(time.time() * 1000)
    events = [decoder.decode(raw, now) for raw in make_events(args.events * args.batches)]
    batches = [events[k * args.events:(k + 1) * args.events] for k in range(args.batches)]
    scripts = {"": store.APPLY_LUA}
    if args.against:
        other = (args.against / "eventpulse/tables/lua/apply.lua").read_text()
        if "HEADER, HEADER_LEN =" not in other:  # it expects the kinds prologue
            other = kinds.with_lua_prologue(other)
        scripts = {"this: ": store.APPLY_LUA, "other: ": other}
    n = args.events * args.batches
    with LocalRedis() as redis_server:
        client = connect_async(redis_server.url)
        try:
            best = {label: float("inf") for label in scripts}
            for round_ in range(args.rounds):
                for label, script in scripts.items():
                    spent = await run(script, f"b{round_}{len(label)}", client, compiled,
                                      batches, n)
                    best[label] = min(best[label], spent)
            for label in scripts:
                print(f"{label}redis_cpu_us_per_event={1e6 * best[label] / n:.2f}")
            if args.against:
                print(f"apply_speedup_vs_other={best['other: '] / best['this: ']:.2f}")
        finally:
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="events per batch")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
