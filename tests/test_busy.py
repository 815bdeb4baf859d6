"""Redis busy with someone else's long script while the worker writes: the worker waits it out
and carries on, and every count is exact."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from eventpulse import connections
from eventpulse.alerts.delivery import BotTransport, Deliverer
from eventpulse.alerts.outbox import AlertStore
from eventpulse.alerts.rules import AlertingConfig
from eventpulse.config import parse_config
from eventpulse.health import RedisWatch
from eventpulse.local.servers import TansuBroker
from eventpulse.redisretry import RedisRetry, failure_name, is_transient
from eventpulse.settings import load_settings
from eventpulse.tables.client import AsyncFeatureClient
from eventpulse.tables.store import FeatureStore
from tests.conftest import WorkerProcess, produce, unique, wait_until
from tests.fakeslack import FakeSlack

#: a script that keeps Redis busy for ARGV[1] microseconds (TIME is allowed in scripts since
#: Redis 5's effects replication)
SLOW_LUA = """
local t0 = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1]) then return 1 end
end
"""


@pytest.fixture
def busy_threshold(redis_url: str) -> Iterator[None]:
    """Redis answers BUSY to everyone else once a script has run 50 ms (default: 5 s)."""
    client = redis.Redis.from_url(redis_url)
    name = "busy-reply-threshold" if client.config_get("busy-reply-threshold") else "lua-time-limit"
    old = client.config_get(name)[name]
    client.config_set(name, 50)
    yield
    client.config_set(name, old)
    client.close()


def test_transient_replies_are_told_from_the_rest() -> None:
    for reply in ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or "
                  "SHUTDOWN NOSAVE.", "LOADING Redis is loading the dataset in memory",
                  "MASTERDOWN Link with MASTER is down", "TRYAGAIN Multiple keys request",
                  "CLUSTERDOWN The cluster is down"):
        assert is_transient(ResponseError(reply)), reply
    for reply in ("WRONGTYPE Operation against a key holding the wrong kind of value",
                  "NOPERM this user has no permissions", "ERR Error running script"):
        assert not is_transient(ResponseError(reply)), reply


@pytest.mark.slow
async def test_worker_waits_out_busy_scripts_and_stays_exact(
        kafka: TansuBroker, redis_url: str, busy_threshold: None,
        make_worker: Callable[..., WorkerProcess]) -> None:
    events = unique("busy")
    group = unique("busy")
    config = {"topics": {events: "behaviour"}, "partitions": 2, "features": [
        {"name": "n_1h", "topic": events, "entity": "user", "key": "user_id",
         "aggregation": "count",
         "window": {"type": "hopping", "size": "1h", "step": "1m", "lateness": "1h"}}]}
    worker = make_worker(config, group).start()
    now = int(time.time() * 1000)
    records = [{"timestamp": now - 60_000 + i, "user_id": f"u{i % 50}", "action": "view"}
               for i in range(6000)]
    client = aioredis.Redis.from_url(redis_url)
    store = FeatureStore(client, "ep", group)

    async def applied() -> int:
        held = await store.all_positions()
        return sum(p.offset + 1 for p in held.values() if p is not None)

    await produce(kafka.bootstrap, events, records[:2000])
    await wait_until(lambda: _at_least(applied, 2000), timeout=60, message="first records")
    # two 1.5 s scripts from another client, with records arriving meanwhile
    busy = redis.Redis.from_url(redis_url)
    slow = busy.register_script(SLOW_LUA)
    for round_ in range(2):
        task = asyncio.get_running_loop().run_in_executor(None, lambda: slow(args=[1_500_000]))
        await asyncio.sleep(0.2)
        chunk = records[2000 + round_ * 2000:4000 + round_ * 2000]
        await produce(kafka.bootstrap, events, chunk)
        assert await task == 1
    busy.close()
    await wait_until(lambda: _at_least(applied, len(records)), timeout=90,
                     message="every record applied")
    assert worker.process is not None and worker.process.poll() is None, worker.log()
    log = worker.log()
    assert "BUSY" in log and "retrying" in log, "the worker never met a BUSY reply"
    assert "Crashed" not in log, log
    retries = [line for line in worker.metrics().splitlines()
               if line.startswith("eventpulse_redis_retries_total ")]
    assert retries and float(retries[0].split()[1]) > 0
    spec = parse_config(config).features[0]
    reader = AsyncFeatureClient(client, [spec], "ep")
    expected = Counter(r["user_id"] for r in records)
    end = now - now % 60_000 + 60_000  # the window ending after the last event holds them all
    rows = await reader.get_many("user", sorted(expected), ["n_1h"], at_ms=end)
    assert {user: row["n_1h"].value for user, row in rows.items()} == expected
    await client.aclose()


async def _at_least(count: Callable[[], object], n: int) -> bool:
    value = await count()  # type: ignore[misc]
    return bool(value >= n)


async def test_an_error_that_cannot_heal_is_raised_with_one_clear_line(
        aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    await aredis.set("ep:not-a-list", "x")
    policy = RedisRetry()
    with caplog.at_level(logging.WARNING, logger="eventpulse.redis"), \
            pytest.raises(ResponseError, match="WRONGTYPE"):
        await policy.call(lambda: aredis.lpush("ep:not-a-list", "v"), "outbox push")
    lines = [r for r in caplog.records if r.name == "eventpulse.redis"]
    assert len(lines) == 1 and lines[0].levelno == logging.CRITICAL
    assert "outbox push" in lines[0].getMessage() and "WRONGTYPE" in lines[0].getMessage()


async def test_busy_in_a_pipeline_and_at_start_up_is_waited_out(
        redis_url: str, busy_threshold: None, caplog: pytest.LogCaptureFixture) -> None:
    """An outside tester crashed the worker with BUSY twice: redis-py rewrites a pipelined
    command's reply (``Command # 1 (HMGET ...) of pipeline caused error: BUSY ...``), and the
    start-up check stopped on BUSY instead of waiting."""
    blocker = threading.Thread(
        target=lambda: redis.Redis.from_url(redis_url).eval(SLOW_LUA, 0, 3_000_000))
    blocker.start()
    probe = aioredis.Redis.from_url(redis_url)

    async def busy() -> bool:
        try:
            await probe.ping()
        except ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    async def fences() -> list[object]:
        pipe = probe.pipeline(transaction=False)
        pipe.hmget("ep:{s:0}:fence:g", "events:0")
        return list(await pipe.execute())

    try:
        await wait_until(busy, timeout=10, interval=0.02, message="Redis busy with the script")
        with pytest.raises(ResponseError) as err:
            await fences()
        assert "of pipeline caused error" in str(err.value) and is_transient(err.value)
        with caplog.at_level(logging.WARNING, logger="eventpulse.connections"):
            await connections.check_redis(load_settings(redis_url=redis_url))
        assert any("not ready at start-up" in r.getMessage() and "BUSY" in r.getMessage()
                   for r in caplog.records), caplog.text
        assert await RedisRetry().call(fences, "shard fences") == [[None]]
        assert not await busy()
    finally:
        blocker.join()
        await probe.aclose()


async def test_a_busy_episode_is_named_in_the_log_and_so_is_its_end(
        redis_url: str, busy_threshold: None, caplog: pytest.LogCaptureFixture) -> None:
    """An outside tester saw ``redis ping failed (ResponseError)`` without the state, and no
    line saying a write that had been retrying went through."""
    blocker = threading.Thread(
        target=lambda: redis.Redis.from_url(redis_url).eval(SLOW_LUA, 0, 1_500_000))
    blocker.start()
    probe = aioredis.Redis.from_url(redis_url)

    async def fences() -> list[object]:
        pipe = probe.pipeline(transaction=False)
        pipe.hmget("ep:{s:0}:fence:g", "events:0")
        return list(await pipe.execute())

    async def busy() -> bool:
        try:
            await fences()
        except ResponseError as exc:
            assert failure_name(exc) == "ResponseError BUSY", exc  # a pipeline's wrapped reply
            return True
        return False

    try:
        await wait_until(busy, timeout=10, interval=0.02, message="Redis busy with the script")
        with caplog.at_level(logging.INFO):
            watch = RedisWatch(probe.ping, outage_s=60)
            assert not await watch.check_once()
            assert watch.last_error == "ResponseError BUSY"
            assert await RedisRetry().call(fences, "shard fences") == [[None]]
    finally:
        blocker.join()
        await probe.aclose()
    messages = [r.getMessage() for r in caplog.records]
    assert any("redis ping failed (ResponseError BUSY)" in m for m in messages), messages
    retrying = [m for m in messages if "during shard fences; retrying" in m]
    assert len(retrying) == 1 and "BUSY" in retrying[0], messages
    assert any(m.startswith("shard fences on redis at ? went through after ") for m in messages)
    assert failure_name(ConnectionError("host secret")) == "ConnectionError"


async def test_alert_delivery_logs_a_busy_episode_once_and_its_end(
        redis_url: str, busy_threshold: None, fake_slack: FakeSlack,
        caplog: pytest.LogCaptureFixture) -> None:
    """An outside tester saw the delivery loop's warning repeat through a BUSY episode, every
    retry with its backoff: one line when it starts, one when delivery works again."""
    client = aioredis.Redis.from_url(redis_url)
    rules = AlertingConfig.model_validate({"routes": []})
    deliverer = Deliverer(AlertStore(client, unique("ep")), rules,
                          BotTransport("xoxb-test", fake_slack.base_url, timeout=2),
                          max_backoff_s=0.2)  # several retries within the 2 s script
    blocker = threading.Thread(
        target=lambda: redis.Redis.from_url(redis_url).eval(SLOW_LUA, 0, 2_000_000))
    with caplog.at_level(logging.DEBUG, logger="eventpulse.alerts"):
        task = asyncio.create_task(deliverer.run())
        try:
            blocker.start()
            await wait_until(lambda: _logged(caplog, "works again"), timeout=20,
                             message="delivery working again after the script")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            blocker.join()
            await client.aclose()
    # a Redis state that passes is a wait, not a failure (an outside tester took the word
    # "failed" for a fault, with no alert rule configured at all)
    assert not [r for r in caplog.records if "alert delivery failed" in r.getMessage()]
    failed = [r for r in caplog.records if "alert delivery waits for Redis" in r.getMessage()]
    warnings = [r for r in failed if r.levelno == logging.WARNING]
    assert len(failed) >= 3, caplog.text  # retried through the episode...
    assert len(warnings) == 1, caplog.text  # said once
    assert "(ResponseError BUSY); retrying in" in warnings[0].getMessage(), caplog.text
    recovered = [r for r in caplog.records if "works again" in r.getMessage()]
    assert len(recovered) == 1 and f"after {len(failed)} failed" in recovered[0].getMessage()


async def _logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records)
