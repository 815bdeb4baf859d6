"""No single record stops a partition (issue 10): records far past the broker's default message
limit, a dead-letter topic that refuses every letter, and SIGTERM with the broker or Redis gone."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition, errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY

from eventpulse.agents.deadletters import DeadLetterProducer, DeadLetterStopped, failure_reason
from eventpulse.config import ConfigError, parse_config
from eventpulse.local.servers import LocalRedis, TansuBroker
from eventpulse.settings import SettingsError, load_settings
from eventpulse.streams.deadletter import DeadLetter, make_dead_letter
from eventpulse.streams.decode import DecodeError
from tests.conftest import WorkerProcess, unique, wait_until
from tests.test_ingestion import read_all

#: what the records of this test may weigh: the test producer must send them whole
PRODUCER_MAX_REQUEST = 32 * 1024 * 1024


def job(events: str, dead: str) -> dict[str, Any]:
    return {"topics": {events: "behaviour"}, "dead_letter_topic": dead, "partitions": 1,
            "features": [{"name": "n", "topic": events, "entity": "user", "key": "user_id",
                          "aggregation": "count", "window": {"size": "1h"}}]}


HOUR = 3_600_000


def hour_start() -> int:
    """Events of a test are stamped within the current hour, so one tumbling window holds them
    all and is read when it ends (a window is read once it is over)."""
    return int(time.time() * 1000) // HOUR * HOUR


def valid(i: int, base: int) -> bytes:
    return json.dumps({"timestamp": base + i, "user_id": "u1", "action": "view"}).encode()


def huge(size: int, now: int) -> bytes:
    """A well-formed event padded to ``size`` bytes: only its size is wrong."""
    head = json.dumps({"timestamp": now, "user_id": "u1", "action": "view", "pad": ""}).encode()
    return head[:-2] + b"p" * (size - len(head)) + head[-2:]


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False,
                                max_request_size=PRODUCER_MAX_REQUEST, linger_ms=5)
    await producer.start()
    try:
        for value in values:
            await (await producer.send(topic, value, partition=0))
    finally:
        await producer.stop()


async def applied_offset(redis_url: str, group: str, namespace: str = "ep") -> int:
    """The highest offset every shard's fence holds, over the group's partitions."""
    from eventpulse.tables.store import FeatureStore

    client = aioredis.Redis.from_url(redis_url)
    try:
        held = await FeatureStore(client, namespace, group).all_positions()
    finally:
        await client.aclose()
    return max((p.offset for p in held.values() if p is not None), default=-1)


async def reached(redis_url: str, group: str, offset: int, namespace: str = "ep") -> bool:
    return await applied_offset(redis_url, group, namespace) == offset


async def feature_count(redis_url: str, base: int, namespace: str = "ep") -> int:
    """Every valid record adds one to ``n`` of user u1 (the window is an hour)."""
    from eventpulse.tables.client import AsyncFeatureClient

    client = aioredis.Redis.from_url(redis_url)
    try:
        reader = AsyncFeatureClient(client, parse_config(job("e", "d")).features, namespace)
        got = await reader.get("user", "u1", ["n"], at_ms=base + HOUR)
        return int(got["n"].value or 0)
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_records_of_1_5_5_and_20_mb_are_dead_lettered_truncated_and_never_stop_a_worker(
        kafka: TansuBroker, redis_url: str, make_worker: Callable[..., WorkerProcess]) -> None:
    events, dead = unique("events"), unique("dead")
    now = hour_start()
    sizes = [1_500_000, 5_000_000, 20_000_000]
    stream: list[bytes] = []
    for i in range(30):
        stream.append(valid(i, now))
        if i % 10 == 5:
            stream.append(huge(sizes[i // 10 % 3], now))
    bigs = {len(v): v for v in stream if len(v) > 1_000_000}
    assert sorted(bigs) == sizes
    group = unique("poison")
    worker = make_worker(job(events, dead), group).start()
    await produce(kafka.bootstrap, events, stream)
    await wait_until(lambda: reached(redis_url, group, len(stream) - 1), timeout=120,
                     message="every record applied")
    assert await feature_count(redis_url, now) == 30
    assert worker.process is not None and worker.process.poll() is None, worker.log()

    letters = [DeadLetter.from_json(raw) for raw in await read_all(kafka.bootstrap, dead, 3)]
    assert len(letters) == 3, [(x.offset, x.original_bytes, x.refused_at_ms) for x in letters]
    for letter in letters:
        assert letter.reason == "too_large" and letter.payload_truncated
        assert letter.original_bytes is not None
        raw = bigs[letter.original_bytes]
        assert letter.payload_sha256 == hashlib.sha256(raw).hexdigest()
        kept = letter.payload()
        assert kept and raw.startswith(kept) and len(letter.to_json()) < 1_048_576
    assert "bounded to 1048576 bytes" in worker.log()
    assert f'eventpulse_dead_letters_total{{reason="too_large",topic="{events}"}} 3.0' in \
        worker.metrics()

    # a restarted worker (own group and namespace: it starts again at offset 0) gets past them too
    worker.stop()
    again = unique("poison-again")
    second = make_worker(job(events, dead), again, EVENTPULSE_REDIS_NAMESPACE="ep2").start()
    await wait_until(lambda: reached(redis_url, again, len(stream) - 1, "ep2"), timeout=120,
                     message="restarted worker applied everything")
    assert await feature_count(redis_url, now, "ep2") == 30
    assert second.process is not None and second.process.poll() is None, second.log()
    assert "Crashed" not in worker.log() + second.log()


async def test_a_dead_letter_topic_refusing_letters_for_good_does_not_stop_the_partition(
        kafka: TansuBroker, redis_url: str, make_worker: Callable[..., WorkerProcess]) -> None:
    """The dead-letter topic's max.message.bytes (300) is smaller than any letter: a Kafka
    broker would refuse each with MESSAGE_TOO_LARGE, which waiting cannot fix."""
    events, dead = unique("events"), unique("dead")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(dead, 1, 1, topic_configs={
            "max.message.bytes": "300"})])
    finally:
        await admin.close()
    now = hour_start()
    stream = [valid(0, now), b"not json", valid(1, now), b"", valid(2, now)]
    group = unique("refused")
    worker = make_worker(job(events, dead), group).start()
    await produce(kafka.bootstrap, events, stream)
    await wait_until(lambda: reached(redis_url, group, len(stream) - 1), timeout=60,
                     message="partition moved past the refused letters")
    assert await feature_count(redis_url, now) == 3
    metrics = worker.metrics()
    assert ('eventpulse_dead_letter_failures_total{reason="message_size_too_large"} 2.0'
            in metrics), metrics
    assert 'reason="empty"' in metrics and 'reason="not_json"' in metrics
    log = worker.log()
    assert f"dead letter for {events}[0]@1 (not_json) refused for good" in log
    assert f"dead letter for {events}[0]@3 (empty) refused for good" in log
    assert "bounded to 300 bytes" in log
    assert await topic_is_empty(kafka.bootstrap, dead)


async def topic_is_empty(bootstrap: str, topic: str) -> bool:
    """No record on any partition: a fetch from the start returns none, and the fetch's high
    watermark (not ListOffsets, which Tansu under-reports) is 0."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        await consumer.topics()  # loads the metadata
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        assert tps, f"no topic {topic}"
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        got = await consumer.getmany(timeout_ms=2000)
        return not any(got.values()) and all(consumer.highwater(tp) == 0 for tp in tps)
    finally:
        await consumer.stop()


SHUTDOWN_BOUND_S = 4.0


def exit_within(worker: WorkerProcess, bound_s: float) -> float:
    """SIGTERM, then seconds until the process is gone (fails past the bound plus start-up slack
    of the interpreter's exit)."""
    assert worker.process is not None and worker.process.poll() is None, worker.log()
    started = time.monotonic()
    worker.process.send_signal(signal.SIGTERM)
    try:
        worker.process.wait(bound_s + 5)
    except subprocess.TimeoutExpired:
        worker.kill()
        raise AssertionError(
            f"worker ignored SIGTERM for {bound_s + 5}s:\n{worker.log()[-3000:]}") from None
    return time.monotonic() - started


@pytest.mark.slow
async def test_sigterm_with_the_broker_gone_exits_within_the_bound(
        redis_url: str, make_worker: Callable[..., WorkerProcess]) -> None:
    with TansuBroker() as broker:
        events, dead = unique("events"), unique("dead")
        group = unique("nobroker")
        worker = make_worker(job(events, dead), group, EVENTPULSE_BROKER_URL=broker.url,
                             EVENTPULSE_STOP_TIMEOUT_S=str(SHUTDOWN_BOUND_S)).start()
        await produce(broker.bootstrap, events, [valid(0, hour_start())])
        await wait_until(lambda: reached(redis_url, group, 0), timeout=60,
                         message="worker running")
        broker.kill()
    time.sleep(1.0)  # the worker notices: fetches and heartbeats now fail
    exit_within(worker, SHUTDOWN_BOUND_S)
    assert worker.process is not None
    # leaving the group waits on the missing broker: the bound ends the process, and says so
    assert worker.process.returncode == 70, worker.log()[-3000:]
    assert "stop did not finish within" in worker.log()


@pytest.mark.slow
async def test_sigterm_with_redis_gone_exits_within_the_bound(
        kafka: TansuBroker, make_worker: Callable[..., WorkerProcess]) -> None:
    with LocalRedis() as private:
        events, dead = unique("events"), unique("dead")
        group = unique("noredis")
        worker = make_worker(job(events, dead), group, EVENTPULSE_REDIS_URL=private.url,
                             EVENTPULSE_STOP_TIMEOUT_S=str(SHUTDOWN_BOUND_S)).start()
        now = hour_start()
        await produce(kafka.bootstrap, events, [valid(0, now)])
        await wait_until(lambda: reached(private.url, group, 0), timeout=60,
                         message="worker running")
        private.kill()
        # a batch now waits on Redis, retrying
        await produce(kafka.bootstrap, events, [valid(1, now)])
        await wait_until(lambda: "unavailable (" in worker.log(), timeout=30,
                         message="the worker retrying Redis")
        exit_within(worker, SHUTDOWN_BOUND_S)


@pytest.mark.parametrize(("error", "reason"), [
    (errors.MessageSizeTooLargeError(), "message_size_too_large"),
    (errors.RecordListTooLargeError(), "record_list_too_large"),
    (errors.TopicAuthorizationFailedError(), "topic_authorization_failed"),
    (errors.InvalidTopicError(), "invalid_topic"),
    (errors.CorruptRecordException(), "corrupt_record"),
    (ValueError("a bug"), "value"),
    (errors.KafkaConnectionError(), None),
    (errors.KafkaTimeoutError(), None),
    (errors.RequestTimedOutError(), None),
    (errors.NotLeaderForPartitionError(), None),
    (errors.UnknownTopicOrPartitionError(), None),
    (ConnectionRefusedError(), None),
])
def test_dead_letter_failures_are_sorted_into_healing_and_not(error: BaseException,
                                                             reason: str | None) -> None:
    assert failure_reason(error) == reason


@pytest.mark.slow
async def test_a_dead_letter_waits_for_the_broker_to_come_back() -> None:
    """Broker unreachable can heal: ``send`` keeps trying and returns only once the letter is
    acknowledged (so the batch behind it waits, uncommitted), and stops trying on shutdown."""
    letter = make_dead_letter(DecodeError("not_json", "x"), b"{oops", "events", 0, 5)
    broker = TansuBroker().start()
    port = broker.port
    await create_topic(broker.bootstrap, "dlq")
    stopping = False
    sender = DeadLetterProducer([broker.bootstrap], "dlq", max_request_size=1_048_576,
                                topic_max_bytes=1_048_588, stopping=lambda: stopping,
                                request_timeout_ms=1500)
    await sender.start()
    try:
        broker.stop()
        before = retries()
        sending = asyncio.ensure_future(sender.send([("events", letter)]))
        await wait_until(lambda: sending.done() or retries() > before, timeout=30,
                         message="a retry while the broker is down")
        assert not sending.done()
        broker = TansuBroker(port=port).start()  # memory storage: the topic must be made again
        await create_topic(broker.bootstrap, "dlq")
        await asyncio.wait_for(sending, 60)
        got = await read_all(broker.bootstrap, "dlq", 1)
        assert [DeadLetter.from_json(raw).offset for raw in got] == [5]

        broker.stop()
        stopping = True
        with pytest.raises(DeadLetterStopped):
            await asyncio.wait_for(sender.send([("events", letter)]), 60)
    finally:
        broker.stop()
        await asyncio.wait_for(sender.stop(), 30)


def retries() -> float:
    return REGISTRY.get_sample_value("eventpulse_dead_letter_retries_total") or 0.0


async def create_topic(bootstrap: str, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()


async def test_a_letter_over_the_producers_own_limit_is_refused_by_aiokafka_and_passed(
        kafka: TansuBroker) -> None:
    """The producer-side refusal (aiokafka's own MessageSizeTooLargeError, as in issue 10's
    crash): ``send`` returns, counting it, instead of raising into the worker."""
    letter = make_dead_letter(DecodeError("not_json", "x" * 900), b"{" * 5000, "events", 0, 9)
    dead = unique("dead")
    await create_topic(kafka.bootstrap, dead)
    # below the 4096 bytes settings allow: even a payload-less letter cannot fit
    sender = DeadLetterProducer([kafka.bootstrap], dead, max_request_size=600,
                                topic_max_bytes=1_048_588)
    await sender.start()
    label = {"reason": "message_size_too_large"}
    before = REGISTRY.get_sample_value("eventpulse_dead_letter_failures_total", label) or 0.0
    try:
        await asyncio.wait_for(sender.send([("events", letter)]), 30)
    finally:
        await sender.stop()
    assert REGISTRY.get_sample_value("eventpulse_dead_letter_failures_total", label) == before + 1
    assert await topic_is_empty(kafka.bootstrap, dead)


def test_limits_are_validated_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every limit of this path is checked before anything runs, naming the field."""
    for name in ("bad topic!", "x" * 250, ".."):
        with pytest.raises(ConfigError, match=r"dead_letter_topic: .*(legal Kafka topic name|"
                                              r"not allowed)"):
            parse_config({"dead_letter_topic": name})
    with pytest.raises(ConfigError, match=r"limits\.dead_letter_max_bytes"):
        parse_config({"limits": {"dead_letter_max_bytes": 1000}})
    with pytest.raises(ConfigError, match=r"limits\.max_key_bytes"):
        parse_config({"limits": {"max_key_bytes": 4}})
    monkeypatch.setenv("EVENTPULSE_DEAD_LETTER_MAX_REQUEST_SIZE", "1000")
    monkeypatch.setenv("EVENTPULSE_STOP_TIMEOUT_S", "0")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert "EVENTPULSE_DEAD_LETTER_MAX_REQUEST_SIZE" in str(err.value)
    assert "EVENTPULSE_STOP_TIMEOUT_S" in str(err.value)
    monkeypatch.setenv("EVENTPULSE_DEAD_LETTER_MAX_REQUEST_SIZE", "8388608")
    monkeypatch.setenv("EVENTPULSE_STOP_TIMEOUT_S", "2.5")
    settings = load_settings()
    assert (settings.dead_letter_max_request_size, settings.stop_timeout_s) == (8388608, 2.5)
