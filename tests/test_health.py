"""/healthz, /readyz and /metrics from the worker's event loop; the graceful stop on SIGTERM.

The worker tests run ``python -m eventpulse worker`` as a real subprocess against the real
broker and a redis-server of their own (so they can take it away)."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from eventpulse import metrics
from eventpulse.health import HealthServer, Heartbeat, RedisWatch
from eventpulse.local.servers import LocalRedis, free_port
from eventpulse.tables.store import FeatureStore
from tests.conftest import WorkerProcess, produce, unique, wait_until
from tests.test_monitoring import dashboard_queries, rule_queries
from tests.test_slice import slice_config


def get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def aget(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    return await asyncio.to_thread(get, port, path, timeout)


async def test_healthz_reflects_the_event_loop_that_serves_it() -> None:
    heartbeat = Heartbeat(max_age_s=0.5, interval_s=0.1)
    server = HealthServer(free_port(), live=[heartbeat.reason], ready=[], host="127.0.0.1")
    beating = asyncio.create_task(heartbeat.run())
    await server.start()
    try:
        assert await aget(server.port, "/healthz") == (200, "alive\n")
        status, body = await aget(server.port, "/metrics")
        assert status == 200 and f"# TYPE {metrics.FENCE_CONFLICTS._name}_total counter" in body

        # a blocked loop answers nothing: a probe with a timeout fails...
        answers: list[Any] = []

        def probe() -> None:
            try:
                answers.append(get(server.port, "/healthz", timeout=0.5))
            except OSError as exc:  # socket.timeout / URLError
                answers.append(exc)

        prober = threading.Thread(target=probe)
        prober.start()
        time.sleep(1.5)  # the event loop is blocked here
        # ...and the heartbeat it left behind is older than its bound
        assert heartbeat.reason(time.monotonic()) is not None
        assert "event loop heartbeat" in server.live_reasons()[0]
        await asyncio.to_thread(prober.join)
        assert len(answers) == 1 and isinstance(answers[0], OSError), answers
        # the loop runs again: so does the heartbeat
        await asyncio.sleep(0.3)
        assert await aget(server.port, "/healthz") == (200, "alive\n")
    finally:
        beating.cancel()
        await server.stop()


async def test_redis_watch_tolerates_a_short_outage_and_reports_a_long_one() -> None:
    with LocalRedis() as server:
        client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
        watch = RedisWatch(client.ping, outage_s=1.0, interval_s=0.1, timeout_s=0.5)
        assert await watch.check_once()
        server.stop()
        assert not await watch.check_once()
        assert watch.reason(time.monotonic()) is None  # within the bound: still ready
        reason = watch.reason(time.monotonic() + 1.5)
        assert reason is not None and "redis unreachable" in reason and "ConnectionError" in reason
        assert server.url not in reason
        server.start()
        assert await watch.check_once()
        assert watch.reason(time.monotonic() + 60) is None
        await client.aclose()


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.mark.slow
async def test_readyz_follows_assignment_and_a_redis_outage(
        kafka: Any, own_redis: LocalRedis, make_worker: Any) -> None:
    worker: WorkerProcess = make_worker(
        slice_config(unique("events"), unique("metrics")), unique("ready"),
        EVENTPULSE_REDIS_URL=own_redis.url, EVENTPULSE_READY_REDIS_OUTAGE_S="2")
    worker.start()
    port = int(worker.env["EVENTPULSE_METRICS_PORT"])
    # served before the app has joined its group: alive, not yet ready
    assert (await aget(port, "/healthz"))[0] == 200
    status, body = await aget(port, "/readyz")
    assert status == 503 and ("no partition assignment" in body or "starting" in body), body

    async def ready() -> str | None:
        status, body = await aget(port, "/readyz")
        return body if status == 200 else None

    body = await wait_until(ready, timeout=60, message="/readyz 200")
    assert body.startswith("ready (4 partitions assigned"), body
    page = worker.metrics()
    assert "eventpulse_ready 1.0" in page
    # every metric the dashboard and the alert rules query is on the real page
    families = {re.sub(r"_total$", "", name)
                for name in re.findall(r"^# TYPE (eventpulse_\w+) ", page, re.M)}
    queried = {re.sub(r"_(total|bucket|sum|count)$", "", name)
               for expr in dashboard_queries() + rule_queries()
               for name in re.findall(r"\beventpulse_[a-z_]+", expr)}
    assert queried <= families, queried - families

    own_redis.stop()

    async def not_ready() -> str | None:
        status, body = await aget(port, "/readyz")
        return body if status == 503 else None

    body = await wait_until(not_ready, timeout=30, message="/readyz 503 without Redis")
    assert "redis unreachable" in body and "bound 2s" in body, body
    assert "eventpulse_ready 0.0" in worker.metrics()
    assert (await aget(port, "/healthz"))[0] == 200  # a dependency never fails liveness

    own_redis.start()
    await wait_until(ready, timeout=30, message="/readyz 200 once Redis is back")
    assert worker.process is not None and worker.process.poll() is None


async def committed_and_applied(bootstrap: str, redis_url: str, group: str, topic: str,
                                ) -> tuple[dict[int, int | None], dict[int, int | None]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in range(2)}
    finally:
        await consumer.stop()
    client = aioredis.Redis.from_url(redis_url)
    positions = await FeatureStore(client, "ep", group).positions([f"{topic}:{p}" for p in range(2)])
    await client.aclose()
    applied = {p: (pos.offset + 1 if pos else None)
               for p, pos in ((int(tp.rsplit(":", 1)[1]), v) for tp, v in positions.items())}
    return committed, applied


@pytest.mark.slow
async def test_sigterm_finishes_and_commits_the_batch_in_hand(
        kafka: Any, redis_url: str, make_worker: Any) -> None:
    events, group, total = unique("events"), unique("stop"), 60_000
    config = slice_config(events, unique("metrics"))
    worker: WorkerProcess = make_worker(config, group, EVENTPULSE_BATCH_MAX_RECORDS="100",
                                        EVENTPULSE_STOP_TIMEOUT_S="20")
    worker.start()
    now = int(time.time() * 1000)
    clicks = [{"timestamp": now - 1000, "user_id": f"u{i % 500}", "item_id": "i",
               "action": "click"} for i in range(total)]
    await produce(kafka.bootstrap, events, [b"not json", *clicks],
                  partition=lambda r: 0 if isinstance(r, bytes) else int(r["user_id"][1:]) % 2)

    def counted(page: str, metric: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                   if line.startswith(metric + "{") and f'topic="{events}"' in line)

    await wait_until(lambda: counted(worker.metrics(), "eventpulse_records_consumed_total"),
                     timeout=90, interval=0.05, message="records being consumed")
    page = worker.metrics()
    assert counted(page, "eventpulse_records_consumed_total") == (
        counted(page, "eventpulse_records_applied_total")
        + counted(page, "eventpulse_dead_letters_total"))
    freshness = [line for line in worker.metrics().splitlines()
                 if line.startswith('eventpulse_feature_freshness_seconds{feature="clicks_5m"}')]
    assert len(freshness) == 1 and 1.0 <= float(freshness[0].rsplit(" ", 1)[1]) < 60, freshness
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    code = await asyncio.to_thread(worker.process.wait, 30)
    took = time.monotonic() - stopped
    assert code == 0, worker.log()[-3000:]
    assert took < 20, took
    committed, applied = await committed_and_applied(kafka.bootstrap, redis_url, group, events)
    # stopped mid-stream, and what Redis holds is exactly what Kafka has committed
    assert sum(a or 0 for a in applied.values()) < total, applied
    assert committed == applied, (committed, applied)


@pytest.mark.slow
async def test_sigterm_stop_is_bounded_when_the_batch_in_hand_cannot_finish(
        kafka: Any, own_redis: LocalRedis, make_worker: Any) -> None:
    """Redis gone with a batch in hand: the worker cannot commit it, and exits at the bound
    (what it had not committed is replayed exactly by the next owner)."""
    events = unique("events")
    worker: WorkerProcess = make_worker(
        slice_config(events, unique("metrics")), unique("stuck"),
        EVENTPULSE_REDIS_URL=own_redis.url, EVENTPULSE_STOP_TIMEOUT_S="3")
    worker.start()
    port = int(worker.env["EVENTPULSE_METRICS_PORT"])
    await wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=60, message="ready")
    own_redis.stop()
    now = int(time.time() * 1000)
    await produce(kafka.bootstrap, events, [{"timestamp": now, "user_id": "u1", "item_id": "i",
                                             "action": "click"}])
    await wait_until(lambda: "unavailable (" in worker.log(), timeout=30,
                     message="the batch retrying its write")
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    code = await asyncio.to_thread(worker.process.wait, 30)
    took = time.monotonic() - stopped
    # the stop gives up on Redis at once and leaves the batch uncommitted (a clean exit); had
    # anything still waited, the bound would have ended the process with 70
    assert code == 0, worker.log()[-3000:]
    assert took < 10, took
    assert "batch abandoned at stop, not committed" in worker.log()


@pytest.mark.slow
async def test_readyz_reports_a_stalled_pipeline(kafka: Any, own_redis: LocalRedis,
                                                 make_worker: Any) -> None:
    """Redis frozen (SIGSTOP: connections open, no answers): records wait, none is applied;
    past the stall bound the worker is not ready, and it is again once Redis thaws."""
    events = unique("events")
    worker: WorkerProcess = make_worker(
        slice_config(events, unique("metrics")), unique("stall"),
        EVENTPULSE_REDIS_URL=own_redis.url, EVENTPULSE_READY_STALL_S="3",
        EVENTPULSE_READY_REDIS_OUTAGE_S="600")
    worker.start()
    port = int(worker.env["EVENTPULSE_METRICS_PORT"])
    await wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=60, message="ready")
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        now = int(time.time() * 1000)
        await produce(kafka.bootstrap, events, [{"timestamp": now, "user_id": "u1",
                                                 "item_id": "i", "action": "click"}])

        def stalled() -> str | None:
            status, body = get(port, "/readyz")
            return body if status == 503 else None

        body = await wait_until(stalled, timeout=30, message="/readyz 503 while stalled")
        assert "has records waiting and applied none for" in body and "bound 3s" in body, body
        assert "redis unreachable" not in body  # its own bound (600 s) has not passed
    finally:
        own_redis.process.send_signal(signal.SIGCONT)
    await wait_until(lambda: get(port, "/readyz")[0] == 200, timeout=30,
                     message="ready again once the batch is applied")
