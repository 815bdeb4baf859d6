"""The archive through three SIGKILLs and a 30 s store outage, against a real S3 API server
(moto) and a local directory: every valid record in exactly one row of exactly one file."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import redis.asyncio as aioredis

from eventpulse.local.servers import free_port
from eventpulse.tables.store import FeatureStore
from tests.archive_helpers import Key, RowCounter, archived_rows, produce_tracked
from tests.conftest import WorkerProcess, unique, wait_until

WAVE = 26_000  # four waves: 104k records
HOUR = 3_600_000


class Store:
    """The archive destination of one run, and how to take it away and bring it back."""

    fs: pafs.FileSystem
    root: str
    env: dict[str, str]

    def down(self) -> None:
        raise NotImplementedError

    def up(self) -> None:
        raise NotImplementedError


class MotoStore(Store):
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.port}", scheme="http",
                                    access_key="testing-key", secret_key="testing-s3cret",
                                    region="us-east-1", allow_bucket_creation=True)
        bucket = unique("archive")
        self.fs.create_dir(bucket)
        self.root = f"{bucket}/raw"
        self.env = {"EVENTPULSE_ARCHIVE_URL": f"s3://{self.root}",
                    "EVENTPULSE_ARCHIVE_S3_ENDPOINT": f"http://127.0.0.1:{self.port}",
                    "EVENTPULSE_ARCHIVE_S3_REGION": "us-east-1",
                    "EVENTPULSE_ARCHIVE_S3_ACCESS_KEY_ID": "testing-key",
                    "EVENTPULSE_ARCHIVE_S3_SECRET_ACCESS_KEY": "testing-s3cret"}

    def down(self) -> None:  # moto keeps its objects in this process: they survive the restart
        self.server.stop()

    def up(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()


class LocalStore(Store):
    def __init__(self, tmp: Path) -> None:
        self.fs = pafs.LocalFileSystem()
        self.path = tmp / "archive"
        self.aside = tmp / "archive-aside"
        self.root = str(self.path)
        self.env = {"EVENTPULSE_ARCHIVE_URL": f"file://{self.path}"}

    def down(self) -> None:  # a file where the directory was: every write fails
        self.path.mkdir(exist_ok=True)
        self.path.rename(self.aside)
        self.path.write_text("not a directory")

    def up(self) -> None:
        self.path.unlink()
        self.aside.rename(self.path)


@pytest.fixture(params=["s3", "local"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "s3":
        moto = MotoStore()
        yield moto
        moto.server.stop()
    else:
        yield LocalStore(tmp_path)


def wave(now: int, events: str, inference: str, seed: int) -> list[tuple[str, Any]]:
    """Mixed traffic over the last two hours of event time, ~1% invalid."""
    rng = random.Random(seed)
    out: list[tuple[str, Any]] = []
    for i in range(WAVE):
        ts = now - 2 * HOUR + int(i * 2 * HOUR / WAVE) + rng.randint(-5_000, 5_000)
        if rng.random() < 0.01:
            out.append((events, b"{broken" if i % 2 else json.dumps({"timestamp": ts}).encode()))
        elif i % 3:
            out.append((events, {"timestamp": ts, "user_id": f"u{rng.randint(1, 500)}",
                                 "action": rng.choice(["click", "view"]), "email": "a@b.c",
                                 "n": i}))
        else:
            out.append((inference, {"timestamp": ts, "model": rng.choice(["m1", "m2"]),
                                    "latency_ms": rng.random() * 50, "status": 200}))
    return out


@pytest.mark.slow
async def test_every_valid_record_lands_exactly_once_through_kills_and_an_outage(
        store: Store, make_worker: Callable[..., WorkerProcess], kafka: Any,
        redis_url: str) -> None:
    events, inference = unique("events"), unique("inference")
    group = unique("arch")
    config = {"topics": {events: "behaviour", inference: "inference"}, "partitions": 4,
              "privacy": {events: {"drop": ["email"]}},
              "features": [{"name": "clicks_1m", "topic": events, "entity": "user",
                            "key": "user_id", "where": {"action": "click"},
                            "aggregation": "count", "window": {"size": "1m", "lateness": "3h"}}]}
    archive_port = free_port()  # the archive process's metrics (it runs beside the worker)
    env = {**store.env, "EVENTPULSE_ARCHIVE_METRICS_PORT": str(archive_port),
           "EVENTPULSE_ARCHIVE_MAX_RECORDS": "3000",
           "EVENTPULSE_ARCHIVE_MAX_SPAN_MS": "600000", "EVENTPULSE_ARCHIVE_IDLE_FLUSH_MS": "1000"}
    now = int(time.time() * 1000)
    expected: set[Key] = set()

    async def send(seed: int) -> list[Key]:
        items = wave(now, events, inference, seed)
        keys = await produce_tracked(kafka.bootstrap, items)
        expected.update(k for k, (_, r) in zip(keys, items, strict=True)
                        if not isinstance(r, bytes))
        return keys

    rows = RowCounter(store.fs, store.root)

    async def some_landed_then_kill(worker: WorkerProcess, above: int) -> None:
        await wait_until(lambda: rows() > above, timeout=90, interval=0.1,
                         message="the archive landing rows")
        worker.kill()

    worker = make_worker(config, group, **env).start()
    await send(1)
    await some_landed_then_kill(worker, 0)  # kill 1

    worker = make_worker(config, group, **env).start()
    await send(2)
    await some_landed_then_kill(worker, rows())  # kill 2

    worker = make_worker(config, group, **env).start()
    keys = await send(3)
    await some_landed_then_kill(worker, rows())  # kill 3, with wave 3 partly archived
    store.down()
    outage_started = time.monotonic()
    worker = make_worker(config, group, **env).start()
    # the store is down: the worker stays up and the feature pipeline goes on
    last = {}
    for topic, partition, offset in keys:
        if topic == events:
            last[f"{topic}:{partition}"] = max(offset, last.get(f"{topic}:{partition}", -1))
    redis = aioredis.Redis.from_url(redis_url)
    feature_store = FeatureStore(redis, "ep", group)

    async def features_caught_up() -> bool:
        positions = await feature_store.positions(list(last))
        return all(p is not None and p.offset >= last[tp] for tp, p in positions.items())

    await wait_until(features_caught_up, timeout=25, message="features applied during the outage")
    await redis.aclose()
    await wait_until(lambda: _metric(_scrape(archive_port),
                                     "eventpulse_archive_store_retries_total") > 0,
                     timeout=25, message="the archive retrying")
    assert _metric(_scrape(archive_port), "eventpulse_archive_store_up") == 0
    await asyncio.sleep(max(0.0, 30 - (time.monotonic() - outage_started)))
    assert worker.process is not None and worker.process.poll() is None
    store.up()

    await send(4)
    await wait_until(lambda: rows() >= len(expected), timeout=180, interval=0.5,
                     message=f"{len(expected)} archived rows")
    await asyncio.sleep(2)  # anything written twice would show up now
    worker.stop()
    assert len(expected) >= 100_000
    found = archived_rows(store.fs, store.root, ["kafka_partition", "kafka_offset", "extra"])
    assert not any("email" in (r["extra"] or "") for r in found)  # privacy: dropped
    keys_found = [(r["topic"], r["kafka_partition"], r["kafka_offset"]) for r in found]
    assert len(keys_found) == len(set(keys_found)), "a record archived twice"
    assert set(keys_found) == expected
    assert "testing-s3cret" not in worker.log()


def _scrape(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


