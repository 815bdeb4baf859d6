"""No false pages while eventpulse itself is blind, with a real broker, Redis and Slack stand-in.

The restart race runs in-process (a tick injected between prepare and commit of every backlog
batch); the broker stall and the worker outage run real worker processes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from eventpulse.agents.app import AlertClock, ensure_topics
from eventpulse.agents.pipeline import Pipeline, Prepared, RawRecord
from eventpulse.agents.records import RecordAgent
from eventpulse.alerts.state import Transition
from eventpulse.config import parse_config
from eventpulse.local.servers import TansuBroker
from tests.conftest import produce, unique, wait_until

HOSTS = ("web-1", "web-2", "web-3")


def silent_job(metrics: str, after: str) -> dict[str, Any]:
    return {"topics": {metrics: "metric"}, "partitions": 1,
            "alerts": {"rules": [{"name": "HostSilent", "kind": "absence",
                                  "metric": "cpu_percent", "after": after,
                                  "severity": "critical", "group_by": ["host"]}]}}


def cpu(host: str, at_ms: int) -> dict[str, Any]:
    return {"timestamp": at_ms, "name": "cpu_percent", "value": 12.0, "labels": {"host": host}}


async def test_a_tick_between_prepare_and_commit_of_a_backlog_batch_changes_nothing(
        kafka: TansuBroker, aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker restarts, down for 40 s, on a backlog of the last 4.5 s of healthy hosts: a tick
    between preparing a batch (fresh events) and feeding its samples to alerting (last seen
    40 s ago) must not judge absences."""
    metrics, group = unique("metrics"), unique("race")
    job = parse_config(silent_job(metrics, "10s"))
    await ensure_topics([kafka.bootstrap], job)
    now = int(time.time() * 1000)
    first = [cpu(host, now - 40_000) for host in HOSTS]
    backlog = [cpu(host, now - t * 100) for t in range(45, -1, -1) for host in HOSTS]
    await produce(kafka.bootstrap, metrics, [*first, *backlog])
    # the worker before the restart applied the first three records, then stopped
    before = Pipeline(job, aredis, "ep", group)
    await before.start()
    await before.process([RawRecord(metrics, 0, i, json.dumps(r).encode())
                          for i, r in enumerate(first)], _no_dead_letters)

    pipeline = Pipeline(job, aredis, "ep", group)
    agent = RecordAgent(pipeline, [kafka.bootstrap], group, [metrics], unique("dead"),
                        max_records=15, session_timeout_ms=2000)
    clock = AlertClock(pipeline, agent)
    injected: list[list[Transition]] = []
    held: list[bool] = []
    commit = pipeline.commit

    async def commit_after_a_tick(prepared: Prepared, sink: Any) -> Any:
        injected.append(await clock.tick_once(int(time.time() * 1000)))
        held.append(pipeline.alerts.held("HostSilent"))
        return await commit(prepared, sink)

    monkeypatch.setattr(pipeline, "commit", commit_after_a_tick)
    await agent.start()
    try:
        await wait_until(lambda: agent.lag_by_partition() and all(
            lag == 0 for lag in agent.lag_by_partition().values()), timeout=30,
            message="backlog applied")
        after: list[Transition] = []
        for _ in range(3):
            after += await clock.tick_once(int(time.time() * 1000))
    finally:
        await agent.stop()
    assert len(injected) >= 4, "the backlog should span several batches"
    assert held[0]  # nothing of the backlog fed yet: blind, although its events are fresh
    assert [t for ticks in injected for t in ticks] == [] and after == []
    assert all(s.phase.value == "inactive" for s in pipeline.alerts.engine.states.values()
               if s.rule == "HostSilent")
    assert clock.input_status().blind is False


async def _no_dead_letters(letters: Any) -> None:
    raise AssertionError(f"unexpected dead letters: {letters}")


