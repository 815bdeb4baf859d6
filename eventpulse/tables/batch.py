"""Combine a batch of records into per-(entity, feature, bucket) partials, then into one write.

Why combine first: a batch of 20k events touches far fewer (entity, bucket) pairs than it has
events, and each pair becomes a handful of Redis commands that run inside one Lua call. The
combiner also carries each partition's applied offset and watermark, so that a replayed record
(offset already applied) is skipped and a too-late record is refused the same way on every run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eventpulse.tables import sketch
from eventpulse.tables.keys import entity_key
from eventpulse.tables.spec import CompiledFeature

#: An HLL op carries at most this many members (Lua's unpack() has a stack limit).
_MAX_MEMBERS_PER_OP = 500
NO_WATERMARK = -(2**62)

#: Fields each aggregation writes per window, for pruning.
SUFFIXES: dict[str, str] = {
    "count": "", "sum": "", "min": "", "max": "", "mean": "|s,|n", "ratio": "|n,|d", "last": ",|t",
}


@dataclass(slots=True)
class PartitionPosition:
    """Where a partition stands in Redis: last applied offset and its event-time watermark."""

    offset: int = -1
    watermark: int = NO_WATERMARK

    def encode(self) -> str:
        return f"{self.offset}:{self.watermark}"

    @classmethod
    def decode(cls, raw: str | bytes | None) -> PartitionPosition:
        if raw is None:
            return cls()
        text = raw.decode() if isinstance(raw, bytes) else raw
        offset, _, watermark = text.partition(":")
        return cls(int(offset), int(watermark))


@dataclass
class BatchStats:
    applied: int = 0
    skipped_replayed: int = 0
    late: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    unkeyed: int = 0


@dataclass
class WritePlan:
    """Everything one atomic Redis call needs."""

    keys: list[str]
    argv: list[Any]
    positions: dict[str, PartitionPosition]
    expected: dict[str, PartitionPosition | None]
    touched: dict[str, set[str]]  # feature name -> entity ids updated

    @property
    def is_empty(self) -> bool:
        return bool(self.argv[0] == 0)

    def add_write(self, op: str, key: str, field: str, value: str) -> None:
        """Ride along with the batch: ``S`` = HSET key field value, ``R`` = RPUSH key value.

        The alerting uses this so that alert states and outbox entries commit with the offsets.
        """
        if op not in ("S", "R"):
            raise ValueError(f"unknown write op {op!r}")
        try:
            index = self.keys.index(key) + 3
        except ValueError:
            self.keys.append(key)
            index = len(self.keys) + 2
        self.argv += [op, index, field, value]


class BatchCombiner:
    """Accumulates one write's worth of records. Not thread-safe; one per consumer loop."""

    def __init__(self, namespace: str, features_by_topic: dict[str, Sequence[CompiledFeature]]):
        self.namespace = namespace
        self.features_by_topic = features_by_topic
        self.reset({})

    def reset(self, positions: dict[str, PartitionPosition | None]) -> None:
        """Start a batch from the positions Redis holds (``None``: never applied)."""
        self.expected = dict(positions)
        self.positions = {
            tp: PartitionPosition(p.offset, p.watermark) if p else PartitionPosition()
            for tp, p in positions.items()
        }
        self.stats = BatchStats()
        # (feature index, entity id, bucket) -> partial; layout depends on the aggregation
        self.partials: dict[tuple[int, str, int], Any] = {}
        self.newest: dict[tuple[int, str], int] = {}
        #: entity id -> the partition that last fed it (for alert ownership across workers)
        self.owner: dict[str, str] = {}
        self.observed_since: int | None = None

    def add(self, tp: str, topic: str, offset: int, record: Any | None) -> bool:
        """Fold one record in (``None``: a refused record that only advances the offset).

        Returns False when the record was already applied by an earlier run and was skipped.
        """
        position = self.positions[tp]
        if offset <= position.offset:
            self.stats.skipped_replayed += 1
            return False
        position.offset = offset
        if record is None:
            return True
        ts: int = record.timestamp
        watermark = position.watermark
        if ts > watermark:
            position.watermark = ts
        if self.observed_since is None or ts < self.observed_since:
            self.observed_since = ts
        self.stats.applied += 1
        partials = self.partials
        for feature in self.features_by_topic.get(topic, ()):
            if not feature.is_match(record):
                continue
            entity_id = feature.key_of(record)
            if entity_id is None:
                self.stats.unkeyed += 1
                continue
            window = feature.window
            if ts < watermark - window.lateness:
                self.stats.late[feature.name] += 1
                continue
            bucket = ts - ts % window.step_ms
            slot = (feature.index, entity_id, bucket)
            agg = feature.aggregation
            if agg == "count":
                partials[slot] = partials.get(slot, 0) + 1
            elif agg == "ratio":
                pair = partials.get(slot)
                if pair is None:
                    pair = partials[slot] = [0, 0]
                pair[1] += 1
                if feature.is_numerator(record):
                    pair[0] += 1
            else:
                assert feature.value_of is not None
                value = feature.value_of(record)
                if value is None:
                    continue
                if agg == "sum":
                    partials[slot] = partials.get(slot, 0.0) + value
                elif agg == "mean":
                    pair = partials.get(slot)
                    if pair is None:
                        pair = partials[slot] = [0.0, 0]
                    pair[0] += value
                    pair[1] += 1
                elif agg == "min":
                    current = partials.get(slot)
                    if current is None or value < current:
                        partials[slot] = value
                elif agg == "max":
                    current = partials.get(slot)
                    if current is None or value > current:
                        partials[slot] = value
                elif agg == "last":
                    current = partials.get(slot)
                    if current is None or ts >= current[0]:
                        partials[slot] = (ts, value)
                elif agg == "distinct":
                    members = partials.get(slot)
                    if members is None:
                        members = partials[slot] = set()
                    members.add(str(value))
                else:  # percentile
                    bins = partials.get(slot)
                    if bins is None:
                        bins = partials[slot] = defaultdict(int)
                    bins[sketch.bin_of(value)] += 1
            newest_key = (feature.index, entity_id)
            if ts > self.newest.get(newest_key, NO_WATERMARK):
                self.newest[newest_key] = ts
            self.owner[entity_id] = tp
        return True

    def is_new(self, tp: str, offset: int) -> bool:
        """False for a record an earlier run already applied (cheaper than decoding it)."""
        return offset > self.positions[tp].offset

    def plan(self, features: Sequence[CompiledFeature]) -> WritePlan:
        """Encode the batch as KEYS and ARGV for ``apply.lua``."""
        changed = {}
        for tp, pos in self.positions.items():
            expected = self.expected.get(tp)
            if expected is None or pos.offset != expected.offset:
                changed[tp] = pos
        keys: list[str] = []
        key_index: dict[str, int] = {}
        argv: list[Any] = [len(changed)]
        for tp, pos in changed.items():
            expected = self.expected.get(tp)
            argv += [tp, expected.encode() if expected else "", pos.encode()]
        argv.append("" if self.observed_since is None else self.observed_since)
        touched: dict[str, set[str]] = defaultdict(set)

        def index_of(feature: CompiledFeature, entity_id: str) -> int:
            name = entity_key(self.namespace, feature.entity, entity_id)
            idx = key_index.get(name)
            if idx is None:
                keys.append(name)
                idx = key_index[name] = len(keys) + 2  # KEYS[1], KEYS[2] are offsets and meta
            return idx

        for (findex, entity_id, bucket), partial in self.partials.items():
            feature = features[findex]
            k = index_of(feature, entity_id)
            head = [k, feature.name, bucket, feature.window.step_ms, feature.window.windows_per_event]
            argv.extend(_encode_partial(feature, head, partial))
        for (findex, entity_id), newest in self.newest.items():
            feature = features[findex]
            touched[feature.name].add(entity_id)
            window = feature.window
            argv += [
                "T", index_of(feature, entity_id), feature.name, newest, window.size,
                window.step_ms, window.lateness, feature.spec.ttl,
                SUFFIXES.get(feature.aggregation, ""),
            ]
        return WritePlan(keys, argv, self.positions, self.expected, dict(touched))


def _encode_partial(feature: CompiledFeature, head: list[Any], partial: Any) -> Iterable[Any]:
    agg = feature.aggregation
    if agg == "count":
        return ["I", *head, "", partial]
    if agg == "sum":
        return ["F", *head, "", repr(partial)]
    if agg == "mean":
        return ["F", *head, "|s", repr(partial[0]), "I", *head, "|n", partial[1]]
    if agg == "ratio":
        return ["I", *head, "|n", partial[0], "I", *head, "|d", partial[1]]
    if agg == "min":
        return ["<", *head, repr(partial)]
    if agg == "max":
        return [">", *head, repr(partial)]
    if agg == "last":
        ts, value = partial
        return ["L", *head, ts, json.dumps(value)]
    ttl = feature.spec.ttl
    out: list[Any] = []
    if agg == "distinct":
        members = sorted(partial)
        for start in range(0, len(members), _MAX_MEMBERS_PER_OP):
            chunk = members[start:start + _MAX_MEMBERS_PER_OP]
            out += ["H", *head, ttl, len(chunk), *chunk]
        return out
    flat: list[Any] = []
    for bin_name, count in partial.items():
        flat += [bin_name, count]
    return ["Q", *head, ttl, len(flat), *flat]
