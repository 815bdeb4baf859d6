"""The producing side: a service's logs and events reach Kafka without ever blocking or
raising, through a broker that is down at start and restarted mid-stream."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from eventpulse.local.servers import TansuBroker, free_port
from eventpulse.logging import KafkaHandler, configure_events, log_event, request_id
from eventpulse.logging.sender import KafkaSender
from tests.conftest import unique, wait_until


async def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < expect and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                out += [json.loads(m.value) for m in messages]
    finally:
        await consumer.stop()
    return out


async def create_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger(unique("svc"))
    log.setLevel(logging.INFO)
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def timed_calls(count: int, call: Any) -> float:
    """The slowest of ``count`` calls, in seconds."""
    slowest = 0.0
    for i in range(count):
        started = time.perf_counter()
        call(i)
        slowest = max(slowest, time.perf_counter() - started)
    return slowest


async def test_broker_down_at_start_then_up(port: int, logger: logging.Logger) -> None:
    handler = KafkaHandler(f"127.0.0.1:{port}", topic="inference", key_field="model")
    logger.addHandler(handler)
    # nothing listens yet: the calls return at once and nothing is raised
    slowest = timed_calls(200, lambda i: logger.info("inference", extra={
        "model": "ranker", "latency_ms": 10 + i, "status": 200, "request_id": f"r{i}"}))
    assert slowest < 0.5, "the application thread waited on the network"
    assert handler.sender.sent == 0
    with TansuBroker(port=port) as broker:
        await wait_until(lambda: handler.sender.sent == 200, timeout=60, message="200 sent")
        records = await read_topic(broker.bootstrap, "inference", 200)
    assert len(records) == 200
    first = records[0]
    assert first["model"] == "ranker" and first["status"] == 200 and "timestamp" in first
    assert first["message"] == "inference"
    assert handler.dropped == 0


async def test_full_queue_drops_and_reports_once_the_broker_is_back(port: int) -> None:
    sender = KafkaSender(f"127.0.0.1:{port}", "inference", queue_size=50)
    try:
        accepted = [sender.submit(b'{"n": %d}' % i) for i in range(80)]
        assert accepted.count(False) == 30 and sender.dropped == 30
        with TansuBroker(port=port) as broker:
            await wait_until(lambda: sender.sent >= 50 and sender._dropped_reported == 30,
                             timeout=60, message="sent and drop reported")
            reports = await read_topic(broker.bootstrap, sender.drops_topic, 1)
        assert reports[0]["event"] == "eventpulse.logging.dropped"
        assert reports[0]["dropped"] == 30 and reports[0]["topic"] == "inference"
    finally:
        sender.close(1)


async def test_broker_restarted_mid_stream(port: int) -> None:
    """Tansu keeps nothing across a restart (real Kafka does): what is checked is that records
    logged while the broker was away are accepted at once, kept, and delivered after it is back.
    A slow reconnect gives the test time to re-create the topic first: Tansu acknowledges and
    discards records for a topic it does not have."""
    sender = KafkaSender(f"127.0.0.1:{port}", "events", producer_config={"retry_backoff_ms": 3000})
    broker = TansuBroker(port=port)
    try:
        broker.start()
        await create_topic(broker.bootstrap, "events")
        for i in range(50):
            sender.submit(json.dumps({"n": i}).encode())
        await wait_until(lambda: sender.sent == 50, timeout=60, message="first 50")
        broker.stop()
        accepted = [sender.submit(json.dumps({"n": i}).encode()) for i in range(50, 100)]
        assert all(accepted) and sender.dropped == 0
        await asyncio.sleep(1)
        broker.start()
        await create_topic(broker.bootstrap, "events")
        await wait_until(lambda: sender.sent == 100, timeout=90, message="the queued 50")
        got = {r["n"] for r in await read_topic(broker.bootstrap, "events", 50, timeout=10)}
        assert set(range(50, 100)) <= got, sorted(got)
    finally:
        broker.stop()
        sender.close(1)


async def test_log_event_and_dict_config(port: int) -> None:
    with TansuBroker(port=port) as broker:
        events = configure_events(broker.bootstrap, topic="events")
        token = request_id.set("req-42")
        try:
            assert log_event(action="click", user_id="u1", item_id="i9", device="ios")
        finally:
            request_id.reset(token)
        log_event(action="view", user_id="u2")
        events.sender.flush(10)
        got = {e["user_id"]: e for e in await read_topic(broker.bootstrap, "events", 2)}
        assert got["u1"]["request_id"] == "req-42" and got["u1"]["item_id"] == "i9"
        assert got["u2"]["request_id"] and got["u1"]["timestamp"].endswith("+00:00")

        name = unique("configured")
        logging.config.dictConfig({
            "version": 1, "disable_existing_loggers": False,
            "handlers": {"kafka": {"class": "eventpulse.logging.KafkaHandler",
                                   "bootstrap_servers": broker.bootstrap, "topic": "svc-logs"}},
            "loggers": {name: {"handlers": ["kafka"], "level": "INFO", "propagate": False}},
        })
        configured = logging.getLogger(name)
        configured.info("hello", extra={"user_id": "u7"})
        (handler,) = configured.handlers
        handler.flush()
        logs = await read_topic(broker.bootstrap, "svc-logs", 1)
        assert logs[0]["message"] == "hello" and logs[0]["user_id"] == "u7"
        configured.removeHandler(handler)
        handler.close()


def test_many_threads_never_raise_and_count_what_they_drop(port: int,
                                                          logger: logging.Logger) -> None:
    handler = KafkaHandler(f"127.0.0.1:{port}", topic="t", queue_size=1000)
    logger.addHandler(handler)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(2000):
                logger.info("x %d", i, extra={"unserialisable": object()})
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert handler.sender.pending + handler.dropped == 8000


async def test_the_example_inference_middleware_logs_each_request(
        port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import sys

    with TansuBroker(port=port) as broker:
        await create_topic(broker.bootstrap, "inference")
        monkeypatch.setenv("KAFKA_BOOTSTRAP", broker.bootstrap)
        sys.modules.pop("examples.inference_service", None)
        service = importlib.import_module("examples.inference_service")
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/recommend", "query_string": b"user=u5",
                 "headers": [(b"x-request-id", b"abc")]}
        await service.app(scope, receive, send)
        assert sent[0]["status"] == 200
        (handler,) = logging.getLogger("inference").handlers
        handler.flush()
        logs = await read_topic(broker.bootstrap, "inference", 1)
        assert logs[0]["model"] == "ranker" and logs[0]["status"] == 200
        assert logs[0]["request_id"] == "abc" and logs[0]["latency_ms"] >= 0
        logging.getLogger("inference").removeHandler(handler)
        handler.close()
