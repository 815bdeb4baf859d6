"""A bounded queue and one background thread that ships JSON messages to a Kafka topic.

The application thread only appends to a deque: never a network call, never a lock held across
I/O, never an exception. When the broker is away the sender keeps its current batch and retries,
the queue fills, further messages are dropped and counted, and once the broker is back a single
``eventpulse.logging.dropped`` record says how many were lost and since when.

This module imports nothing of the eventpulse worker: services depend on it alone.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from eventpulse.logging.security import (
    CREDENTIALS_IN_ADDRESS,
    KafkaSecurity,
    connection_errors,
    has_credentials,
)

#: Where drop reports go: not the data topic, whose consumers expect records of its kind.
DROPS_TOPIC = "eventpulse-producer-drops"

#: Loggers whose records are never shipped: ours and the Kafka client's (that would loop).
SELF_LOGGERS = ("aiokafka", "kafka", "eventpulse.logging")


class KafkaSender:
    """Thread-safe, non-blocking ``submit``; a daemon thread does the sending.

    ``security``: TLS / SASL of the producer, a :class:`KafkaSecurity` or a mapping of its
    fields (from ``dictConfig``); without it, the ``EVENTPULSE_KAFKA_*`` environment variables
    the worker reads (PLAINTEXT when none is set). Inconsistent settings raise here, at
    configuration time, never later from a logging call.
    """

    def __init__(self, bootstrap_servers: str | Sequence[str], topic: str, *,
                 queue_size: int = 10_000, batch_size: int = 500, linger_ms: int = 20,
                 request_timeout_ms: int = 5_000, producer_config: dict[str, Any] | None = None,
                 drops_topic: str = DROPS_TOPIC,
                 security: KafkaSecurity | Mapping[str, Any] | None = None) -> None:
        if isinstance(bootstrap_servers, str):
            bootstrap_servers = [s.strip() for s in bootstrap_servers.split(",") if s.strip()]
        self.bootstrap_servers = [s.split("://", 1)[-1] for s in bootstrap_servers]
        if any(has_credentials(server) for server in self.bootstrap_servers):
            raise ValueError(f"{CREDENTIALS_IN_ADDRESS}: give them as security="
                             "{'sasl_username': ..., 'sasl_password': ...} or the "
                             "EVENTPULSE_KAFKA_SASL_* variables")
        self.topic = topic
        self.drops_topic = drops_topic
        self.queue_size = queue_size
        self.batch_size = batch_size
        if security is None:
            security = KafkaSecurity.from_env()
        elif not isinstance(security, KafkaSecurity):
            security = KafkaSecurity(**security)
        self.security = security
        self.producer_config = {"linger_ms": linger_ms, "request_timeout_ms": request_timeout_ms,
                                "enable_idempotence": False, "acks": 1,
                                **security.client_options(), **(producer_config or {})}
        self._queue: collections.deque[tuple[bytes | None, bytes]] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drop_lock = threading.Lock()
        self.sent = 0
        self.dropped = 0
        self._dropped_reported = 0
        self._first_drop_ms: int | None = None
        self._thread = threading.Thread(target=self._thread_main, name="eventpulse-kafka-sender",
                                        daemon=True)
        self._thread.start()

    @property
    def thread_id(self) -> int | None:
        return self._thread.ident

    def submit(self, value: bytes, key: bytes | None = None) -> bool:
        """Queue one message; False (and counted) when the queue is full. Never blocks."""
        if self._stop.is_set() or len(self._queue) >= self.queue_size:
            self.count_drop()
            return False
        self._queue.append((key, value))
        if len(self._queue) >= self.batch_size:
            self._wake.set()
        return True

    def count_drop(self, count: int = 1) -> None:
        with self._drop_lock:  # += is not atomic across threads
            self.dropped += count
            if self._first_drop_ms is None:
                self._first_drop_ms = int(time.time() * 1000)

    @property
    def pending(self) -> int:
        """Queued or being sent."""
        return len(self._queue) + self._in_flight

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far was sent (True) or ``timeout`` passed (False)."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while self.pending:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Flush within ``timeout``, then stop; what is still queued is counted as dropped."""
        self.flush(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=max(1.0, timeout))
        left = self.pending
        if left:
            self.count_drop(left)
            self._queue.clear()
            sys.stderr.write(f"eventpulse.logging: {left} records not sent before shutdown\n")

    # -- the sender thread -------------------------------------------------------------------
    _in_flight = 0

    def _thread_main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer: AIOKafkaProducer | None = None
        batch: list[tuple[bytes | None, bytes]] = []
        backoff = 0.1
        failing = False
        while True:
            if not batch:
                while self._queue and len(batch) < self.batch_size:
                    batch.append(self._queue.popleft())
                self._in_flight = len(batch)
            if not batch:
                if self._stop.is_set():
                    break
                # a short sleep, not an executor wait: the interpreter may be shutting down
                if not self._wake.is_set():
                    await asyncio.sleep(0.02)
                self._wake.clear()
                continue
            try:
                if producer is None:
                    producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers,
                                                **self.producer_config)
                    await producer.start()
                futures = [await producer.send(self.topic, value, key=key) for key, value in batch]
                await asyncio.gather(*futures)
                self.sent += len(batch)
                failing = False
                batch = []
                self._in_flight = 0
                backoff = 0.1
                await self._report_drops(producer)
            except Exception as exc:  # broker away: keep the batch, retry; the queue absorbs the rest
                if not failing:  # once per outage: a wrong password or CA must not be silent
                    failing = True
                    await self._report_failure(exc)
                if producer is not None:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    producer = None
                if self._stop.is_set():
                    break
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _report_failure(self, exc: Exception) -> None:
        """One stderr line saying why (the producer itself only says it could not bootstrap)."""
        reasons = [f"{type(exc).__name__}: {exc}"]
        with contextlib.suppress(Exception):
            options = {k: v for k, v in self.producer_config.items()
                       if k.startswith(("security_", "ssl_", "sasl_"))}
            found = await connection_errors(self.bootstrap_servers, options, 5.0)
            if found:
                reasons = [f"{server}: {type(e).__name__}: {e}" for server, e in found]
        sys.stderr.write(f"eventpulse.logging: cannot send to {self.topic} ({'; '.join(reasons)});"
                         " retrying; records queue, and are counted as dropped once the queue is "
                         "full\n")

    async def _report_drops(self, producer: Any) -> None:
        dropped = self.dropped
        if dropped <= self._dropped_reported:
            return
        report = {"timestamp": int(time.time() * 1000), "event": "eventpulse.logging.dropped",
                  "dropped": dropped - self._dropped_reported, "dropped_total": dropped,
                  "first_drop_ms": self._first_drop_ms, "topic": self.topic}
        await producer.send_and_wait(self.drops_topic, json.dumps(report).encode())
        sys.stderr.write(f"eventpulse.logging: {report['dropped']} records to {self.topic} were "
                         "dropped while the broker was unreachable\n")
        self._dropped_reported = dropped
        self._first_drop_ms = None
