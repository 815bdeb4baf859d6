"""Log a sample of served feature reads to Kafka, for the consistency report.

Sampling is by a hash of the entity id (CRC-32, the same in every language), so an entity is
either always or never logged: its reads over time can be compared as a series. The send never
blocks or raises in the model server: it goes through :class:`eventpulse.logging.sender.
KafkaSender`'s bounded queue and background thread.

A logged read also says which records its values hold: the offsets the worker had applied to the
entity's fence shard, per partition, read with the entity (``applied``;
:class:`~eventpulse.tables.client.AppliedReads`). The consistency report recomputes a read that
differs with exactly those records, so a worker that had applied one partition further than
another is told from a bug (docs/archive.md).
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Sequence
from typing import Any

from eventpulse.logging.sender import KafkaSender
from eventpulse.tables.client import (
    Applied,
    AppliedReads,
    AsyncFeatureClient,
    FeatureClient,
    FeatureValue,
)

log = logging.getLogger("eventpulse.readlog")

DEFAULT_TOPIC = "eventpulse-feature-reads"
#: the worker's consumer group unless told otherwise (``EVENTPULSE_CONSUMER_GROUP``'s default)
DEFAULT_GROUP = "eventpulse"


def sampled(entity_id: str, share: float) -> bool:
    """Is this entity in the logged share? (CRC-32 of its id, below ``share`` of 2**32)"""
    return zlib.crc32(entity_id.encode()) < share * 2**32


def read_record(entity: str, entity_id: str, at_ms: int, values: dict[str, FeatureValue],
                applied: dict[str, tuple[int, int]] | None = None,
                served_ms: int | None = None) -> dict[str, Any]:
    """The ``feature_read`` record of one entity's read (``applied``: its fence's offsets,
    per partition, when the read began and ended; ``served_ms``: when it returned, which for
    a read of a past ``at_ms`` says when the windows it read were held)."""
    record: dict[str, Any] = {
        "timestamp": at_ms, "entity": entity, "entity_id": entity_id, "values": {
            name: {"value": v.value, "status": v.status, "newest_event_ms": v.newest_event_ms,
                   "event_count": v.event_count} for name, v in values.items()}}
    if served_ms is not None:
        record["served_ms"] = served_ms
    if applied is not None:
        record["applied"] = {tp: list(offsets) for tp, offsets in applied.items()}
    return record


class ServedReadLog:
    """A ``FeatureClient.on_read`` hook: sampled reads, one record per entity, to a topic."""

    def __init__(self, bootstrap_servers: str | Sequence[str], topic: str = DEFAULT_TOPIC,
                 share: float = 0.01, sender: KafkaSender | None = None,
                 group: str = DEFAULT_GROUP) -> None:
        """``group``: the worker's consumer group, whose fences say which records a read's
        values hold (``EVENTPULSE_CONSUMER_GROUP``)."""
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, got {share}")
        self.share = share
        self.group = group
        self.sender = sender or KafkaSender(bootstrap_servers, topic)

    def wants(self, entity_id: str) -> bool:
        return sampled(entity_id, self.share)

    def __call__(self, entity: str, ids: list[str], at_ms: int,
                 values: dict[str, dict[str, FeatureValue]], applied: Applied | None = None,
                 ) -> None:
        served_ms = int(time.time() * 1000)
        for entity_id in filter(self.wants, ids):
            record = read_record(entity, entity_id, at_ms, values[entity_id],
                                 applied.get(entity_id) if applied is not None else None,
                                 served_ms)
            try:  # a value JSON has no form for (bytes a foreign writer left): as text
                text = json.dumps(record, default=repr, allow_nan=False)
            except ValueError:  # NaN or infinity: never served by eventpulse's writers
                log.warning("served read of %s %s not logged: a value JSON cannot hold",
                            entity, entity_id)
                continue
            self.sender.submit(text.encode(), entity_id.encode())

    def attach(self, client: FeatureClient | AsyncFeatureClient) -> None:
        client.on_read = self
        client.applied_reads = AppliedReads(self.group, self.wants)

    def close(self, timeout: float = 5.0) -> None:
        self.sender.close(timeout)
