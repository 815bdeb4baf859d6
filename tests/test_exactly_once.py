"""Exactly right, whatever happens: 200k events, five SIGKILLs, two workers rebalancing, Redis gone
for ten seconds; every feature in Redis must equal the offline oracle."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from redis.exceptions import RedisError

from eventpulse.config import parse_config
from eventpulse.local.servers import LocalRedis, TansuBroker
from eventpulse.tables.client import AsyncFeatureClient
from eventpulse.tables.store import FeatureStore
from tests.conftest import WorkerProcess, unique, wait_until
from tests.oracle import Oracle, close_enough

PARTITIONS = 4
TOTAL = 200_000
CHUNKS = 5


def job(topic: str) -> dict[str, Any]:
    def f(name: str, entity: str, key: str, aggregation: str, window: dict[str, str],
          **extra: Any) -> dict[str, Any]:
        return {"name": name, "topic": topic, "entity": entity, "key": key,
                "aggregation": aggregation, "window": window, **extra}
    hop = {"type": "hopping", "size": "2m", "step": "30s", "lateness": "10s"}
    tumble = {"size": "1m", "lateness": "10s"}
    return {
        "topics": {topic: "behaviour"}, "partitions": PARTITIONS,
        "features": [
            f("events_2m", "user", "user_id", "count", hop),
            f("clicks_1m", "user", "user_id", "count", tumble, where={"action": "click"}),
            f("last_device", "user", "user_id", "last", tumble, value="device"),
            f("watch_sum", "item", "item_id", "sum", tumble, value="watch"),
            f("watch_mean_2m", "item", "item_id", "mean", hop, value="watch"),
            f("watch_max", "item", "item_id", "max", tumble, value="watch"),
            f("users", "item", "item_id", "distinct", tumble, value="user_id"),
            f("watch_p95", "item", "item_id", "p95", tumble, value="watch"),
            f("click_rate", "item", "item_id", "ratio", tumble,
              numerator={"action": "click"}),
        ],
        "alerts": {"rules": []},
    }


def generate(seed: int = 11, partitions: int = PARTITIONS) -> list[list[dict[str, Any]]]:
    """Per partition, in offset order: out of order within lateness, about 2% far too late."""
    rng = random.Random(seed)
    base = int(time.time() * 1000) - 40 * 60_000
    per_partition: list[list[dict[str, Any]]] = [[] for _ in range(partitions)]
    for i in range(TOTAL):
        user = f"u{rng.randint(1, 5000)}"
        ts = base + i * 9 + rng.randint(0, 8)
        roll = rng.random()
        if roll < 0.15:
            ts -= rng.randint(0, 9_000)
        elif roll < 0.17:
            ts -= rng.randint(30_000, 120_000)
        record: dict[str, Any] = {"timestamp": ts, "user_id": user,
                                  "item_id": f"i{rng.randint(1, 300)}",
                                  "action": rng.choice(["click", "view", "view", "watch"]),
                                  "device": rng.choice(["ios", "android", "web"])}
        if record["action"] == "watch":
            record["watch"] = round(rng.lognormvariate(4, 1), 2)
        per_partition[hash(user) % partitions].append(record)
    return per_partition


async def produce_chunk(bootstrap: str, topic: str, per_partition: list[list[dict[str, Any]]],
                        chunk: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                enable_idempotence=False, max_batch_size=512 * 1024)
    await producer.start()
    try:
        for partition, records in enumerate(per_partition):
            size = len(records) // CHUNKS + 1
            for record in records[chunk * size:(chunk + 1) * size]:
                await producer.send(topic, json.dumps(record).encode(), partition=partition)
        await producer.flush()
    finally:
        await producer.stop()


async def applied(client: aioredis.Redis, group: str) -> int:
    """Records applied so far, per Redis (waiting while it starts up)."""
    for _ in range(100):
        try:
            held = await FeatureStore(client, "ep", group).all_positions()
            return sum(p.offset + 1 for p in held.values() if p is not None)
        except (RedisError, OSError):
            await asyncio.sleep(0.2)
    raise AssertionError("redis did not come back")


@pytest.mark.slow
async def test_features_equal_the_oracle_after_kills_rebalances_and_a_redis_outage(
        kafka: TansuBroker, tmp_path: Path, make_worker: Callable[..., WorkerProcess]) -> None:
    topic, group = unique("ev"), unique("exact")
    config = job(topic)
    per_partition = generate()
    with LocalRedis(persistent=True) as redis_server:
        client = aioredis.Redis.from_url(redis_server.url)

        def worker() -> WorkerProcess:
            return make_worker(config, group, EVENTPULSE_REDIS_URL=redis_server.url,
                               EVENTPULSE_BATCH_MAX_RECORDS="5000")

        async def progress(beyond: int) -> int:
            return await wait_until(lambda: _above(client, group, beyond), timeout=120,
                                    message=f"applied offsets beyond {beyond}")

        rng = random.Random(5)
        kills = 0
        await produce_chunk(kafka.bootstrap, topic, per_partition, 0)
        a = worker().start()
        for chunk in (1, 2):
            for _ in range(2 if chunk == 1 else 1):
                await progress(await applied(client, group) + 2000)
                await asyncio.sleep(rng.uniform(0, 0.5))
                a.kill()
                kills += 1
                a = worker().start()
            await produce_chunk(kafka.bootstrap, topic, per_partition, chunk)
        # two workers: partitions move to b, then back when a dies and is replaced
        b = worker().start()
        await progress(await applied(client, group) + 2000)
        a.kill()
        kills += 1
        await produce_chunk(kafka.bootstrap, topic, per_partition, 3)
        await progress(await applied(client, group) + 2000)
        a = worker().start()
        # Redis goes away for ten seconds mid-stream, with data in flight
        await produce_chunk(kafka.bootstrap, topic, per_partition, 4)
        await progress(await applied(client, group) + 1000)
        redis_server.stop()
        await asyncio.sleep(10)
        redis_server.start()
        await client.aclose()
        client = aioredis.Redis.from_url(redis_server.url)
        await progress(await applied(client, group) + 1000)
        b.kill()
        kills += 1
        b = worker().start()
        total = sum(len(records) for records in per_partition)
        await wait_until(lambda: _above(client, group, total - 1), timeout=180,
                         message="every record applied")
        assert kills >= 5
        assert a.process is not None and a.process.poll() is None, "worker a crashed"
        assert b.process is not None and b.process.poll() is None, "worker b crashed"
        assert "Redis" not in "".join(line for line in a.log().splitlines()
                                      if "Traceback" in line)

        job_config = parse_config(config)
        oracle = Oracle(job_config.features)
        oracle.feed(topic, ((p, o, r) for p, records in enumerate(per_partition)
                            for o, r in enumerate(records)))
        assert oracle.late > 1000
        reader = AsyncFeatureClient(client, job_config.features, "ep")
        mismatches: dict[str, int] = defaultdict(int)
        examples: list[Any] = []  # (feature, entity, window end, expected, read)
        checked = 0
        for spec in job_config.features:
            entities = sorted(oracle.entities(spec))
            for entity in entities[:400]:
                for end in oracle.live_windows(spec, entity):
                    got = (await reader.get(spec.entity, entity, [spec.name], at_ms=end))[spec.name]
                    checked += 1
                    if not close_enough(spec, oracle.value(spec, entity, end), got.value):
                        mismatches[spec.name] += 1
                        examples.append((spec.name, entity, end,
                                         oracle.value(spec, entity, end), got))
        await client.aclose()
        assert checked > 5000
        assert not mismatches, (dict(mismatches), examples[:6])


async def _above(client: aioredis.Redis, group: str, beyond: int) -> int | None:
    value = await applied(client, group)
    return value if value > beyond else None
