"""Percentile reads: 100 items' p95 (5 one-minute buckets of DDSketch bins each) in one call.

    .venv/bin/python bench/sketch_read.py [--calls 300] [--events 50000]

Fills a local redis-server through the real write path (``BatchCombiner`` and ``apply.lua``)
with ``--events`` behaviour events over 100 items in the last 4 minutes (about 230 bins per
item and bucket: watch times spread over 1-100 at 1% accuracy), then reads the items with
``FeatureClient`` as a recommender would, alternating the RESP version (``protocol=2``, what
``FeatureClient.connect`` asks for, and redis-py's default 3), and prints p50/p99 per feature
set. Only the public client API is used, so another checkout's code can be measured with this
same script (``PYTHONPATH=<tree>``, run from outside the checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import features

from eventpulse.config import parse_config
from eventpulse.local.servers import LocalRedis
from eventpulse.redisconn import connect_async
from eventpulse.streams.decode import DecodeLimits, RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.batch import BatchCombiner
from eventpulse.tables.client import FeatureClient
from eventpulse.tables.spec import CompiledFeature
from eventpulse.tables.store import FeatureStore

ITEMS = 100
READS = {"p95": ["watch_p95_5m"], "rings": ["item_events_5m", "watch_sum_5m"],
         "all": None}


async def fill(url: str, now: int, n: int) -> None:
    config = parse_config({"topics": {"events": "behaviour"}, "features": features("events")})
    compiled = [CompiledFeature(s, i) for i, s in enumerate(config.features)]
    client = connect_async(url)
    store = FeatureStore(client, "ep", "bench")
    await store.publish(config.features)
    combiner = BatchCombiner("ep", compiled, shards=store.shards)
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False))
    rng = random.Random(1)
    combiner.reset(await store.positions(["events:0"]))
    for offset in range(n):
        record = {"timestamp": now - 240_000 + offset * 240_000 // n,
                  "user_id": f"u{rng.randrange(1000)}", "item_id": f"i{offset % ITEMS}",
                  "action": rng.choice(["click", "view", "swipe"]), "watch": rng.uniform(1, 100)}
        combiner.add("events:0", "events", offset, decoder.decode(json.dumps(record).encode()))
    assert await store.apply(combiner.plan()) is None
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--protocols", default="2,3",
                        help="RESP versions to read with (checkouts before 2026-12-01 evening "
                             "fail percentile reads in RESP2: give 3)")
    args = parser.parse_args()
    now = int(time.time() * 1000)
    ids = [f"i{i}" for i in range(ITEMS)]
    timings: dict[tuple[int, str], list[float]] = {}
    with LocalRedis() as server:
        asyncio.run(fill(server.url, now, args.events))
        clients = {protocol: FeatureClient.connect(server.url, protocol=protocol)
                   for protocol in map(int, args.protocols.split(","))}
        value = next(iter(clients.values())).get_many("item", ids, READS["p95"], now)["i1"]["watch_p95_5m"]
        assert value.value is not None, value
        for _ in range(args.calls):
            for protocol, client in clients.items():
                for label, names in READS.items():
                    started = time.perf_counter()
                    client.get_many("item", ids, names, now)
                    timings.setdefault((protocol, label), []).append(
                        (time.perf_counter() - started) * 1000)
    summary = {}
    for (protocol, label), samples in timings.items():
        samples.sort()
        p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99)]
        summary[(protocol, label)] = p50, p99
        print(f"RESP{protocol} {label:5s} ({ITEMS} items): p50 {p50:.2f} ms, p99 {p99:.2f} ms",
              flush=True)
    p50, p99 = summary[(next(iter(clients)), "p95")]
    print(f"sketch_read_p50_ms={p50:.2f} sketch_read_p99_ms={p99:.2f}")


if __name__ == "__main__":
    main()
