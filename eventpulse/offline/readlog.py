"""Log a sample of served feature reads to Kafka, for the consistency report.

Sampling is by a hash of the entity id (CRC-32, the same in every language), so an entity is
either always or never logged: its reads over time can be compared as a series. The send never
blocks or raises in the model server: it goes through :class:`eventpulse.logging.sender.
KafkaSender`'s bounded queue and background thread.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence
from typing import Any

from eventpulse.logging.sender import KafkaSender
from eventpulse.tables.client import AsyncFeatureClient, FeatureClient, FeatureValue

log = logging.getLogger("eventpulse.readlog")

DEFAULT_TOPIC = "eventpulse-feature-reads"


def sampled(entity_id: str, share: float) -> bool:
    """Is this entity in the logged share? (CRC-32 of its id, below ``share`` of 2**32)"""
    return zlib.crc32(entity_id.encode()) < share * 2**32


def read_record(entity: str, entity_id: str, at_ms: int,
                values: dict[str, FeatureValue]) -> dict[str, Any]:
    """The ``feature_read`` record of one entity's read."""
    return {"timestamp": at_ms, "entity": entity, "entity_id": entity_id, "values": {
        name: {"value": v.value, "status": v.status, "newest_event_ms": v.newest_event_ms,
               "event_count": v.event_count} for name, v in values.items()}}


class ServedReadLog:
    """A ``FeatureClient.on_read`` hook: sampled reads, one record per entity, to a topic."""

    def __init__(self, bootstrap_servers: str | Sequence[str], topic: str = DEFAULT_TOPIC,
                 share: float = 0.01, sender: KafkaSender | None = None) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, got {share}")
        self.share = share
        self.sender = sender or KafkaSender(bootstrap_servers, topic)

    def __call__(self, entity: str, ids: list[str], at_ms: int,
                 values: dict[str, dict[str, FeatureValue]]) -> None:
        for entity_id in ids:
            if sampled(entity_id, self.share):
                record = read_record(entity, entity_id, at_ms, values[entity_id])
                try:  # a value JSON has no form for (bytes a foreign writer left): as text
                    text = json.dumps(record, default=repr, allow_nan=False)
                except ValueError:  # NaN or infinity: never served by eventpulse's writers
                    log.warning("served read of %s %s not logged: a value JSON cannot hold",
                                entity, entity_id)
                    continue
                self.sender.submit(text.encode(), entity_id.encode())

    def attach(self, client: FeatureClient | AsyncFeatureClient) -> None:
        client.on_read = self

    def close(self, timeout: float = 5.0) -> None:
        self.sender.close(timeout)
