"""Realistic sample traffic for the demo: users browsing items, two models serving, three hosts.

The script has a story, so the demo has something to show within a minute: the ``ranker`` model's
error rate spikes between 10 s and 35 s, and host ``web-2``'s disk fills past 90% from about 15 s
and is cleaned up at 45 s.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer

USERS = [f"u{i}" for i in range(1, 51)]
ITEMS = [f"i{i}" for i in range(1, 21)]
MODELS = ["ranker", "search"]
HOSTS = ["web-1", "web-2", "web-3"]
DEVICES = ["ios", "android", "web"]
ACTIONS = ["view", "view", "view", "click", "click", "swipe", "watch"]


@dataclass
class Story:
    error_spike: tuple[float, float] = (10.0, 35.0)
    disk_fill: tuple[float, float] = (5.0, 45.0)

    def error_probability(self, t: float, model: str) -> float:
        start, end = self.error_spike
        return 0.3 if model == "ranker" and start <= t < end else 0.01

    def disk_percent(self, t: float, host: str) -> float:
        if host != "web-2":
            return 60.0 + HOSTS.index(host) * 5
        start, end = self.disk_fill
        if t < start or t >= end:
            return 70.0
        return min(97.0, 80.0 + (t - start) * 1.0)


def second_of_traffic(t: float, rng: random.Random, story: Story, now_ms: int,
                      events_per_s: int = 200, calls_per_s: int = 100,
                      ) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(topic, key, record) for one second of the story at ``t`` seconds."""
    for _ in range(events_per_s):
        user, item = rng.choice(USERS[:10] if rng.random() < 0.5 else USERS), rng.choice(ITEMS)
        action = rng.choice(ACTIONS)
        event: dict[str, Any] = {
            "timestamp": now_ms - rng.randint(0, 900), "user_id": user, "item_id": item,
            "action": action, "device": rng.choice(DEVICES), "session_id": f"s-{user}",
        }
        if action == "watch":
            event["watch_seconds"] = round(rng.uniform(5, 600), 1)
        yield "events", user, event
    for _ in range(calls_per_s):
        model = rng.choice(MODELS)
        failed = rng.random() < story.error_probability(t, model)
        yield "inference", model, {
            "timestamp": now_ms - rng.randint(0, 900), "model": model, "model_version": "3.1",
            "request_id": f"r{rng.getrandbits(40):x}", "status": 503 if failed else 200,
            "latency_ms": round(rng.lognormvariate(3.5, 0.5) * (4 if failed else 1), 2),
        }
    for host in HOSTS:
        yield "metrics", host, {"timestamp": now_ms, "name": "disk_used_percent",
                                "value": story.disk_percent(t, host),
                                "labels": {"host": host, "mount": "/"}}
        yield "metrics", host, {"timestamp": now_ms, "name": "cpu_percent",
                                "value": round(rng.uniform(10, 70), 1), "labels": {"host": host}}


async def produce_story(bootstrap: str, duration_s: float, story: Story | None = None,
                        seed: int = 7, kafka_options: dict[str, Any] | None = None) -> int:
    """Send the story in real time; returns how many records were sent. ``kafka_options``:
    TLS / SASL (eventpulse.connections.kafka_options)."""
    story = story or Story()
    rng = random.Random(seed)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                enable_idempotence=False, **(kafka_options or {}))
    await producer.start()
    sent = 0
    started = time.monotonic()
    try:
        while (t := time.monotonic() - started) < duration_s:
            now_ms = int(time.time() * 1000)
            for topic, key, record in second_of_traffic(t, rng, story, now_ms):
                await producer.send(topic, json.dumps(record).encode(), key=key.encode())
                sent += 1
            await producer.flush()
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started - t)))
    finally:
        await producer.stop()
    return sent
