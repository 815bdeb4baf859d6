"""A mixed stream through the running worker: features equal those of the valid records only,
every invalid record is in the dead-letter topic with its reason and origin, private fields never
reach Redis, dead letters or logs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from eventpulse.config import parse_config
from eventpulse.local.servers import TansuBroker
from eventpulse.streams.deadletter import DeadLetter
from eventpulse.tables.client import AsyncFeatureClient
from eventpulse.tables.store import FeatureStore
from tests.conftest import WorkerProcess, produce, unique, wait_until
from tests.oracle import Oracle

SECRET = "pr1vacy-s3cret-value"


def job(events: str, dead: str) -> dict[str, Any]:
    return {
        "topics": {events: "behaviour"}, "dead_letter_topic": dead, "partitions": 2,
        "privacy": {events: {"drop": ["email"], "hash": ["ip"]}},
        "limits": {"max_bytes": 2048, "max_depth": 4},
        "features": [
            {"name": "events_1m", "topic": events, "entity": "user", "key": "user_id",
             "aggregation": "count", "window": {"size": "1m", "lateness": "1h"}},
            {"name": "distinct_ips", "topic": events, "entity": "user", "key": "user_id",
             "aggregation": "distinct", "value": "ip", "window": {"size": "1m", "lateness": "1h"}},
        ],
    }


def mixed_stream(now: int) -> tuple[list[dict[str, Any]], list[tuple[bytes, str]]]:
    valid = [{"timestamp": now - 120_000 + i * 100, "user_id": f"u{i % 7}", "action": "view",
              "email": f"person{i}@example.com", "ip": f"10.0.0.{i % 3}"} for i in range(300)]
    good = json.loads(json.dumps(valid[0]))
    invalid: list[tuple[bytes, str]] = [
        (b"not json at all", "not_json"),
        (b"\xff\xfe\x00garbage", "not_utf8"),
        (b"[1, 2, 3]", "not_object"),
        (json.dumps({**good, "user_id": 42}).encode(), "schema"),
        (json.dumps({**good, "score": float("nan")}).encode(), "non_finite"),
        (json.dumps({k: v for k, v in good.items() if k != "timestamp"}).encode(),
         "missing_timestamp"),
        (json.dumps({**good, "timestamp": now - 30 * 86_400_000}).encode(), "timestamp_too_old"),
        (json.dumps({**good, "timestamp": now + 86_400_000}).encode(), "timestamp_in_future"),
        (json.dumps({**good, "blob": "x" * 3000}).encode(), "too_large"),
        (json.dumps({**good, "deep": [[[[[[1]]]]]]}).encode(), "too_deep"),
    ]
    return valid, invalid


async def read_all(bootstrap: str, topic: str, expect: int) -> list[Any]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest")
    await consumer.start()
    out: list[Any] = []
    deadline = time.monotonic() + 60
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                out += [m.value for m in messages]
    finally:
        await consumer.stop()
    return out


async def test_mixed_stream_valid_counted_invalid_dead_lettered_private_fields_gone(
        kafka: TansuBroker, redis_url: str, make_worker: Callable[..., WorkerProcess]) -> None:
    events, dead = unique("events"), unique("dead")
    config = job(events, dead)
    worker = make_worker(config, unique("ingest"), EVENTPULSE_PRIVACY_SECRET=SECRET).start()
    now = int(time.time() * 1000)
    valid, invalid = mixed_stream(now)
    # interleave: the bad records sit between good ones on the same partition
    stream: list[bytes] = []
    for i, record in enumerate(valid):
        stream.append(json.dumps(record).encode())
        if i % 30 == 0 and invalid[i // 30:]:
            stream.append(invalid[i // 30][0])
    await produce(kafka.bootstrap, events, stream, partition=lambda r: 0)

    letters = [DeadLetter.from_json(raw) for raw in await read_all(kafka.bootstrap, dead,
                                                                   len(invalid))]
    assert sorted(letter.reason for letter in letters) == sorted(r for _, r in invalid)
    for letter in letters:
        assert letter.topic == events and letter.partition == 0 and letter.offset >= 0
        assert letter.detail
        payload = letter.payload()
        assert payload is None or b"@example.com" not in payload  # scrubbed before dead letters
    by_offset = {letter.offset: letter for letter in letters}
    assert len(by_offset) == len(invalid), "one dead letter per refused record"

    job_config = parse_config(config)
    oracle = Oracle(job_config.features)
    oracle.feed(events, ((0, i, r) for i, r in enumerate(valid)))
    client = aioredis.Redis.from_url(redis_url)
    reader = AsyncFeatureClient(client, job_config.features, "ep")
    spec = job_config.features[0]

    async def all_applied() -> bool:
        store = FeatureStore(client, "ep", worker.env["EVENTPULSE_CONSUMER_GROUP"])
        held = (await store.positions([f"{events}:0"]))[f"{events}:0"]
        return held is not None and held.offset == len(stream) - 1

    await wait_until(all_applied, timeout=60, message="every record applied")
    for user in sorted(oracle.entities(spec)):
        for end in oracle.live_windows(spec, user):
            got = await reader.get("user", user, ["events_1m", "distinct_ips"], at_ms=end)
            assert got["events_1m"].value == oracle.value(spec, user, end)
            assert got["distinct_ips"].value <= 3
    dump = b"".join([k + v for key in await client.keys("ep:*") if await client.type(key) == b"hash"
                     for k, v in (await client.hgetall(key)).items()])
    assert b"example.com" not in dump and b"10.0.0." not in dump
    await client.aclose()
    assert "example.com" not in worker.log() and SECRET not in worker.log()
    metrics = worker.metrics()
    assert f'eventpulse_dead_letters_total{{reason="too_deep",topic="{events}"}} 1.0' in metrics

    tail = subprocess.run([sys.executable, "-m", "eventpulse", "dead-letters", "tail", "-n", "3"],
                          env=worker.env, capture_output=True, text=True, timeout=60)
    assert tail.returncode == 0, tail.stderr
    lines = [line for line in tail.stdout.splitlines() if f"{events}[0]@" in line]
    assert len(lines) == 3 and all(":" in line for line in lines)
