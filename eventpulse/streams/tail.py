"""``eventpulse dead-letters tail``: the newest refused records, readable."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from eventpulse.streams.deadletter import DeadLetter


def describe(letter: DeadLetter) -> str:
    when = datetime.fromtimestamp(letter.refused_at_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    payload = letter.payload()
    shown = "<withheld>" if payload is None else payload[:200].decode("utf-8", "replace")
    cut = (f" (payload truncated: {letter.payload_bytes} bytes, sha256 {letter.payload_sha256})"
           if letter.payload_truncated else "")
    return (f"{when} {letter.topic}[{letter.partition}]@{letter.offset} {letter.reason}: "
            f"{letter.detail}{cut}\n    {shown!r}")


async def tail(bootstrap: list[str], topic: str, count: int, follow: bool,
               echo: Callable[[str], None], idle_s: float = 1.0,
               kafka_options: dict[str, Any] | None = None) -> None:
    """Read the topic from the start (no consumer group, nothing committed), keep the last
    ``count``, print them; with ``follow`` keep printing new ones until interrupted."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                group_id=None, **(kafka_options or {}))
    try:
        await consumer.start()
        if topic in await consumer.topics():  # also loads the metadata
            partitions = consumer.partitions_for_topic(topic) or set()
        else:
            partitions = set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            echo(f"no dead-letter topic {topic!r} yet")
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        recent: deque[DeadLetter] = deque(maxlen=count)
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000))
            if not batch:
                break
            for messages in batch.values():
                recent.extend(DeadLetter.from_json(m.value) for m in messages)
        for letter in sorted(recent, key=lambda d: d.refused_at_ms):
            echo(describe(letter))
        while follow:
            batch = await consumer.getmany(timeout_ms=1000)
            for messages in batch.values():
                for message in messages:
                    echo(describe(DeadLetter.from_json(message.value)))
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
