"""Each piece of the batch step on its own, in-process: the ingest with no Redis at all, the
checkpoint and the alert driving against a real redis-server, and the step that wires them."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from eventpulse.agents import checkpoint as checkpoint_module
from eventpulse.agents.alerting import AlertDriver
from eventpulse.agents.checkpoint import Checkpoint
from eventpulse.agents.ingest import Ingest, RawRecord
from eventpulse.agents.pipeline import Pipeline
from eventpulse.config import JobConfig, parse_config
from eventpulse.redisretry import RedisRetry
from eventpulse.streams.deadletter import DeadLetter
from eventpulse.tables.batch import PartitionPosition
from eventpulse.tables.client import AsyncFeatureClient
from eventpulse.tables.writebounds import DEFAULT_SHARDS
from tests.conftest import unique
from tests.test_poison_records import HOUR, hour_start

SHARDS = 4


def make_job(inference: str, metrics: str) -> JobConfig:
    return parse_config({
        "topics": {inference: "inference", metrics: "metric"}, "partitions": 1,
        "features": [{"name": "requests", "topic": inference, "entity": "model", "key": "model",
                      "aggregation": "count", "window": {"size": "1h"}}],
        "alerts": {"rules": [{"name": "Disk", "kind": "threshold", "metric": "disk", "op": ">",
                              "threshold": 90, "clear": 85, "for": "0s",
                              "group_by": ["host"]}]}})


def call(model: str, at_ms: int) -> bytes:
    return json.dumps({"timestamp": at_ms, "model": model, "latency_ms": 5,
                       "status": 200}).encode()


def disk(host: str, value: float, at_ms: int) -> bytes:
    return json.dumps({"timestamp": at_ms, "name": "disk", "value": value,
                       "labels": {"host": host}}).encode()


def calls(topic: str, offsets: range, now: int, model: str = "m1") -> list[RawRecord]:
    return [RawRecord(topic, 0, i, call(model, now + i)) for i in offsets]


async def count(client: aioredis.Redis, job: JobConfig, namespace: str, now: int,
                model: str = "m1") -> Any:
    """The count of the hour the calls are stamped in, read once it is over."""
    reader = AsyncFeatureClient(client, job.features, namespace, SHARDS)
    return (await reader.get("model", model, at_ms=now + HOUR))["requests"].value


def checkpoint_for(client: aioredis.Redis, job: JobConfig, namespace: str,
                   group: str) -> Checkpoint:
    return Checkpoint(client, namespace, group, Ingest(job, namespace, shards=SHARDS),
                      RedisRetry(), shards=SHARDS)


async def test_ingest_decodes_combines_and_dead_letters_with_no_redis() -> None:
    inference, metrics = unique("inference"), unique("metrics")
    ingest = Ingest(make_job(inference, metrics), "ep", shards=SHARDS)
    now = int(time.time() * 1000)
    records = [RawRecord(inference, 0, 0, call("m1", now)),
               RawRecord(inference, 0, 1, None),  # a tombstone: refused, not lost
               RawRecord(inference, 0, 2, call("m2", now)),
               RawRecord(metrics, 0, 7, disk("a", 95, now)),
               RawRecord("elsewhere", 0, 0, b"{}")]  # no decoder: not applied
    batch = await ingest(records, {f"{inference}:0": None, f"{metrics}:0": None,
                                   "elsewhere:0": None})
    assert [(topic, letter.offset, letter.reason) for topic, letter in batch.dead] == [
        (inference, 1, "empty")]
    assert batch.not_applied == {inference: 1, "elsewhere": 1}
    assert batch.plan.touched == {"requests": {"m1", "m2"}}
    assert [(tp, s.labels) for tp, s in batch.samples] == [(f"{metrics}:0", {"host": "a"})]
    assert batch.offsets == {(inference, 0): 2, (metrics, 0): 7}
    assert batch.plan.positions[f"{inference}:0"].offset == 2
    assert batch.watermark_ms is not None and batch.watermark_ms >= now - 1


async def test_ingest_skips_what_the_fences_hold_and_feeds_samples_the_control_lacks() -> None:
    """Records at or below every fence are skipped; a sample the control fence (last) already
    holds moved the alert states Redis has, so it is not fed again, though shards lack it."""
    inference, metrics = unique("inference"), unique("metrics")
    ingest = Ingest(make_job(inference, metrics), "ep", shards=SHARDS)
    now = int(time.time() * 1000)
    records = [*calls(inference, range(4), now),
               *[RawRecord(metrics, 0, i, disk("a", 95 + i, now + i)) for i in range(3)]]
    control_ahead: list[PartitionPosition | None] = [None] * SHARDS + [PartitionPosition(1)]
    batch = await ingest(records, {f"{inference}:0": PartitionPosition(1),
                                   f"{metrics}:0": control_ahead})
    assert batch.not_applied == {inference: 2}
    assert batch.stats.skipped_replayed == 2
    assert [s.value for _, s in batch.samples] == [97.0]  # offsets 0 and 1: the control has them
    assert batch.offsets == {(inference, 0): 3, (metrics, 0): 2}


async def test_checkpoint_writes_once_and_resumes_from_what_redis_holds(
        aredis: aioredis.Redis) -> None:
    inference, metrics, ns, group = unique("i"), unique("m"), unique("ns"), unique("g")
    job = make_job(inference, metrics)
    now = hour_start()
    first = checkpoint_for(aredis, job, ns, group)
    await first.start()
    assert await first.resume_points([f"{inference}:0"]) == {f"{inference}:0": None}
    batch = await first.prepare(calls(inference, range(5), now))
    assert await first.apply(batch.plan)
    # the next batch expects this one applied: positions from memory, then written; within
    # ADVANCE_EVERY_S of the first, the shards it does not touch keep their fences at offset 4
    second = await first.prepare(calls(inference, range(5, 8), now))
    assert second.plan.advances == [] and len(second.plan.slices) == 1
    assert await first.apply(second.plan)
    tp = f"{inference}:0"
    lagging = (await first.resume_points([tp]))[tp]
    assert lagging is not None and lagging.offset == 4
    # a worker after a crash reads again from the lowest fence: each shard skips what it holds
    again = checkpoint_for(aredis, job, ns, group)
    await again.start()
    replayed = await again.prepare(calls(inference, range(8), now))
    assert replayed.not_applied == {inference: 5} and replayed.plan.touched == {}
    assert await again.apply(replayed.plan)
    assert await count(aredis, job, ns, now) == 8
    resumed = (await again.resume_points([tp]))[tp]
    assert resumed is not None and resumed.offset == 7


async def test_untouched_shards_catch_up_when_the_worker_is_idle(
        aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trickle of small batches does not pay a script per shard per batch: the fences of
    shards a batch did not touch move on every ADVANCE_EVERY_S, or when the worker is idle."""
    inference, metrics, ns, group = unique("i"), unique("m"), unique("ns"), unique("g")
    job = make_job(inference, metrics)
    now = hour_start()
    checkpoint = checkpoint_for(aredis, job, ns, group)
    await checkpoint.start()
    tp = f"{inference}:0"
    for first in range(0, 12, 3):  # one model: one shard touched per batch
        batch = await checkpoint.prepare(calls(inference, range(first, first + 3), now))
        assert len(batch.plan.all_slices) == (2 + SHARDS - 1 if first == 0 else 2)
        assert await checkpoint.apply(batch.plan)
    fences = (await checkpoint.store.fences([tp]))[tp]
    assert sorted({p.offset for p in fences if p}) == [2, 11]
    # an empty fetch right after the first batch moved them all waits for ADVANCE_EVERY_S
    await checkpoint.advance_untouched(idle=True)
    assert (await checkpoint.store.fences([tp]))[tp] == fences
    monkeypatch.setattr(checkpoint_module, "ADVANCE_EVERY_S", 0.0)
    await checkpoint.advance_untouched(idle=True)
    fences = (await checkpoint.store.fences([tp]))[tp]
    assert {p.offset for p in fences if p} == {11} and None not in fences
    await checkpoint.advance_untouched()  # nothing behind: nothing written
    assert await count(aredis, job, ns, now) == 12
    # the next batch starts from memory, all shards alike
    batch = await checkpoint.prepare(calls(inference, range(12, 14), now))
    assert await checkpoint.apply(batch.plan)
    assert await count(aredis, job, ns, now) == 14


async def test_a_second_writer_is_a_conflict_and_the_checkpoint_rebuilds_from_redis(
        aredis: aioredis.Redis) -> None:
    """A zombie's batch is refused by the fence; rebuilt from Redis, it applies only what the
    rightful writer had not."""
    inference, metrics, ns, group = unique("i"), unique("m"), unique("ns"), unique("g")
    job = make_job(inference, metrics)
    now = hour_start()
    owner, zombie = checkpoint_for(aredis, job, ns, group), checkpoint_for(aredis, job, ns, group)
    await owner.start()
    records = calls(inference, range(6), now)
    stale = await zombie.prepare(records)
    assert await owner.apply((await owner.prepare(records[:4])).plan)
    conflicts = REGISTRY.get_sample_value("eventpulse_offset_fence_conflicts_total") or 0
    assert not await zombie.apply(stale.plan)
    assert REGISTRY.get_sample_value("eventpulse_offset_fence_conflicts_total") == conflicts + 1
    rebuilt = await zombie.rebuild(records)
    assert rebuilt.not_applied == {inference: 4}
    assert await zombie.apply(rebuilt.plan)
    assert await count(aredis, job, ns, now) == 6
    await zombie.advance_untouched()  # the shards its rebuilt batch did not touch
    resumed = (await owner.resume_points([f"{inference}:0"]))[f"{inference}:0"]
    assert resumed is not None and resumed.offset == 5


async def test_alert_driving_rides_along_with_the_write_and_honours_silences(
        aredis: aioredis.Redis) -> None:
    inference, metrics, ns, group = unique("i"), unique("m"), unique("ns"), unique("g")
    job = make_job(inference, metrics)
    now = int(time.time() * 1000)
    checkpoint = checkpoint_for(aredis, job, ns, group)
    await checkpoint.start()
    driver = AlertDriver(job, aredis, ns, AsyncFeatureClient(aredis, job.features, ns, SHARDS),
                         RedisRetry())
    woken: list[bool] = []
    driver.on_outbox = lambda: woken.append(True)
    await driver.store.add_silence({"host": "b"}, 3_600_000, "maintenance", "test")
    await driver.reload()
    now = int(time.time() * 1000)  # the silence began before the samples
    batch = await checkpoint.prepare([RawRecord(metrics, 0, 0, disk("a", 95, now)),
                                      RawRecord(metrics, 0, 1, disk("b", 96, now))])
    async with driver.lock:
        transitions, outbox = await driver.feed(batch.samples, batch.plan)
        assert await driver.store.load_states() == {}  # nothing saved before the write
        assert await checkpoint.apply(batch.plan)
    driver.written(outbox)
    fired = {t.labels["host"]: t for t in transitions}
    assert [t.kind.value for t in transitions] == ["firing", "firing"] and outbox and woken
    assert fired["a"].silenced_until is None and fired["b"].silenced_until is not None
    assert sorted(s.phase.value for s in (await driver.store.load_states()).values()) == [
        "firing", "firing"]
    assert [e.transition.labels["host"] for e in await driver.store.outbox()] == ["a", "b"]
    # a tick a second later: nothing new to tell (no `for`, no reminder due yet)
    assert await driver.tick(now + 1000) == []


async def test_the_batch_step_counts_applied_records_once_and_rebuilds_on_a_conflict(
        aredis: aioredis.Redis) -> None:
    inference, metrics, ns, group = unique("i"), unique("m"), unique("ns"), unique("g")
    job = make_job(inference, metrics)
    now = hour_start()
    letters: list[tuple[str, DeadLetter]] = []

    async def sink(batch: list[tuple[str, DeadLetter]]) -> None:
        letters.extend(batch)

    def applied() -> float:
        return REGISTRY.get_sample_value("eventpulse_records_applied_total",
                                         {"topic": inference}) or 0.0

    owner = Pipeline(job, aredis, ns, group, shards=SHARDS)
    zombie = Pipeline(job, aredis, ns, group, shards=SHARDS)
    await owner.start()
    await zombie.start()
    records = [*calls(inference, range(3), now), RawRecord(inference, 0, 3, None)]
    stale = await zombie.prepare(records)
    before = applied()
    result = await owner.process(records[:2], sink)
    assert result.offsets == {(inference, 0): 1} and result.touched == {"requests": {"m1"}}
    assert applied() == before + 2
    # the zombie's batch conflicts and is rebuilt from Redis: only offsets 2 and 3 are its own
    conflicts = REGISTRY.get_sample_value("eventpulse_offset_fence_conflicts_total") or 0
    more = await zombie.commit(stale, sink)
    assert REGISTRY.get_sample_value("eventpulse_offset_fence_conflicts_total") == conflicts + 1
    assert more.offsets == {(inference, 0): 3}
    assert applied() == before + 3
    assert await count(aredis, job, ns, now) == 3
    # the refused record's dead letter goes out before each attempt (duplicates are allowed
    # and recognisable: docs/design.md)
    assert [letter.offset for _, letter in letters] == [3, 3]


async def test_alert_driving_evaluates_rules_over_the_features_a_write_updated(
        aredis: aioredis.Redis) -> None:
    """The rules over features read back what the batch wrote, once its write is in Redis."""
    inference, ns, group = unique("i"), unique("ns"), unique("g")
    config = {"topics": {inference: "inference"}, "partitions": 1,
              "features": [{"name": "errors", "topic": inference, "entity": "model",
                            "key": "model", "aggregation": "ratio",
                            "numerator": {"status": {"gte": 500}}, "window": {"size": "10s"}}],
              "alerts": {"rules": [{"name": "ModelErrors", "kind": "ratio", "feature": "errors",
                                    "threshold": 0.2, "min_count": 10, "for": "0s"}]}}
    job = parse_config(config)
    base = int(time.time() * 1000) // 10_000 * 10_000 - 20_000  # a window over by now
    records = [RawRecord(inference, 0, i, json.dumps({
        "timestamp": base + i, "model": "m1", "latency_ms": 5,
        "status": 500 if i % 2 else 200}).encode()) for i in range(20)]
    checkpoint = checkpoint_for(aredis, job, ns, group)
    await checkpoint.start()
    driver = AlertDriver(job, aredis, ns, AsyncFeatureClient(aredis, job.features, ns, SHARDS),
                         RedisRetry(), clock=lambda: base + 10_000)
    await driver.reload()
    batch = await checkpoint.prepare(records)
    assert await driver.on_features(batch.plan.touched) == []  # not written yet: nothing read
    assert await checkpoint.apply(batch.plan)
    fired = await driver.on_features(batch.plan.touched)
    assert [(t.rule, t.kind.value, t.labels["model"], t.value) for t in fired] == [
        ("ModelErrors", "firing", "m1", 0.5)]
    assert [e.rule for e in await driver.store.outbox()] == ["ModelErrors"]


async def test_an_unset_shard_count_adopts_what_redis_holds_else_the_default(
        aredis: aioredis.Redis) -> None:
    """A worker upgraded from a smaller default shard count keeps writing (and reading) the
    keys it wrote before; a namespace no worker wrote to gets the default."""
    inference, metrics, ns, group = unique("i"), unique("m"), unique("ns"), unique("g")
    job = make_job(inference, metrics)
    now = hour_start()
    sink = _no_dead_letters
    old = Pipeline(job, aredis, ns, group, shards=SHARDS)
    await old.start()
    await old.process(calls(inference, range(3), now), sink)
    upgraded = Pipeline(job, aredis, ns, group)  # EVENTPULSE_REDIS_SHARDS unset
    await upgraded.start()
    assert (upgraded.store.shards, upgraded.ingest.shards, upgraded.reader.shards) == (
        SHARDS, SHARDS, SHARDS)
    await upgraded.process(calls(inference, range(3, 5), now), sink)
    assert await count(aredis, job, ns, now) == 5  # the same keys, no replay
    fresh = Pipeline(job, aredis, unique("ns"), group)
    await fresh.start()
    assert (fresh.store.shards, fresh.ingest.shards, fresh.reader.shards) == (
        DEFAULT_SHARDS, DEFAULT_SHARDS, DEFAULT_SHARDS)


async def _no_dead_letters(batch: list[tuple[str, DeadLetter]]) -> None:
    raise AssertionError(f"unexpected dead letters: {batch}")
