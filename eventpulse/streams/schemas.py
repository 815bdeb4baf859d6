"""The record contracts: behaviour events, inference logs and metric samples.

Unknown fields are kept (``extra="allow"``): the point of JSON on a topic is that a producer can add
a field without breaking the readers that do not know it yet. Numbers must be finite; a timestamp is
ISO-8601 or epoch (seconds or milliseconds) and is normalised to integer epoch milliseconds, the one
unit the window arithmetic uses.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from eventpulse.durations import MAX_EPOCH_MS, MIN_EPOCH_MS
from eventpulse.streams.topics import RecordKind

#: Epoch values above this are taken as milliseconds (1e11 s is the year 5138).
MILLIS_THRESHOLD = 100_000_000_000


def to_epoch_ms(value: Any) -> int:
    """Normalise an ISO-8601 string or an epoch number (s or ms) to epoch milliseconds, in
    1970-9999 (durations.MIN_EPOCH_MS..MAX_EPOCH_MS; also exact in the float arithmetic of the
    Lua side): another time is refused (a record's as ``bad_timestamp``)."""
    if value.__class__ is int and MILLIS_THRESHOLD <= value <= MAX_EPOCH_MS:
        return value  # the common case, epoch ms, first: this runs for every record
    if isinstance(value, bool):
        raise ValueError("timestamp must be ISO-8601 or an epoch number, not a boolean")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("timestamp must be finite")
        # floor, not int(): a time a fraction of a millisecond before 1970 is before 1970
        ms = math.floor(value) if abs(value) >= MILLIS_THRESHOLD else math.floor(value * 1000)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("timestamp is not ISO-8601 (e.g. 2026-01-31T12:00:00Z)") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        # the offset can carry a time past 9999-12-31 UTC (9999-12-31T22:00-02:00)
        ms = math.floor(parsed.timestamp() * 1000)
    else:
        raise ValueError("timestamp must be ISO-8601 or an epoch number")
    if not MIN_EPOCH_MS <= ms <= MAX_EPOCH_MS:
        raise ValueError("timestamp is out of range (1970-01-01 to 9999-12-31)")
    return ms


EpochMs = Annotated[int, BeforeValidator(to_epoch_ms)]


class Record(BaseModel):
    """Fields every record carries."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=False)

    timestamp: EpochMs
    schema_version: int = 1


class BehaviourEvent(Record):
    """What a user did: ``click``, ``view``, ``swipe``, ``watch``..."""

    user_id: str = Field(min_length=1)
    action: str = Field(min_length=1)
    item_id: str | None = None
    device: str | None = None
    session_id: str | None = None


class InferenceLog(Record):
    """One model call as the serving layer saw it."""

    model: str = Field(min_length=1)
    model_version: str | None = None
    request_id: str | None = None
    latency_ms: float = Field(ge=0)
    status: int
    features: dict[str, Any] | None = None
    prediction: Any = None


class MetricSample(Record):
    """One infrastructure measurement, Prometheus-style: a name, a value and labels."""

    name: str = Field(min_length=1)
    value: float
    labels: dict[str, str] = Field(default_factory=dict)


class FeatureRead(Record):
    """One entity's features as a ``FeatureClient`` read returned them; ``timestamp`` is the
    read's ``at``. ``values``: feature name -> {value, status, newest_event_ms, event_count}.
    An extra field ``applied`` (kept extra, so that archives from before it read alike): per
    ``topic:partition``, the offsets the worker had applied to the entity's fence shard when
    the read began and ended (absent where not known); and ``served_ms``, when the read
    returned (a read of a past ``at`` held the windows of then)."""

    entity: str = Field(min_length=1)
    entity_id: str
    values: dict[str, Any]


SCHEMAS: dict[RecordKind, type[Record]] = {
    RecordKind.BEHAVIOUR: BehaviourEvent,
    RecordKind.INFERENCE: InferenceLog,
    RecordKind.METRIC: MetricSample,
    RecordKind.FEATURE_READ: FeatureRead,
}

#: Versions of the record contracts this release understands.
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
