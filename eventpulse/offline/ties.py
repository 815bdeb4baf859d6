"""Which `last` values of a training set a tie between partitions decided: the status
``order_dependent``.

A `last` feature serves the value of the newest record in the window; of two records with the
same event time, the one applied later wins. Within a partition that is the later offset, in
the worker and in the replay alike. Across partitions it is whichever the worker's fetches
brought later, which the archive does not record: the replay applies them in partition order,
the worker in the order its fetches interleaved them. So where the newest event time in the
window read belongs to records of the entity in two or more partitions whose values differ,
the value is not exact but one of the tied ones, and the status says so.

Ties are rare at millisecond event times, so they are looked for column-wise first (per
topic, the (entity id, event time) pairs with rows in more than one partition; nothing when
every event time is distinct), and only their rows become records and are judged as the fold
judges them (the feature's filter, a value, the lateness rule against the partition's
watermark before the record). A read is checked only where one of its entity's ties lies in
the window it read.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from eventpulse.archive.layout import PARTITION
from eventpulse.offline.entityindex import EntityRecords, Stream, feed_name
from eventpulse.offline.values import identical
from eventpulse.tables.client import FeatureValue
from eventpulse.tables.spec import CompiledFeature

#: the status of a value a tie between partitions decided
ORDER_DEPENDENT = "order_dependent"
#: the statuses a tie replaces (a value the client read; ``lag_sensitive`` stays)
_REPLACED = frozenset({"present", "stale", "partial"})


@dataclass
class Tie:
    """Records of one entity with one event time in more than one partition: per partition,
    in offset order, (cut index from which the record counts, its value)."""

    at: int
    by_partition: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)

    def values_by(self, x: int) -> list[Any]:
        """:func:`candidates` among the records counted by cut ``x``."""
        return candidates((self.at, tp, value) for tp, found in self.by_partition.items()
                          for cut, value in found if cut <= x)


class Ties:
    """The ties of the `last` features of a replay, per (feature name, entity id)."""

    def __init__(self, streams: Sequence[Stream], ends: Sequence[Sequence[int]],
                 features: Sequence[CompiledFeature],
                 wanted: Mapping[str, Collection[str]] | None = None) -> None:
        """``wanted``: per entity type, the ids whose ties are looked for (default: all; a
        share of a training set reads its own entities only)."""
        self.features = {f.name: f for f in features if f.aggregation == "last"}
        self.found: dict[tuple[str, str], list[Tie]] = {}
        for feature in self.features.values():
            mine = [(s, e) for s, e in zip(streams, ends, strict=True)
                    if s.topic == feature.spec.topic]
            if len(mine) > 1:
                ids = None if wanted is None else wanted.get(feature.entity, ())
                self._find(feature, mine, ids)

    def __bool__(self) -> bool:
        return bool(self.found)

    def _find(self, feature: CompiledFeature, streams: list[tuple[Stream, Sequence[int]]],
              ids: Collection[str] | None) -> None:
        tables = [s.table for s, _ in streams]
        # rows of other entities left out column-wise, where the key is one string column
        of_ids = None
        if ids is not None and _keyed_by_text(feature, tables):
            of_ids = pa.array(list(ids), pa.string())
        at = _tied_times(feature, tables, of_ids)
        if at is None:
            return
        by_key: dict[tuple[str, int], dict[str, list[tuple[int, Any]]]] = {}
        for stream, ends in streams:
            counted = ends[-1] if ends else 0
            mask = pc.is_in(stream.table.column("timestamp").slice(0, counted), value_set=at)
            if of_ids is not None:
                assert feature.key_field is not None
                mask = pc.and_(mask, pc.is_in(
                    stream.table.column(feature.key_field).slice(0, counted), value_set=of_ids))
            rows = pc.indices_nonzero(mask).to_pylist()
            if not rows:
                continue
            stream.need(rows)
            for row in rows:
                view = stream.records[row]
                value = taken(feature, view, stream.watermarks[row])
                entity_id = entity_of(feature, view)
                if value is REFUSED or entity_id is None:
                    continue
                by_key.setdefault((entity_id, view["timestamp"]), {}).setdefault(
                    stream.tp, []).append((bisect.bisect_right(ends, row), value))
        for (entity_id, ts), by_partition in sorted(by_key.items()):
            if len(by_partition) > 1:
                self.found.setdefault((feature.name, entity_id), []).append(
                    Tie(ts, by_partition))

    def decided(self, name: str, entity_id: str, value: FeatureValue, x: int,
                records: EntityRecords | None) -> bool:
        """Whether ``value`` (of feature ``name`` for ``entity_id``, read at cut ``x``) is the
        newest of a tie whose partitions' candidates differ. ``records``: the entity's records
        of the feature's family in replay order, to tell whether a newer record in the window
        won instead."""
        ties = self.found.get((name, entity_id))
        if not ties or value.status not in _REPLACED:
            return False
        feature = self.features[name]
        start, end = value.window_start_ms, value.window_end_ms
        for tie in ties:
            if not start <= tie.at < end:
                continue
            values = tie.values_by(x)
            if len(values) < 2 or all(identical(values[0], v) for v in values[1:]):
                continue
            if records is None or not _newer_taken(feature, records, x, tie.at, end):
                return True
        return False


def candidates(taken_rows: Iterable[tuple[int, str, Any]]) -> list[Any]:
    """Of the records a `last` feature took (event time, partition, value; each partition's
    in offset order), the values that can have won: per partition, its last record at the
    newest event time. Within a partition the later offset wins; between partitions, the
    order the worker's fetches brought them (more than one candidate: a tie)."""
    rows = list(taken_rows)
    newest = max((ts for ts, _, _ in rows), default=None)
    return list({tp: value for ts, tp, value in rows if ts == newest}.values())


#: what :func:`taken` returns for a record the fold does not take
REFUSED: Any = object()


def taken(feature: CompiledFeature, view: dict[str, Any], watermark: int) -> Any:
    """The value the fold (``eventpulse/tables/fold.py``) takes for a `last` ``feature`` from a
    record whose partition's watermark before it was ``watermark``, or :data:`REFUSED`: too
    late (the lateness rule), filtered out, or without a value. Whose record it is, is
    :func:`entity_of`'s."""
    if view["timestamp"] < watermark - feature.lateness:
        return REFUSED
    if feature.is_match is not None and not feature.is_match(view):
        return REFUSED
    value = (view.get(feature.value_field) if feature.value_field is not None
             else feature.value_of(view) if feature.value_of is not None else None)
    return REFUSED if value is None else value


def entity_of(feature: CompiledFeature, view: dict[str, Any]) -> str | None:
    """The entity id the fold keys the record on for ``feature`` (None: no entity's, an id
    the key rules refuse included)."""
    try:
        return feature.entity_id(view)
    except ValueError:  # not an entity id (BadKey): no entity's record
        return None


def _newer_taken(feature: CompiledFeature, records: EntityRecords, x: int, after: int,
                 end: int) -> bool:
    """Whether a record of ``records`` counted by cut ``x``, of the feature's topic, with an
    event time after ``after`` and before ``end``, is taken by the feature (and so won)."""
    feed = feed_name(feature.spec.topic, feature.entity, feature.spec.key)
    of = records.of
    for row in records.rows[:bisect.bisect_right(records.cuts, x)]:
        view = of.records[row]
        if (of.feeds[row] == feed and after < view["timestamp"] < end
                and taken(feature, view, of.watermarks[row]) is not REFUSED):
            return True
    return False


def _keyed_by_text(feature: CompiledFeature, tables: list[pa.Table]) -> bool:
    """Whether every table holds the feature's key as one top-level string column."""
    key = feature.key_field
    return key is not None and all(
        key in t.column_names and pa.types.is_string(t.schema.field(key).type) for t in tables)


def _tied_times(feature: CompiledFeature, tables: list[pa.Table],
                of_ids: pa.Array | None = None) -> pa.Array | None:
    """The event times at which some entity of ``feature`` has rows in more than one of
    ``tables`` (a topic's partitions), column-wise; None where there are none. Keyed by one
    top-level column, the pairs (entity id, event time) are grouped (``of_ids``: of these
    entities only, the key a string column); otherwise the event times shared by partitions
    (the entities are told apart row by row after)."""
    key = feature.key_field
    keyed = key is not None and all(key in t.column_names for t in tables)
    columns = ["timestamp", PARTITION, *([key] if keyed else [])]
    table = pa.concat_tables([t.select(columns) for t in tables])
    if of_ids is not None and key is not None:
        table = table.filter(pc.is_in(table.column(key), value_set=of_ids))
    if table.num_rows < 2 or pc.count_distinct(table.column("timestamp")).as_py() == table.num_rows:
        return None
    grouped = table.group_by(columns[:1] + columns[2:]).aggregate([(PARTITION, "min"), (PARTITION, "max")])
    shared = grouped.filter(pc.not_equal(grouped.column(f"{PARTITION}_min"),
                                         grouped.column(f"{PARTITION}_max")))
    if shared.num_rows == 0:
        return None
    return pc.unique(shared.column("timestamp"))
