"""Training sets equal what was served: the live worker runs on generated traffic, features are
read with the client at many moments and logged, then the training set for exactly those
(entity, moment) rows is rebuilt from the archive and compared value by value."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import redis.asyncio as aioredis

from eventpulse.archive.store import ArchiveStore
from eventpulse.config import parse_config
from eventpulse.local.servers import TansuBroker
from eventpulse.offline import training
from eventpulse.tables.client import AsyncFeatureClient
from eventpulse.tables.store import FeatureStore
from tests.archive_helpers import count_rows, produce_tracked
from tests.conftest import WorkerProcess, unique, wait_until

WINDOW = {"type": "hopping", "size": "1m", "step": "5s", "lateness": "20s"}
USERS = [f"u{i}" for i in range(12)]
ITEMS = [f"i{i}" for i in range(6)]
MODELS = ["m1", "m2", "m3"]


def job_config(events: str, inference: str) -> dict[str, Any]:
    def feature(name: str, topic: str, entity: str, key: str, aggregation: str,
                **more: Any) -> dict[str, Any]:
        return {"name": name, "topic": topic, "entity": entity, "key": key,
                "aggregation": aggregation, "window": WINDOW, **more}

    return {"topics": {events: "behaviour", inference: "inference"}, "partitions": 3,
            "features": [
                feature("clicks_1m", events, "user", "user_id", "count",
                        where={"action": "click"}),
                feature("watch_sum_1m", events, "user", "user_id", "sum", value="watch_seconds"),
                feature("watch_min_1m", events, "user", "user_id", "min", value="watch_seconds"),
                feature("watch_max_1m", events, "user", "user_id", "max", value="watch_seconds"),
                feature("last_device_1m", events, "user", "user_id", "last", value="device"),
                feature("watch_mean_1m", events, "item", "item_id", "mean",
                        value="watch_seconds"),
                feature("users_1m", events, "item", "item_id", "distinct", value="user_id"),
                feature("latency_p95_1m", inference, "model", "model", "p95",
                        value="latency_ms"),
                feature("error_rate_1m", inference, "model", "model", "ratio",
                        numerator={"status": {"gte": 500}}),
            ]}


def burst(rng: random.Random, events: str, inference: str, size: int, seen: set[int],
          ) -> list[tuple[str, Any]]:
    now = int(time.time() * 1000)
    out: list[tuple[str, Any]] = []
    for _ in range(size):
        # mostly fresh, some a little out of order, some later than the 20 s lateness
        ts = now - rng.choice([0, 0, 0, 1_000, 3_000, 8_000, 45_000])
        # distinct event times: two `last` candidates with the same time in two partitions are
        # ordered by how the worker's fetches interleaved them, which no archive can replay
        while ts in seen:
            ts -= 1
        seen.add(ts)
        if rng.random() < 0.7:
            out.append((events, {"timestamp": ts, "user_id": rng.choice(USERS),
                                 "item_id": rng.choice(ITEMS),
                                 "action": rng.choice(["click", "view", "watch"]),
                                 "watch_seconds": rng.randint(1, 600),  # integers: exact sums
                                 "device": rng.choice(["ios", "android", "web"])}))
        else:
            out.append((inference, {"timestamp": ts, "model": rng.choice(MODELS),
                                    "latency_ms": rng.randint(1, 400),
                                    "status": 500 if rng.random() < 0.1 else 200}))
    return out


@pytest.mark.slow
async def test_training_set_equals_the_values_served(
        kafka: TansuBroker, redis_url: str, tmp_path: Path,
        make_worker: Callable[..., WorkerProcess]) -> None:
    events, inference, group = unique("events"), unique("inference"), unique("train")
    config = job_config(events, inference)
    archive = tmp_path / "archive"
    worker = make_worker(config, group, EVENTPULSE_ARCHIVE_URL=str(archive),
                         EVENTPULSE_ARCHIVE_IDLE_FLUSH_MS="500").start()
    redis = aioredis.Redis.from_url(redis_url)
    feature_store = FeatureStore(redis, "ep", group)
    rng = random.Random(14)
    last: dict[str, int] = {}
    logged: list[tuple[str, str, int, dict[str, Any]]] = []
    produced = 0
    seen: set[int] = set()
    for _ in range(5):
        items = burst(rng, events, inference, 800, seen)
        for topic, partition, offset in await produce_tracked(kafka.bootstrap, items):
            last[f"{topic}:{partition}"] = max(offset, last.get(f"{topic}:{partition}", -1))
        produced += len(items)

        async def caught_up() -> bool:
            positions = await feature_store.positions(list(last))
            return all(p is not None and p.offset >= last[tp] for tp, p in positions.items())

        await wait_until(caught_up, timeout=60, message="the worker applying the burst")
        client = await AsyncFeatureClient.connect(redis_url)
        for _ in range(2):  # two moments per quiet period: windows move on between them
            at = int(time.time() * 1000)
            for entity, ids in (("user", USERS), ("item", ITEMS), ("model", MODELS)):
                for entity_id, values in (await client.get_many(entity, ids, at_ms=at)).items():
                    logged.append((entity, entity_id, at, values))
            await asyncio.sleep(1.2)
        await client.aclose()
    fs = pafs.LocalFileSystem()
    await wait_until(lambda: count_rows(fs, str(archive)) >= produced, timeout=60,
                     message="every record archived")
    worker.stop()

    job = parse_config(config)
    labels = training.labels_of(pa.table({
        "entity": [e for e, _, _, _ in logged], "entity_id": [i for _, i, _, _ in logged],
        "timestamp": [a for _, _, a, _ in logged], "label": list(range(len(logged)))}))
    specs = training.choose_features(job, labels, None)
    table, stats = await training.build(job, ArchiveStore.open(str(archive)), labels, specs,
                                        redis)
    await redis.aclose()
    assert stats.rows == len(logged) and stats.events == produced
    out = table.to_pylist()
    compared = 0
    for (entity, entity_id, _at, served), row in zip(logged, out, strict=True):
        assert row["entity_id"] == entity_id
        for name, value in served.items():
            assert (row[name], row[name + training.STATUS_SUFFIX]) == (value.value, value.status), (
                f"{entity} {entity_id} {name} at {_at}")
            compared += 1
        others = {s.name for s in specs if s.entity != entity}
        assert all(row[n + training.STATUS_SUFFIX] == training.NOT_APPLICABLE for n in others)
    assert compared == sum(len(v) for *_, v in logged)
    # the comparison covered every kind, with values (not only empty windows)
    present = {n for *_, v in logged for n, fv in v.items() if fv.value not in (None, 0)}
    assert present == {s.name for s in specs}
    assert sum(stats.late.values()) > 0  # the lateness rule was exercised, the same way
