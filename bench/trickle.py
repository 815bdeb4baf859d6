"""Redis CPU a worker costs under a trickle of events, per fence shard count.

    .venv/bin/python bench/trickle.py [--rate 200] [--seconds 20] [SHARDS ...]   (default: 64 256)

For each shard count: a worker with the throughput bench's 10 features (own namespace and
consumer group) on a 4-partition topic, fed ``--rate`` events/s one by one for ``--seconds``;
prints the share of one core Redis spent meanwhile (``INFO cpu``). A trickle makes many tiny
batches, so what a batch costs whatever its size (the fence scripts) shows here and nowhere
else: docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from aiokafka import AIOKafkaProducer
from common import preload, redis_cpu_seconds, start, stop, worker_env
from throughput import make_events

from eventpulse.local.servers import LocalRedis, TansuBroker
from eventpulse.redisconn import connect_async


async def main_async(args: argparse.Namespace) -> None:
    with TansuBroker() as broker, LocalRedis() as redis_server:
        client = connect_async(redis_server.url)
        try:
            for k, shards in enumerate(args.shards):
                topic = f"trickle{k}"
                await preload(broker.bootstrap, topic, make_events(10))  # creates the topic
                workdir = Path(tempfile.mkdtemp(prefix="eventpulse-trickle-"))
                env = worker_env(broker.url, redis_server.url, topic, f"trickle{k}", workdir,
                                 9500 + k, EVENTPULSE_REDIS_SHARDS=str(shards),
                                 EVENTPULSE_REDIS_NAMESPACE=f"trickle{k}")
                worker = start("worker", env, workdir / "worker.log")
                try:
                    await asyncio.sleep(12)  # start-up and group join
                    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
                    await producer.start()
                    events = make_events(args.rate * args.seconds)
                    before, started = await redis_cpu_seconds(client), time.monotonic()
                    for i, event in enumerate(events):
                        await producer.send(topic, event, partition=i % 4)
                        await asyncio.sleep(max(0.0, started + (i + 1) / args.rate
                                                - time.monotonic()))
                    await producer.flush()
                    await asyncio.sleep(1)
                    spent, elapsed = await redis_cpu_seconds(client) - before, time.monotonic() - started
                    await producer.stop()
                finally:
                    stop([worker])
                print(f"shards={shards} rate={args.rate}/s: Redis CPU {100 * spent / elapsed:.1f}% "
                      f"of a core over {elapsed:.0f} s")
        finally:
            await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=200, help="events per second")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("shards", nargs="*", type=int, default=[64, 256])
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
