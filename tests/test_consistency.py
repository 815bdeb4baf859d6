"""The consistency report: reads served by FeatureClient are logged (sampled) to Kafka, archived
like any topic, and recomputed from the archive. Reads made while the worker was caught up are
100% exact for every feature kind; reads made before the worker applied the newest records
differ, and every such difference is attributed (not_yet_applied), none unexplained."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
import redis.asyncio as aioredis

from eventpulse.archive.store import ArchiveStore
from eventpulse.local.servers import TansuBroker
from eventpulse.offline.consistency import served_reads
from eventpulse.offline.readlog import ServedReadLog, sampled
from eventpulse.tables.client import AsyncFeatureClient, registry_key
from eventpulse.tables.store import FeatureStore
from tests.archive_helpers import count_rows, produce_tracked
from tests.conftest import WorkerProcess, unique, wait_until
from tests.test_training_set import ITEMS, MODELS, USERS, burst, job_config


def test_sampling_is_by_entity_and_about_the_share() -> None:
    ids = [f"user-{i}" for i in range(20_000)]
    share = sum(sampled(i, 0.1) for i in ids) / len(ids)
    assert 0.09 < share < 0.11
    assert all(sampled(i, 1.0) for i in ids[:100]) and not any(sampled(i, 0.0) for i in ids)
    with pytest.raises(ValueError, match="share"):
        ServedReadLog("127.0.0.1:1", share=1.5)


@pytest.mark.slow
def test_the_read_log_never_raises_on_a_value_json_cannot_hold() -> None:
    """A model server's read must not fail because of the hook (an outside test: bytes a
    foreign writer left in an entry raised TypeError through it); NaN is not logged at all,
    as JSON cannot hold it."""
    from eventpulse.tables.client import FeatureValue

    class Sender:
        def __init__(self) -> None:
            self.sent: list[bytes] = []

        def submit(self, value: bytes, key: bytes) -> None:
            self.sent.append(value)

    sender = Sender()
    log = ServedReadLog("127.0.0.1:1", share=1.0, sender=sender)  # type: ignore[arg-type]

    def value(v: Any) -> FeatureValue:
        return FeatureValue(v, 0, 1, 0, 0, "present")

    log("user", ["a", "b"], 5, {"a": {"l": value(b"\xff\x00")}, "b": {"l": value(float("nan"))}})
    before = int(time.time() * 1000)
    (sent,) = sender.sent
    assert json.loads(sent)["values"]["l"]["value"] == repr(b"\xff\x00")
    # when it was served, beside the moment read (5): the report tells reads of the past so
    assert before - 5_000 <= json.loads(sent)["served_ms"] <= before


def test_values_compare_as_json_values_of_the_same_type() -> None:
    """A served ``1`` against a recomputed ``1.0`` (or ``-0.0`` against ``0.0``, ``True``
    against ``1``) is a difference: a `last` feature serves values of any JSON type."""
    from eventpulse.offline.consistency import identical

    for a, b in [(1, 1.0), (-0.0, 0.0), (True, 1), ({"a": 1}, {"a": 1.0}), ([1, 2], [1, 2.0]),
                 ([1], [1, 1]), ({"a": 1}, {"b": 1}), (None, 0), ("1", 1)]:
        assert not identical(a, b) and not identical(b, a), (a, b)
    for a, b in [(1, 1), (2.5, 2.5), (float("nan"), float("nan")), (-0.0, -0.0), (None, None),
                 ({"b": [1, {"c": None}], "a": "x"}, {"a": "x", "b": [1, {"c": None}]})]:
        assert identical(a, b), (a, b)


def test_the_text_report_gives_the_largest_explained_lag() -> None:
    """The text, not only the JSON, says how far behind the worker was (an outside tester
    looked for it there)."""
    from eventpulse.offline.consistency import FeatureReport, as_text

    behind = FeatureReport(rows=10, exact=8, missing=1, extra=1, smape=[0.5, 1.0],
                           max_lag_ms=1_250)
    behind.causes["not_yet_applied"] = 2
    lines = as_text({"clicks_5m": behind, "exact_one": FeatureReport(rows=3, exact=3)})
    header, first, second = lines.splitlines()
    assert "max lag" in header
    assert first.split()[:8] == ["clicks_5m", "10", "80.00%", "10.00%", "10.00%", "75.00%",
                                 "100.00%", "1.250s"]
    assert first.endswith("not_yet_applied=2")
    assert second.split()[-2:] == ["-", "-"]  # no difference: no lag, no cause


async def test_consistency_report_exact_when_caught_up_and_explains_the_rest(
        kafka: TansuBroker, redis_url: str, tmp_path: Path,
        make_worker: Callable[..., WorkerProcess]) -> None:
    events, inference, reads = unique("events"), unique("inference"), unique("reads")
    group = unique("cons")
    config = job_config(events, inference)
    config["topics"][reads] = "feature_read"
    config_path = tmp_path / "job.json"
    config_path.write_text(json.dumps(config))
    archive = tmp_path / "archive"
    worker = make_worker(config, group, EVENTPULSE_ARCHIVE_URL=str(archive),
                         EVENTPULSE_ARCHIVE_IDLE_FLUSH_MS="500").start()
    redis = aioredis.Redis.from_url(redis_url)
    feature_store = FeatureStore(redis, "ep", group)
    # the worker's group: each logged read carries the offsets its entity's fence held
    log = ServedReadLog(kafka.bootstrap, reads, share=1.0, group=group)
    rng = random.Random(3)
    seen: set[int] = set()
    last: dict[str, int] = {}
    produced = logged = 0

    async def send() -> None:
        nonlocal produced
        items = burst(rng, events, inference, 600, seen)
        for topic, partition, offset in await produce_tracked(kafka.bootstrap, items):
            last[f"{topic}:{partition}"] = max(offset, last.get(f"{topic}:{partition}", -1))
        produced += len(items)

    async def caught_up() -> bool:
        positions = await feature_store.positions(list(last))
        return all(p is not None and p.offset >= last[tp] for tp, p in positions.items())

    async def read_all(client: AsyncFeatureClient) -> None:
        nonlocal logged
        at = int(time.time() * 1000)
        for entity, ids in (("user", USERS), ("item", ITEMS), ("model", MODELS)):
            await client.get_many(entity, ids, at_ms=at)
            logged += len(ids)

    await wait_until(lambda: redis.exists(registry_key("ep")), timeout=60,
                     message="the worker publishing its features")
    client = await AsyncFeatureClient.connect(redis_url)
    log.attach(client)
    phase_a = int(time.time() * 1000)
    for _ in range(3):  # caught up: the worker applied everything before the reads
        await send()
        await wait_until(caught_up, timeout=60, message="the worker applying the burst")
        await read_all(client)
        await asyncio.sleep(1.1)
    phase_b = int(time.time() * 1000) + 1
    for _ in range(3):  # racing the worker: reads right after the records reached the broker
        await send()
        await read_all(client)
        await wait_until(caught_up, timeout=60, message="the worker applying the burst")
        await asyncio.sleep(0.2)
    await client.aclose()
    log.close()
    await redis.aclose()
    fs = pafs.LocalFileSystem()
    # the archive is a child process at nice 10 (docs/archive.md): on a CI machine busy with
    # two test workers it may wait minutes for a core, so the bound is generous
    await wait_until(lambda: count_rows(fs, str(archive)) >= produced + logged, timeout=240,
                     message="records and logged reads archived")
    worker.stop()

    async def run(since: int, until: int) -> dict[str, dict[str, Any]]:
        command = [sys.executable, "-m", "eventpulse", "consistency", "--since", str(since),
                   "--until", str(until), "--archive", str(archive), "--topic", reads,
                   "--config", str(config_path), "--json", "--redis-url", redis_url,
                   "--metrics-file", str(tmp_path / "consistency.prom")]
        done = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stderr.decode()
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    served = served_reads(ArchiveStore.open(str(archive)), reads, phase_a, None)
    assert len(served) == logged and all(read.applied for read in served)
    caught = await run(phase_a, phase_b)
    assert set(caught) == {f["name"] for f in config["features"]}
    for name, rep in caught.items():
        assert rep["rows"] > 0 and rep["exact_rate"] == 1.0, (name, rep)
    assert 'eventpulse_consistency_exact_ratio{feature="users_1m"} 1.0' in \
        (tmp_path / "consistency.prom").read_text()

    racing = await run(phase_b, int(time.time() * 1000))
    for name, rep in racing.items():
        assert rep["causes"]["unexplained"] == 0, (name, rep)
    assert sum(rep["causes"]["not_yet_applied"] for rep in racing.values()) > 0
