"""The topics eventpulse reads and writes, and which record kind each carries."""

from __future__ import annotations

from enum import StrEnum


class RecordKind(StrEnum):
    """The three kinds of record services send."""

    BEHAVIOUR = "behaviour"
    INFERENCE = "inference"
    METRIC = "metric"
    #: a feature read a model server was served (sampled), for the consistency report
    FEATURE_READ = "feature_read"


#: Default topic names; a deployment can rename them in the YAML config (``topics:``).
DEFAULT_TOPICS: dict[str, RecordKind] = {
    "events": RecordKind.BEHAVIOUR,
    "inference": RecordKind.INFERENCE,
    "metrics": RecordKind.METRIC,
}

DEAD_LETTER_TOPIC = "eventpulse-dead-letters"
