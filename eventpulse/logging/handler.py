"""``KafkaHandler``: a ``logging.Handler`` that formats records as JSON and queues them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from eventpulse.logging.sender import SELF_LOGGERS, KafkaSender


class KafkaHandler(logging.Handler):
    """Usable from ``logging.config.dictConfig``::

        handlers:
          kafka:
            class: eventpulse.logging.KafkaHandler
            bootstrap_servers: kafka-1:9092,kafka-2:9092
            topic: inference

    ``extra=`` fields become top-level JSON fields, and ``timestamp`` is set, so that
    ``logger.info("inference", extra={"model": "ranker", "latency_ms": 12.5, "status": 200})``
    is an inference log eventpulse accepts. ``key_field`` names an extra field whose value keys
    the Kafka message (e.g. ``model``), keeping one series on one partition.
    """

    def __init__(self, bootstrap_servers: str | Sequence[str], topic: str, *,
                 key_field: str | None = None, queue_size: int = 10_000,
                 flush_timeout: float = 5.0, level: int | str = logging.NOTSET,
                 **sender_options: Any) -> None:
        super().__init__(level)
        self.sender = KafkaSender(bootstrap_servers, topic, queue_size=queue_size,
                                  **sender_options)
        self.key_field = key_field
        self.flush_timeout = flush_timeout
        self.setFormatter(JsonFormatter(timestamp=True))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.name.startswith(SELF_LOGGERS) or (
                    threading.get_ident() == self.sender.thread_id):
                return  # the Kafka client's own logs would feed back into it
            payload = self.format(record).encode()
            key = None
            if self.key_field is not None:
                value = getattr(record, self.key_field, None)
                key = None if value is None else str(value).encode()
            self.sender.submit(payload, key)
        except Exception:  # never into the application
            self.sender.count_drop()

    @property
    def dropped(self) -> int:
        return self.sender.dropped

    def flush(self) -> None:
        self.sender.flush(self.flush_timeout)

    def close(self) -> None:
        try:
            self.sender.close(self.flush_timeout)
        finally:
            super().close()
