"""Combine a batch of records into per-(feature, entity, bucket) partials, then into one write.

Why combine first: a batch of 50k events touches far fewer (entity, bucket) pairs than it has
events, and each entity costs Redis one read and one write inside one Lua call. The
combiner also carries each partition's applied offset and watermark, so that a replayed record
(offset already applied) is skipped and a too-late record is refused the same way on every run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from eventpulse.streams.entitykey import key_text
from eventpulse.tables import ring, sketch
from eventpulse.tables.keys import features_key
from eventpulse.tables.spec import CompiledFeature, View, record_view

NO_WATERMARK = -(2**62)


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
    skipped_replayed: int = 0
    late: dict[str, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class WritePlan:
    """Everything one atomic Redis call needs: KEYS, the fence header and the ops."""

    keys: list[str]
    header: list[Any]
    #: per entity key: [KEYS index, op, ...] (see apply.lua)
    groups: list[list[Any]]
    positions: dict[str, PartitionPosition]
    expected: dict[str, PartitionPosition | None]
    touched: dict[str, set[str]]  # feature name -> entity ids updated
    #: the features the ops refer to (1-based in Lua): [name, size, step, slots, stride, kind, ttl]
    features: list[list[Any]] = field(default_factory=list)
    writes: list[list[Any]] = field(default_factory=list)
    #: feature name -> newest event time (epoch ms) of the batch's events for it
    newest: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return bool(self.header[0] == 0)

    @property
    def argv(self) -> list[Any]:
        # one msgpack argument: packing hundreds of thousands of separate arguments costs more
        # than applying them, and Lua's cmsgpack decodes faster than its cjson
        doc = {"g": self.groups, "f": self.features, "w": self.writes}
        return [*self.header, msgpack.packb(doc)]

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
        self.writes.append([op, index, field, value])


class _KeyGroup:
    """Features of one topic keyed by the same fields over the same step and lateness: the
    entity id, the lateness check and the bucket are worked out once per record for all."""

    __slots__ = ("features", "key_field", "key_of", "lateness", "step")

    def __init__(self, features: list[CompiledFeature]) -> None:
        first = features[0]
        self.features = features
        self.key_field = first.key_field
        self.key_of = first.key_of
        self.step = first.step
        self.lateness = first.lateness

    @classmethod
    def of(cls, features: Sequence[CompiledFeature]) -> list[_KeyGroup]:
        grouped: dict[tuple[Any, ...], list[CompiledFeature]] = {}
        for feature in features:
            identity = (tuple(feature.spec.key), feature.step, feature.lateness)
            grouped.setdefault(identity, []).append(feature)
        return [cls(members) for members in grouped.values()]


class BatchCombiner:
    """Accumulates one write's worth of records. Not thread-safe; one per consumer loop.

    Per feature, a dict from entity id to the op apply.lua will run for it, built in place:
    ``[feature, newest event time, bucket, partial..., bucket, partial..., ...]``. Keys are the
    entity id strings themselves (their hash is cached), and an event usually lands in the
    bucket its entity's previous event did, which is checked first.
    """

    def __init__(self, namespace: str, features: Sequence[CompiledFeature],
                 positions: dict[str, PartitionPosition | None] | None = None) -> None:
        """``features``: every feature of the job, each at its ``index``."""
        self.namespace = namespace
        self.features = features
        by_topic: dict[str, list[CompiledFeature]] = {}
        for feature in features:
            by_topic.setdefault(feature.spec.topic, []).append(feature)
        self.groups_by_topic = {topic: _KeyGroup.of(members) for topic, members in by_topic.items()}
        self.reset(positions or {})

    def reset(self, positions: dict[str, PartitionPosition | None]) -> None:
        """Start a batch from the positions Redis holds (``None``: never applied)."""
        self.expected = dict(positions)
        self.positions = {
            tp: PartitionPosition(p.offset, p.watermark) if p else PartitionPosition()
            for tp, p in positions.items()
        }
        self.stats = BatchStats()
        #: feature index -> entity id -> op
        self.ops: defaultdict[int, dict[str, list[Any]]] = defaultdict(dict)
        #: the earliest event time of this batch's records from partitions joined mid-stream
        self.observed_since: int | None = None
        #: partitions whose first applied record is in this batch at an offset past 0: what came
        #: before it (deleted by retention, or consumed by nobody) eventpulse never saw
        self.joined_midstream: set[str] = set()

    def add(self, tp: str, topic: str, offset: int, record: Any | None) -> bool:
        """Fold one record in (``None``: a refused record that only advances the offset).

        Returns False when the record was already applied by an earlier run and was skipped.
        This is the per-event hot path: plain dicts and lists, no attribute-heavy objects.
        """
        position = self.positions[tp]
        if offset <= position.offset:  # is_new(), inline: this runs for every record
            self.stats.skipped_replayed += 1
            return False
        if position.offset < 0 < offset:  # the partition's first record, not its log's first
            self.joined_midstream.add(tp)
        position.offset = offset
        if record is None:
            return True
        ts: int = record.timestamp
        watermark = position.watermark
        if ts > watermark:
            position.watermark = ts
        if self.joined_midstream and tp in self.joined_midstream and (
                self.observed_since is None or ts < self.observed_since):
            self.observed_since = ts
        view = record_view(record)
        all_ops = self.ops
        for group in self.groups_by_topic.get(topic, ()):
            key_field = group.key_field
            entity_id = view.get(key_field) if key_field is not None else group.key_of(view)
            if entity_id is None or entity_id == "":
                continue  # the record is not about an entity of this kind
            if ts < watermark - group.lateness:
                self._count_late(group, view)
                continue
            if entity_id.__class__ is not str:
                entity_id = key_text(entity_id)
            bucket = ts - ts % group.step
            for feature in group.features:
                if feature.is_match is not None and not feature.is_match(view):
                    continue
                code = feature.agg_code
                if code >= 4:  # these need a value: skip the event for this feature without one
                    if code == 6 or code == 7:  # last, distinct: any value
                        value: Any = (view.get(feature.value_field) if feature.value_field
                                      else feature.value_of(view))  # type: ignore[misc]
                    else:
                        value = feature.number(view)
                    if value is None:
                        continue
                elif code >= 2:  # sum, mean
                    value = feature.number(view)
                    if value is None:
                        continue
                ops = all_ops[feature.index]
                op = ops.get(entity_id)
                width = _WIDTHS[code]
                if op is None:
                    op = ops[entity_id] = [feature.index + 1, ts, bucket, *_EMPTY_PARTIALS[code]]
                    at = 3
                else:
                    if ts > op[1]:
                        op[1] = ts
                    at = len(op) - width + 1  # the last bucket first: events mostly come in order
                    while op[at - 1] != bucket:
                        at -= width
                        if at < 3:
                            op += (bucket, *_EMPTY_PARTIALS[code])
                            at = len(op) - width + 1
                            break
                if code == 0:  # count
                    op[at] += 1
                elif code == 1:  # ratio: numerator, events
                    op[at + 1] += 1
                    if feature.is_numerator is None or feature.is_numerator(view):
                        op[at] += 1
                elif code == 2:  # sum
                    op[at] += value
                elif code == 3:  # mean: sum, events
                    op[at] += value
                    op[at + 1] += 1
                elif code == 4:  # min: events, minimum
                    if not op[at] or value < op[at + 1]:
                        op[at + 1] = value
                    op[at] += 1
                elif code == 5:  # max: events, maximum
                    if not op[at] or value > op[at + 1]:
                        op[at + 1] = value
                    op[at] += 1
                elif code == 6:  # last: event time, value (ties: the later record wins)
                    if not op[at] or ts >= op[at]:
                        op[at] = ts
                        op[at + 1] = value
                elif code == 7:  # distinct: the values seen, as strings
                    members = op[at]
                    if members is None:
                        members = op[at] = set()
                    members.add(value if value.__class__ is str else str(value))
                else:  # percentile sketch bins
                    bins = op[at]
                    if bins is None:
                        bins = op[at] = defaultdict(int)
                    bins[sketch.bin_of(value)] += 1
        return True

    def _count_late(self, group: _KeyGroup, view: View) -> None:
        """A record too late for its windows counts against every feature of the group it
        would have counted for."""
        for feature in group.features:
            if feature.is_match is None or feature.is_match(view):
                self.stats.late[feature.name] += 1

    def is_new(self, tp: str, offset: int) -> bool:
        """False (and counted) for a record an earlier run already applied; callers ask before
        decoding it, which is the expensive part."""
        if offset > self.positions[tp].offset:
            return True
        self.stats.skipped_replayed += 1
        return False

    def plan(self) -> WritePlan:
        """Encode the batch as KEYS and ARGV for ``apply.lua``."""
        changed = {}
        for tp, pos in self.positions.items():
            expected = self.expected.get(tp)
            if expected is None or pos.offset != expected.offset:
                changed[tp] = pos
        header: list[Any] = [len(changed)]
        for tp, pos in changed.items():
            expected = self.expected.get(tp)
            header += [tp, expected.encode() if expected else "", pos.encode()]
        header.append("" if self.observed_since is None else self.observed_since)
        keys: list[str] = []
        # entity type -> id -> [KEYS index, op, ...]; KEYS[1] and [2] are offsets and meta
        groups: defaultdict[str, dict[str, list[Any]]] = defaultdict(dict)
        touched: dict[str, set[str]] = {}
        namespace, features = self.namespace, self.features
        newest: dict[str, int] = {}
        for findex, ops in self.ops.items():
            feature = features[findex]
            touched[feature.name] = set(ops)
            if ops:
                newest[feature.name] = max(op[1] for op in ops.values())
            by_id = groups[feature.entity]
            sketch_code = feature.agg_code if feature.agg_code >= 7 else 0
            for entity_id, op in ops.items():
                if sketch_code:
                    _flatten_sketches(sketch_code, op)
                group = by_id.get(entity_id)
                if group is None:
                    keys.append(features_key(namespace, feature.entity, entity_id))
                    group = by_id[entity_id] = [len(keys) + 2]
                group.append(op)
        kinds = [ring.KINDS[f.aggregation] for f in features]
        table = [[f.name, f.window.size, f.step, ring.slots(f.window), ring.STRIDES[kind], kind,
                  f.spec.ttl or 0] for f, kind in zip(features, kinds, strict=True)]
        return WritePlan(keys, header, [g for by_id in groups.values() for g in by_id.values()],
                         self.positions, self.expected, touched, table, newest=newest)


#: numbers after the bucket in an op, per aggregation code (sketches: one collection)
_EMPTY_PARTIALS: list[tuple[Any, ...]] = [
    (0,), (0, 0), (0.0,), (0.0, 0), (0, 0.0), (0, 0.0), (0, None), (None,), (None,)]
#: bucket + partial
_WIDTHS = [1 + len(p) for p in _EMPTY_PARTIALS]


def _flatten_sketches(code: int, op: list[Any]) -> None:
    """Distinct sets become lists, percentile bins flat [bin, count, ...] lists, for msgpack."""
    for at in range(3, len(op), 2):
        if code == 7:
            op[at] = list(op[at])
        else:
            flat: list[Any] = []
            for bin_name, count in op[at].items():
                flat += [bin_name, count]
            op[at] = flat
