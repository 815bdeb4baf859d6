"""What the benches share: the 10-feature workload, preloading a topic, and running the worker
process until it has applied a number of records.

Scripts in bench/ run as ``.venv/bin/python bench/<name>.py``, so this module is imported as
``common`` (bench/ is the script's directory, first on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from eventpulse.tables.store import FeatureStore

PARTITIONS = 4


def features(topic: str) -> list[dict[str, object]]:
    """Ten features of every kind over behaviour events: 3 per user, 7 per item."""
    hop = {"type": "hopping", "size": "5m", "step": "1m", "lateness": "30s"}
    hour = {"type": "hopping", "size": "1h", "step": "10m", "lateness": "30s"}

    def f(name: str, entity: str, key: str, aggregation: str, window: dict[str, str],
          **extra: object) -> dict[str, object]:
        return {"name": name, "topic": topic, "entity": entity, "key": key,
                "aggregation": aggregation, "window": window, **extra}

    return [
        f("clicks_5m", "user", "user_id", "count", hop, where={"action": "click"}),
        f("events_1h", "user", "user_id", "count", hour),
        f("last_device", "user", "user_id", "last", hop, value="device"),
        f("item_events_5m", "item", "item_id", "count", hop),
        f("watch_mean_1h", "item", "item_id", "mean", hour, value="watch"),
        f("watch_sum_5m", "item", "item_id", "sum", hop, value="watch"),
        f("watch_max_5m", "item", "item_id", "max", hop, value="watch"),
        f("distinct_users_1h", "item", "item_id", "distinct", hour, value="user_id"),
        f("watch_p95_5m", "item", "item_id", "p95", hop, value="watch"),
        f("click_rate_5m", "item", "item_id", "ratio", hop, numerator={"action": "click"}),
    ]


async def preload(bootstrap: str, topic: str, events: list[bytes]) -> None:
    """Create a ``PARTITIONS``-partition topic and produce ``events`` round robin."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50,
                                max_batch_size=1024 * 1024, enable_idempotence=False)
    await producer.start()
    for i, event in enumerate(events):
        await producer.send(topic, event, partition=i % PARTITIONS)
    await producer.flush()
    await producer.stop()


def worker_env(broker_url: str, redis_url: str, topic: str, group: str, workdir: Path,
               metrics_port: int, **settings: str) -> dict[str, str]:
    """The environment of a worker running the 10 features on ``topic`` (its job YAML is
    written to ``workdir``); ``settings``: further ``EVENTPULSE_*`` variables."""
    config = {"topics": {topic: "behaviour"}, "partitions": PARTITIONS,
              "features": features(topic), "alerts": {"rules": []}}
    config_path = workdir / "bench.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return {**os.environ, "EVENTPULSE_BROKER_URL": broker_url, "EVENTPULSE_REDIS_URL": redis_url,
            "EVENTPULSE_CONFIG_PATH": str(config_path), "EVENTPULSE_CONSUMER_GROUP": group,
            "EVENTPULSE_METRICS_PORT": str(metrics_port), "EVENTPULSE_LOG_LEVEL": "WARNING",
            **settings}


def start(command: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m eventpulse <command>`` with its output in ``log``."""
    return subprocess.Popen([sys.executable, "-m", "eventpulse", command], env=env,
                            stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
        process.wait(30)


async def applied(client: aioredis.Redis, group: str) -> int:
    """Records the worker of ``group`` has applied (from the fences in Redis)."""
    held = await FeatureStore(client, "ep", group).all_positions()
    return sum(p.offset + 1 for p in held.values() if p is not None)


async def committed_total(consumer: AIOKafkaConsumer, topic: str,
                          partitions: int = PARTITIONS) -> int:
    """Records the worker has applied: the Kafka offsets it committed, which it does only after
    the Redis write. A cheap poll (one small request per partition, nothing for Redis to do):
    reading the fences instead (:func:`applied`: 257 hashes) every 10 ms took a third of a
    core on a 2-core machine, and Redis time, from the run it measured."""
    total = 0
    for partition in range(partitions):
        offset = await consumer.committed(TopicPartition(topic, partition))
        total += offset or 0
    return total


async def redis_holds(client: aioredis.Redis, group: str, n: int, timeout: float = 10) -> None:
    """Raise unless the fences in Redis reach ``n`` records within ``timeout`` seconds: the
    check behind :func:`committed_total` (the fences of shards the last batches did not touch
    move once the worker is idle)."""
    held = 0
    for _ in range(int(timeout * 10)):
        held = await applied(client, group)
        if held == n:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"Kafka has all {n} records committed but Redis holds {held}")


def commit_watcher(bootstrap: str, group: str) -> AIOKafkaConsumer:
    """A member of ``group`` that never joins (start it): it only asks the coordinator what
    the worker committed."""
    return AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                            enable_auto_commit=False)


async def redis_cpu_seconds(client: aioredis.Redis) -> float:
    """CPU time Redis has used (``INFO cpu``, user + sys): read it around what is measured."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class Rate:
    """Records per second from the first poll that saw progress to the first that saw ``n``
    (so process start-up and the group join do not count, nor the first batch)."""

    def __init__(self, n: int, clock: Callable[[], float]) -> None:
        self.n = n
        self.clock = clock
        self.first: tuple[float, int] | None = None
        self.done: float | None = None

    def see(self, count: int) -> bool:
        """Record a poll; True once ``n`` records are in."""
        now = self.clock()
        if count and self.first is None:
            self.first = (now, count)
        if count >= self.n and self.done is None:
            self.done = now
        return self.done is not None

    @property
    def per_s(self) -> float:
        assert self.first is not None and self.done is not None
        elapsed = self.done - self.first[0]
        return (self.n - self.first[1]) / elapsed if elapsed > 0 else float("inf")
