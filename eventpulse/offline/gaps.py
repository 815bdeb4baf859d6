"""Values a replay cannot make exact because the archive lost records: the ``incomplete``
status of training sets and the ``archive_gap`` cause of the consistency report.

The archive's files of a partition cover its offsets without a hole (a refused record's offset
is inside a file too, and so is an offset Kafka gives no record: eventpulse/archive/segment.py),
so offsets no file covers between two of them are records the live worker applied and the
replay lacks: a file removed, or never uploaded by the archive
(:func:`eventpulse.archive.read.gaps_of`). So are the offsets of a segment one of whose hour
files is gone (the files say which hours they are in): its other files are read, and the
gap is the segment's whole range. Which entities they were of
is lost with them, and so are their times; what the files around the gap say bounds them:

- the broker had them after the row before the gap and by the row after it (broker times
  within a partition follow its offsets, as the broker appends): a value read before the broker
  had the row before the gap cannot count them;
- each was applied only if its event time was not later than the broker's time plus
  ``limits.max_future`` (the archive refused the others): a value read over a window that
  starts after the latest such time cannot count them. A window that ends before their event
  times (older than the partition's watermark less the feature's lateness) cannot count them
  either, but their write still moved the entity's ring forward, which changes how an older
  window reads (found by an outside test: records ahead of the read's moment, lost, left a
  window read ``present`` where the worker's read ``missing``): such windows are marked too;
- their write also kept the entity's key alive up to a key TTL after the broker had them: a
  value read ``missing`` until then may have been present, and so may one ``lag_sensitive``
  for its key's expiry (found by an outside test: with ``--settle``, a read near the TTL of
  the entity's last archived records is in doubt here, present live).

Every other value of a feature of the topic, of any entity of the feature's type, may count
them and is marked ``incomplete`` (its value is what the archive holds: fewer records than the
worker had). A read whose logged positions (the consistency report) stop before the gap
counts none of them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from eventpulse.offline.entityindex import Stream
from eventpulse.tables.client import FeatureValue
from eventpulse.tables.spec import FeatureSpec

#: the status of a value that may count records the archive lost
INCOMPLETE = "incomplete"
#: statuses that say the entity's key was gone, or may have been, when read: the lost
#: records' write may have kept it alive (``lag_sensitive``: among its causes, a key that may
#: have expired, eventpulse/offline/expiry.py)
KEY_LIFE_STATUSES = frozenset({"missing", "lag_sensitive"})


@dataclass(frozen=True, slots=True)
class Gap:
    """Offsets ``first``..``last`` of partition ``tp`` (``topic:partition``) no file holds."""

    topic: str
    tp: str
    first: int
    last: int
    #: the broker had them after this time (of the row before the gap; None: no row before)
    after_ms: int | None
    #: ... and by this time (of the row after it; None: no row after it was read)
    by_ms: int | None


def gaps_of(streams: Sequence[Stream],
            topics: Iterable[tuple[str, Mapping[int, Sequence[tuple[int, int]]]]] = (),
            ) -> list[Gap]:
    """The gaps of every partition, with what the rows around each say of its records; and of
    ``topics`` (per topic, its partitions' gaps: ``TopicRows.gaps``), those of a partition
    without a stream, whose every file is gone (their cut markers kept), unbounded: nothing
    says when the broker had its records (found by an outside test: with no rows to hang them
    on, they were not seen)."""
    held = {stream.tp for stream in streams}
    found = [Gap(topic, f"{topic}:{partition}", first, last, None, None)
             for topic, lost in topics for partition, spans in sorted(lost.items())
             if f"{topic}:{partition}" not in held for first, last in spans]
    for stream in streams:
        for first, last in stream.gaps:
            # the rows before the gap's offsets and the first after them (rows inside: a
            # segment one of whose hour files is gone, the others read)
            before = bisect.bisect_left(stream.offsets, first)
            after = bisect.bisect_right(stream.offsets, last)
            found.append(Gap(stream.topic, stream.tp, first, last,
                             stream.reach[before - 1] if before else None,
                             stream.reach[after] if after < len(stream.offsets) else None))
    return found


def key_ttls(specs: Iterable[FeatureSpec], late_ms: int = 0) -> dict[str, int]:
    """Per entity type, the TTL of its key (the longest of its features', tables/spec.py), and
    ``late_ms``: how much later than the broker had them a worker may have written records
    (``--settle``, the consistency report's lags), which its key outlived by as much (found by
    an outside test: a value ``lag_sensitive`` from the whole archive read a firm ``missing``
    without the lost records, unmarked)."""
    ttls: dict[str, int] = {}
    for spec in specs:
        ttls[spec.entity] = max(ttls.get(spec.entity, 0), (spec.ttl or 0) + late_ms)
    return ttls


def may_count(gap: Gap, spec: FeatureSpec, max_future_ms: int, key_ttl_ms: int, cutoff: int,
              value: FeatureValue, applied: dict[str, int] | None = None) -> bool:
    """Whether ``value`` of feature ``spec``, read with what the broker had by ``cutoff``
    (``applied``: exactly the offsets a served read logged), may count records of ``gap``,
    or may be ``missing`` (or in doubt: :data:`KEY_LIFE_STATUSES`) for lack of them: the lost
    records may have been the entity's last, whose write kept its key (TTL ``key_ttl_ms``)
    alive until up to a TTL after the broker had them (found by an outside test: values
    ``missing`` here, ``present`` live, an hour after a gap, unmarked)."""
    if spec.topic != gap.topic:
        return False
    if applied is not None:
        if applied.get(gap.tp, -1) < gap.first:
            return False
    elif gap.after_ms is not None and cutoff < gap.after_ms:
        return False
    if value.status in KEY_LIFE_STATUSES and (gap.by_ms is None or cutoff < gap.by_ms + key_ttl_ms):
        return True
    return gap.by_ms is None or value.window_start_ms <= gap.by_ms + max_future_ms


def mark_incomplete(gaps: Sequence[Gap], specs: Sequence[FeatureSpec], max_future_ms: int,
                    key_ttl: dict[str, int], entities: Sequence[str], cutoffs: Sequence[int],
                    out: list[dict[str, FeatureValue] | None],
                    positions: Sequence[dict[str, int]] | None = None) -> int:
    """Give the status :data:`INCOMPLETE` to every value of ``out`` (per label row: its entity
    type, cut-off and, for logged reads, positions) that may count records of ``gaps`` (or be
    missing for lack of them: ``key_ttl`` per entity type, :func:`key_ttls`); how many were
    marked."""
    if not gaps:
        return 0
    marked = 0
    for row, values in enumerate(out):
        if not values:
            continue
        for spec in specs:
            value = values.get(spec.name)
            if (value is None or value.status == INCOMPLETE or spec.entity != entities[row]):
                continue
            applied = positions[row] if positions is not None else None
            if any(may_count(gap, spec, max_future_ms, key_ttl[spec.entity], cutoffs[row],
                             value, applied) for gap in gaps):
                values[spec.name] = value._replace(status=INCOMPLETE)  # type: ignore[arg-type]
                marked += 1
    return marked
