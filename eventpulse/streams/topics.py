"""The topics eventpulse reads and writes, and which record kind each carries."""

from __future__ import annotations

import re
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

#: Kafka's rule for topic names (``Topic.validate`` in Apache Kafka): ASCII letters, digits,
#: ``.``, ``_`` and ``-``, at most 249 characters, and not ``.`` or ``..``.
_LEGAL_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


def topic_name_problem(name: str) -> str | None:
    """Why a broker would refuse ``name`` as a topic, or None."""
    if name in {".", ".."}:
        return f"topic name {name!r} is not allowed"
    if not _LEGAL_TOPIC.fullmatch(name):
        return (f"topic name {name[:60]!r} is not a legal Kafka topic name: use 1-249 of "
                "A-Z a-z 0-9 . _ -")
    return None
