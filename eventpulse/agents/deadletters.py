"""Producing dead letters so that no refused record, and no failed dead letter, stops a partition.

Two rules, from issue 10 (a 2 MB record whose letter was too large crashed the worker on every
restart):

* a letter is bounded before it is sent: never larger than the dead-letter topic's
  ``max.message.bytes`` (read from the broker at start-up) nor the producer's
  ``max_request_size`` (``EVENTPULSE_DEAD_LETTER_MAX_REQUEST_SIZE``);
* a produce that fails is classified. One that cannot heal by waiting (the broker refuses this
  letter or this topic for good) is logged with the record's topic/partition/offset, counted in
  ``eventpulse_dead_letter_failures_total{reason}``, and the partition moves on. One that can heal
  (broker unreachable, timeouts, leader moving) is retried, with backoff, for as long as it takes:
  the batch, and so its offsets, waits, and nothing is committed past the refused record.

The lists below are the documented decision (docs/configuration.md, "Dead letters").
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NodeNotReadyError,
    ProducerClosed,
    RequestTimedOutError,
)

from eventpulse import metrics
from eventpulse.agents.reachable import until_reachable
from eventpulse.streams.deadletter import KAFKA_FRAMING_BYTES, DeadLetter

log = logging.getLogger("eventpulse.agents.deadletters")

#: Errors that pass with time: the broker is down or busy, a leader is moving, metadata is stale.
#: Any aiokafka error marked ``retriable`` is taken as healing too.
HEALING: tuple[type[BaseException], ...] = (
    KafkaConnectionError, KafkaTimeoutError, RequestTimedOutError, NodeNotReadyError,
    ConnectionError, TimeoutError,
)


def failure_reason(exc: BaseException) -> str | None:
    """None if waiting can fix ``exc``; else the metric label of a failure that cannot heal.

    Not healing: every other Kafka error (``MessageSizeTooLargeError``, ``RecordListTooLargeError``,
    ``TopicAuthorizationFailedError``, ``ClusterAuthorizationFailedError``, ``InvalidTopicError``,
    ``CorruptRecordException``, ``InvalidTimestampError``, ``PolicyViolationError``,
    ``UnsupportedVersionError``...) and any other exception: retrying those would stop the
    partition for good, which is the one outcome this module exists to prevent.
    """
    if isinstance(exc, HEALING) or (isinstance(exc, KafkaError) and exc.retriable):
        return None
    name = type(exc).__name__.removesuffix("Error").removesuffix("Exception")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() or "unknown"


class DeadLetterStopped(Exception):
    """The worker stops while a dead letter still waits for the broker: the batch is abandoned
    uncommitted, and the next owner of the partition refuses (and dead-letters) it again."""


class DeadLetterProducer:
    """Sends dead letters, bounded and with failures classified (see the module doc)."""

    def __init__(self, bootstrap: Sequence[str], topic: str, *, max_request_size: int,
                 topic_max_bytes: int, stopping: Callable[[], bool] = lambda: False,
                 retry_max_s: float = 5.0, request_timeout_ms: int = 30_000,
                 kafka_options: dict[str, Any] | None = None) -> None:
        self.bootstrap = list(bootstrap)
        #: TLS / SASL options (eventpulse.connections)
        self.kafka_options = kafka_options or {}
        self.topic = topic
        self.max_request_size = max_request_size
        #: assumed until the broker tells the topic's own max.message.bytes at start()
        self.topic_max_bytes = topic_max_bytes
        self.stopping = stopping
        self.retry_max_s = retry_max_s
        self.request_timeout_ms = request_timeout_ms
        self.producer: AIOKafkaProducer | None = None

    @property
    def max_bytes(self) -> int:
        """The bound every letter is cut to."""
        return min(self.topic_max_bytes, self.max_request_size)

    async def start(self) -> None:
        """Wait for the broker (as the consumer does), then read the topic's own limit."""
        self.producer = await until_reachable(self._start_producer, self.bootstrap,
                                              "dead-letter producer", self.stopping)
        try:
            reported = await topic_max_message_bytes(self.bootstrap, self.topic,
                                                     self.kafka_options)
        except KafkaError as exc:  # e.g. DescribeConfigs not allowed for this client
            log.warning("cannot read max.message.bytes of %s (%r)", self.topic, exc)
            reported = None
        if reported is not None:
            self.topic_max_bytes = reported
        log.info("dead letters to %s bounded to %d bytes (topic max.message.bytes=%d%s, "
                 "producer max_request_size=%d)", self.topic, self.max_bytes, self.topic_max_bytes,
                 "" if reported is not None else " assumed: not reported by the broker",
                 self.max_request_size)

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5,
                                    enable_idempotence=False,
                                    max_request_size=self.max_request_size,
                                    request_timeout_ms=self.request_timeout_ms,
                                    **self.kafka_options)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()  # a half-started client cannot be restarted: a new one per try
            raise
        return producer

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    async def send(self, letters: Sequence[tuple[str, DeadLetter]]) -> None:
        """Return once each letter is acknowledged or has failed for a reason that cannot heal."""
        pending = [letter.bounded(self.max_bytes) for _, letter in letters]
        delay = 0.2
        while pending:
            outcomes = await asyncio.gather(*(self._send_one(letter) for letter in pending),
                                            return_exceptions=True)
            retry: list[DeadLetter] = []
            for letter, outcome in zip(pending, outcomes, strict=True):
                if isinstance(outcome, asyncio.CancelledError):
                    raise outcome
                if isinstance(outcome, ProducerClosed):  # stopping: never drop a letter for it
                    raise DeadLetterStopped("the dead-letter producer is closed") from outcome
                if not isinstance(outcome, BaseException):
                    continue
                reason = failure_reason(outcome)
                if reason is None:
                    retry.append(letter)
                    continue
                metrics.DEAD_LETTER_FAILURES.labels(reason).inc()
                log.error("dead letter for %s[%d]@%d (%s) refused for good by %s: %s: %s; moving on",
                          letter.topic, letter.partition, letter.offset, letter.reason, self.topic,
                          type(outcome).__name__, outcome)
            pending = retry
            if pending:
                if self.stopping():
                    raise DeadLetterStopped(f"{len(pending)} dead letters not sent")
                metrics.DEAD_LETTER_RETRIES.inc(len(pending))
                log.warning("%d dead letters not accepted by %s yet; retrying in %.1fs",
                            len(pending), self.topic, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)

    async def _send_one(self, letter: DeadLetter) -> None:
        producer = self.producer
        if producer is None:
            raise ProducerClosed()
        value = letter.to_json()
        if len(value) + KAFKA_FRAMING_BYTES > self.topic_max_bytes:
            # what a Kafka broker answers for this topic (Tansu stores but does not enforce it)
            raise MessageSizeTooLargeError(
                f"the letter is {len(value)} bytes, over the topic's max.message.bytes "
                f"({self.topic_max_bytes})")
        future = await producer.send(self.topic, value,
                                     key=f"{letter.topic}:{letter.partition}".encode())
        await future


async def topic_max_message_bytes(bootstrap: Sequence[str], topic: str,
                                  kafka_options: dict[str, Any] | None = None) -> int | None:
    """The topic's ``max.message.bytes`` as the broker reports it, or None if it does not."""
    admin = AIOKafkaAdminClient(bootstrap_servers=list(bootstrap), **(kafka_options or {}))
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    for response in responses:
        for resource in response.resources:
            for entry in resource[4]:
                if entry[0] == "max.message.bytes" and entry[1] is not None:
                    return int(entry[1])
    return None
