"""Redis CPU per event and script lengths for a shard count and a slice size, on zipf batches.

    .venv/bin/python bench/slice_cost.py [--events 50000] [--batches 4] SHARDS,MAX_COST ...

e.g. ``64,inf 64,250 256,250``. Combines ``bench/throughput.py``'s zipf events against its 10
features into batches cut for ``SHARDS`` fence shards and slices of at most ``MAX_COST`` units
(``inf``: one slice per shard), applies each with ``FeatureStore.apply`` to one local
redis-server (each configuration in its own namespace, in the order given: later ones find a
fuller Redis, so give the interesting ones twice, in both orders), and prints per configuration
the Redis CPU per event (``INFO cpu`` around each apply), the number of scripts and, from
``SLOWLOG`` (every call logged), how many ran over 2 ms, the longest and the mean. About 250
units is what a 5 ms budget allows on this machine (half the budget at ~0.01 ms per unit).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import features, redis_cpu_seconds
from ingest_cost import TOPIC
from throughput import make_events

from eventpulse.local.servers import LocalRedis
from eventpulse.redisconn import connect_async
from eventpulse.streams.decode import RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.batch import BatchCombiner
from eventpulse.tables.spec import CompiledFeature, FeatureSpec, entity_key_reader
from eventpulse.tables.store import FeatureStore


async def run(client: Any, namespace: str, compiled: list[CompiledFeature],
              batches: list[list[Any]], shards: int, max_cost: float) -> tuple[float, int, list[int]]:
    """Redis CPU seconds, scripts sent, and every script's run time (us) from SLOWLOG."""
    store = FeatureStore(client, namespace, "bench", shards)
    await store.prepare_layout()
    await client.config_set("slowlog-log-slower-than", 0)
    await client.config_set("slowlog-max-len", 1_000_000)
    await client.slowlog_reset()
    tp, offset, spent, scripts = f"{TOPIC}:0", 0, 0.0, 0
    for records in batches:
        combiner = BatchCombiner(namespace, compiled, await store.fences([tp]), shards=shards,
                                 max_cost=max_cost)
        for record in records:
            combiner.add(tp, TOPIC, offset, record)
            offset += 1
        plan = combiner.plan()
        scripts += len(plan.all_slices)
        before = await redis_cpu_seconds(client)
        if await store.apply(plan) is not None:
            raise SystemExit("unexpected fence conflict")
        spent += await redis_cpu_seconds(client) - before
    log = await client.slowlog_get(1_000_000)
    durations = [e["duration"] for e in log if b"EVALSHA" in _command(e["command"])]
    return spent, scripts, durations


def _command(command: bytes | str) -> bytes:
    return command if isinstance(command, bytes) else command.encode()


async def main_async(args: argparse.Namespace) -> None:
    specs = [FeatureSpec.model_validate(f) for f in features(TOPIC)]
    compiled = [CompiledFeature(spec, i) for i, spec in enumerate(specs)]
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, keys=entity_key_reader(compiled, TOPIC))
    now = int(time.time() * 1000)
    events = [decoder.decode(raw, now) for raw in make_events(args.events * args.batches)]
    batches = [events[k * args.events:(k + 1) * args.events] for k in range(args.batches)]
    n = args.events * args.batches
    with LocalRedis() as server:
        client = connect_async(server.url)
        try:
            for k, config in enumerate(args.configs):
                shards_text, _, cost_text = config.partition(",")
                shards, max_cost = int(shards_text), float(cost_text or "inf")
                spent, scripts, durations = await run(client, f"c{k}", compiled, batches,
                                                      shards, max_cost)
                longest = max(durations, default=0) / 1000
                mean = sum(durations) / max(1, len(durations)) / 1000
                print(f"shards={shards} max_cost={max_cost:g}: "
                      f"redis_cpu_us_per_event={1e6 * spent / n:.2f} scripts={scripts} "
                      f"over_2ms={sum(d > 2000 for d in durations)} longest_ms={longest:.1f} "
                      f"mean_ms={mean:.2f}")
        finally:
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="events per batch")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("configs", nargs="+", help="SHARDS,MAX_COST (MAX_COST inf: unbounded)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
