"""Combine a batch of records into per-(entity, feature, bucket) partials, then into one write.

Why combine first: a batch of 20k events touches far fewer (entity, bucket) pairs than it has
events, and each pair becomes a handful of Redis commands that run inside one Lua call. The
combiner also carries each partition's applied offset and watermark, so that a replayed record
(offset already applied) is skipped and a too-late record is refused the same way on every run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from eventpulse.tables import sketch
from eventpulse.tables.keys import entity_key, newest_field
from eventpulse.tables.spec import CompiledFeature, record_view

NO_WATERMARK = -(2**62)

#: Fields each aggregation writes per window, for pruning ("." is the bare field; "-": nothing to
#: prune, sketches live in per-step keys that expire).
SUFFIXES: dict[str, str] = {
    "count": ".", "sum": ".", "min": ".", "max": ".", "mean": "|s,|n", "ratio": "|n,|d",
    "last": ".,|t",
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
    """Everything one atomic Redis call needs: KEYS, the fence header and the ops."""

    keys: list[str]
    header: list[Any]
    #: per entity key: [KEYS index, ttl ms, [op, ...]] (see apply.lua)
    groups: list[list[Any]]
    positions: dict[str, PartitionPosition]
    expected: dict[str, PartitionPosition | None]
    touched: dict[str, set[str]]  # feature name -> entity ids updated
    #: window field-name lists the ops refer to (1-based in Lua): [feature, first end, step, ...]
    names: list[list[Any]] = field(default_factory=list)
    writes: list[list[Any]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return bool(self.header[0] == 0)

    @property
    def argv(self) -> list[Any]:
        # one msgpack argument: packing hundreds of thousands of separate arguments costs more
        # than applying them, and Lua's cmsgpack decodes faster than its cjson
        doc = {"g": self.groups, "n": self.names, "w": self.writes}
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
        self.observed_since: int | None = None

    def add(self, tp: str, topic: str, offset: int, record: Any | None) -> bool:
        """Fold one record in (``None``: a refused record that only advances the offset).

        Returns False when the record was already applied by an earlier run and was skipped.
        This is the per-event hot path: plain dicts, no attribute-heavy objects.
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
        view = record_view(record)
        partials = self.partials
        newest = self.newest
        for feature in self.features_by_topic.get(topic, ()):
            if feature.is_match is not None and not feature.is_match(view):
                continue
            key_field = feature.key_field
            entity_id = view.get(key_field) if key_field is not None else feature.key_of(view)
            if entity_id is None or entity_id == "":
                self.stats.unkeyed += 1
                continue
            if entity_id.__class__ is not str:
                entity_id = str(entity_id)
            if ts < watermark - feature.lateness:
                self.stats.late[feature.name] += 1
                continue
            slot = (feature.index, entity_id, ts - ts % feature.step)
            code = feature.agg_code
            if code == 0:  # count
                partials[slot] = partials.get(slot, 0) + 1
            elif code == 1:  # ratio
                pair = partials.get(slot)
                if pair is None:
                    pair = partials[slot] = [0, 0]
                pair[1] += 1
                if feature.is_numerator is None or feature.is_numerator(view):
                    pair[0] += 1
            elif code in (6, 7):  # last, distinct: any value
                value = (view.get(feature.value_field) if feature.value_field
                         else feature.value_of(view))  # type: ignore[misc]
                if value is None:
                    continue
                if code == 6:
                    current = partials.get(slot)
                    if current is None or ts >= current[0]:
                        partials[slot] = (ts, value)
                else:
                    members = partials.get(slot)
                    if members is None:
                        members = partials[slot] = set()
                    members.add(value if value.__class__ is str else str(value))
            else:
                number = feature.number(view)
                if number is None:
                    continue
                current = partials.get(slot)
                if code == 2:  # sum
                    partials[slot] = number if current is None else current + number
                elif code == 3:  # mean
                    if current is None:
                        partials[slot] = [number, 1]
                    else:
                        current[0] += number
                        current[1] += 1
                elif code == 4:  # min
                    if current is None or number < current:
                        partials[slot] = number
                elif code == 5:  # max
                    if current is None or number > current:
                        partials[slot] = number
                else:  # percentile sketch
                    if current is None:
                        current = partials[slot] = defaultdict(int)
                    current[sketch.bin_of(number)] += 1
            newest_key = (feature.index, entity_id)
            if ts > newest.get(newest_key, NO_WATERMARK):
                newest[newest_key] = ts
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
        header: list[Any] = [len(changed)]
        for tp, pos in changed.items():
            expected = self.expected.get(tp)
            header += [tp, expected.encode() if expected else "", pos.encode()]
        header.append("" if self.observed_since is None else self.observed_since)
        keys: list[str] = []
        groups: dict[tuple[str, str], list[Any]] = {}  # (entity, id) -> [KEYS index, ttl, ops]
        touched: dict[str, set[str]] = defaultdict(set)
        namespace = self.namespace
        names = _WindowNames()
        # per feature, what every newest-event op of it repeats
        tails = [[f.window.size, f.step, f.lateness, SUFFIXES.get(f.aggregation, "-")]
                 for f in features]
        ttls = [f.spec.ttl or 0 for f in features]

        # newest-event ops first: they tell apply.lua which windows are out of reach
        for (findex, entity_id), newest in self.newest.items():
            feature = features[findex]
            touched[feature.name].add(entity_id)
            group = groups.get((feature.entity, entity_id))
            if group is None:
                keys.append(entity_key(namespace, feature.entity, entity_id))
                # KEYS[1] and KEYS[2] are the offsets and meta hashes
                group = groups[(feature.entity, entity_id)] = [len(keys) + 2, 0, []]
            if ttls[findex] > group[1]:
                group[1] = ttls[findex]
            group[2].append(["T", names.newest(feature), newest, *tails[findex]])
        for (findex, entity_id, bucket), partial in self.partials.items():
            feature = features[findex]
            # every partial has a newest-event op, so its group exists
            groups[(feature.entity, entity_id)][2].extend(
                _encode_partial(feature, bucket, partial, names))
        return WritePlan(keys, header, list(groups.values()), self.positions, self.expected,
                         dict(touched), names.lists)


class _WindowNames:
    """The window field names of one batch, built once per (feature, bucket, suffix)."""

    def __init__(self) -> None:
        self.lists: list[list[Any]] = []
        self.index: dict[tuple[str, int, str], int] = {}

    def _ref(self, key: tuple[str, int, str], build: Any) -> int:
        ref = self.index.get(key)
        if ref is None:
            self.lists.append(build())
            ref = self.index[key] = len(self.lists)  # 1-based for Lua
        return ref

    def windows(self, feature: CompiledFeature, bucket: int, suffix: str = "") -> int:
        step, name = feature.step, feature.name
        ends = range(bucket + step, bucket + feature.window.size + 1, step)
        return self._ref((name, bucket, suffix), lambda: [
            name, bucket + step, step, *(f"{name}|{end}{suffix}" for end in ends)])

    def newest(self, feature: CompiledFeature) -> int:
        return self._ref((feature.name, -1, "|t"), lambda: [
            feature.name, 0, 0, newest_field(feature.name)])


def _encode_partial(feature: CompiledFeature, bucket: int, partial: Any,
                    names: _WindowNames) -> list[list[Any]]:
    code = feature.agg_code
    if code == 0:  # count
        return [["I", names.windows(feature, bucket), partial]]
    if code == 1:  # ratio
        return [["I", names.windows(feature, bucket, "|n"), partial[0]],
                ["I", names.windows(feature, bucket, "|d"), partial[1]]]
    if code == 2:  # sum
        return [["F", names.windows(feature, bucket), partial]]
    if code == 3:  # mean
        return [["F", names.windows(feature, bucket, "|s"), partial[0]],
                ["I", names.windows(feature, bucket, "|n"), partial[1]]]
    if code in (4, 5):  # min, max
        return [["<" if code == 4 else ">", names.windows(feature, bucket), partial]]
    if code == 6:  # last
        ts, value = partial
        return [["L", names.windows(feature, bucket), names.windows(feature, bucket, "|t"), ts,
                 json.dumps(value)]]
    ttl = feature.spec.ttl
    if code == 7:  # distinct
        return [["H", feature.name, bucket, ttl, list(partial)]]
    flat: list[Any] = []
    for bin_name, count in partial.items():
        flat += [bin_name, count]
    return [["Q", feature.name, bucket, ttl, flat]]
