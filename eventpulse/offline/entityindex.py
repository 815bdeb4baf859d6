"""Per entity, the archived records that count for it, in the order a replay of the whole archive
applies them, with what the worker's rules need to judge each record on its own.

Why: a training set brings an entity's features up to a label's moment only when one of that
entity's label rows is read (:func:`eventpulse.offline.training.compute`), instead of applying
every record at every label moment (which rewrote about 12 entities per label row). That must
give exactly what applying everything in offset order gives (the reference,
:mod:`eventpulse.offline.reference`), so per record this module keeps:

- its place in the replay order: moment by moment (a record counts from the first cut at or
  after the highest broker time up to it in its partition, so that a record the broker had
  after a moment never counts before one it had earlier), partition after partition, offset
  after offset. It decides ``last`` ties between partitions, as it did before.
- its partition's watermark before it: the lateness rule compares a record with the highest
  event time of *every* earlier record of its partition, not only its entity's. The combiner
  is handed this watermark with each record and applies its own rule (``fold.add``).

And per partition joined mid-stream (first archived offset past 0), the ``observed_since`` the
replay in batches records (:func:`observed_since`), which makes windows reaching back before it
``partial``.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from eventpulse.archive.layout import BROKER_TS, OFFSET
from eventpulse.archive.read import (
    ArchivedRecord,
    TopicRows,
    partition_tables,
    record_columns,
    records_of,
)
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.batch import NO_WATERMARK
from eventpulse.tables.spec import CompiledFeature


class Stream:
    """One archived partition: its rows in offset order, as columns; per row the highest broker
    time up to it (a record counts from the first cut at or after it) and the watermark before
    it. Its rows become records only where asked (:meth:`need`): a share of a training set
    needs those of its own entities only."""

    __slots__ = ("_cut_indexes", "cursor", "fields", "gaps", "kind", "offsets", "reach",
                 "records", "starts_at", "table", "topic", "tp", "watermarks")

    def __init__(self, tp: str, topic: str, kind: RecordKind, table: pa.Table,
                 fields: Collection[str] | None = None, starts_at: int | None = None,
                 gaps: Sequence[tuple[int, int]] = ()) -> None:
        self.tp, self.topic, self.kind, self.table = tp, topic, kind, table
        #: the record fields the features read (:func:`~eventpulse.archive.read.records_of`)
        self.fields = fields
        self.offsets: list[int] = table.column(OFFSET).to_pylist()
        #: the first offset the partition's archive covers (``TopicRows.starts``; default: its
        #: first row's): before the first row where the first records were refused
        self.starts_at: int = (starts_at if starts_at is not None
                               else self.offsets[0] if self.offsets else 0)
        #: offset ranges (first, last) whose records the archive lost (``TopicRows.gaps``)
        self.gaps = list(gaps)
        self.reach: list[int] = pc.cumulative_max(table.column(BROKER_TS)).to_pylist()
        self.watermarks: list[int] = [NO_WATERMARK, *pc.cumulative_max(
            table.column("timestamp")).to_pylist()]
        self.watermarks.pop()
        #: per row its record, or None where it is not needed (yet)
        self.records: list[ArchivedRecord | None] = [None] * len(self.offsets)
        #: rows applied so far (the reference replay)
        self.cursor = 0
        self._cut_indexes: tuple[Sequence[int], pa.Array] | None = None

    def need(self, rows: Sequence[int] | None = None) -> None:
        """Make records of ``rows`` (ascending; None: all rows) where there are none yet."""
        missing = [r for r in (range(len(self.records)) if rows is None else rows)
                   if self.records[r] is None]
        if not missing:
            return
        # the columns the records are made of, alone: the others are not copied
        taken = self.table.select(record_columns(self.kind, self.fields))
        if len(missing) < len(self.records):
            taken = taken.take(pa.array(missing, pa.int64()))
        records = self.records
        for row, record in zip(missing, records_of(taken, self.kind, self.fields),
                               strict=True):
            records[row] = record

    def ends(self, cuts: Sequence[int]) -> list[int]:
        """Per cut, how many rows count by then."""
        return [bisect.bisect_right(self.reach, cut) for cut in cuts]

    def cut_indexes(self, ends: Sequence[int]) -> pa.Array:
        """Per row counted by the last cut, the cut (index) from which it counts, given
        :meth:`ends`: runs of equal values, built in C (shared by the families reading it)."""
        if self._cut_indexes is None or self._cut_indexes[0] is not ends:
            runs = [(end, x) for x, end in enumerate(ends) if end > (ends[x - 1] if x else 0)]
            self._cut_indexes = (ends, pc.run_end_decode(pa.RunEndEncodedArray.from_arrays(
                pa.array([end for end, _ in runs], pa.int32()),
                pa.array([x for _, x in runs], pa.int64()))))
        return self._cut_indexes[1]


def streams_of(topic: str, kind: RecordKind, rows: TopicRows,
               fields: Collection[str] | None = None) -> list[Stream]:
    """The partitions of a topic's :func:`~eventpulse.archive.read.read_topic`."""
    return [Stream(f"{topic}:{partition}", topic, kind, part, fields,
                   rows.starts.get(partition), rows.gaps.get(partition, ()))
            for partition, part in partition_tables(rows.table)]


@dataclass
class Family:
    """Features of one entity type keyed by the same fields: a record gives all of them the
    same entity id, so the family's records of an entity can be fed alone."""

    entity: str
    key: tuple[str, ...]
    #: reads the entity id of a record
    reader: CompiledFeature
    topics: set[str] = field(default_factory=set)

    def feed(self, topic: str) -> str:
        return feed_name(topic, self.entity, self.key)


def feed_name(topic: str, entity: str, key: Sequence[str]) -> str:
    """The combiner feed of a family's features on a topic (``BatchCombiner(feed_of=...)``)."""
    return "\x1f".join((topic, entity, *key))


def feed_of(feature: CompiledFeature) -> str:
    return feed_name(feature.spec.topic, feature.entity, feature.spec.key)


def families_of(features: Sequence[CompiledFeature]) -> list[Family]:
    by_key: dict[tuple[str, tuple[str, ...]], Family] = {}
    for feature in features:
        identity = (feature.entity, tuple(feature.spec.key))
        family = by_key.get(identity)
        if family is None:
            family = by_key[identity] = Family(feature.entity, identity[1], feature)
        family.topics.add(feature.spec.topic)
    return list(by_key.values())


#: :func:`record_counts`' columns
RECORD_COUNTS = pa.schema([("entity", pa.string()), ("entity_id", pa.string()),
                           ("records", pa.int64())])


def record_counts(tables: Sequence[tuple[str, pa.Table]], families: Sequence[Family],
                  ) -> pa.Table:
    """Per (entity type, entity id), how many rows of ``tables`` (per topic, its archived rows)
    are about it, over its families' topics: what replaying the entity costs; a table of
    :data:`RECORD_COUNTS`' columns, one row per entity. Counted in C, for families keyed by
    one top-level string column (what :func:`_group_columns` indexes); the entities of other
    families are not counted."""
    pieces = []
    for family in families:
        key = family.reader.key_field
        if key is None:
            continue
        for topic, table in tables:
            if (topic not in family.topics or key not in table.column_names
                    or not pa.types.is_string(table.schema.field(key).type)):
                continue
            found = pc.value_counts(table.column(key))
            ids = found.field("values")
            real = pc.fill_null(pc.not_equal(ids, ""), False)  # an empty or missing key
            pieces.append(pa.table({  # is no entity's
                "entity": pa.repeat(pa.scalar(family.entity, pa.string()), len(ids)),
                "entity_id": ids, "records": found.field("counts")}).filter(real))
    if not pieces:
        return RECORD_COUNTS.empty_table()
    summed = pa.concat_tables(pieces).group_by(["entity", "entity_id"], use_threads=False
                                               ).aggregate([("records", "sum")])
    return pa.table({"entity": summed.column("entity"), "entity_id": summed.column("entity_id"),
                     "records": summed.column("records_sum")}, schema=RECORD_COUNTS)


@dataclass(slots=True)
class FamilyRows:
    """A family's rows of every stream it reads, one stream after another: per row its record
    (None where no family needed it), its partition's watermark before it, the feed it goes in
    under and its reach (the highest broker time of its partition up to it: the live worker
    cannot have written it earlier; eventpulse/offline/expiry.py. None where no key can expire
    within the label set's time: ``index(reaches=False)``)."""

    records: Sequence[Any]
    watermarks: Sequence[int]
    feeds: Sequence[str]
    reaches: Sequence[int] | None = None


@dataclass(slots=True)
class EntityRecords:
    """One entity's records for one family, in replay order: per record the cut (index) from
    which it counts and its row among the family's (``of``: what the combiner is handed with
    it). Rows, not copies of the rows' values: an entity's records are a slice of the index's
    rows, so that indexing makes no list per entity and value (they cost about a tenth of a
    share's index). The properties below copy the values out, for the code that reads an
    entity's records one by one (expiry gaps, restricting to logged positions)."""

    cuts: list[int]
    rows: Sequence[int]
    of: FamilyRows
    #: how many are applied
    applied: int = 0

    @classmethod
    def of_lists(cls, cuts: list[int], records: Sequence[Any], watermarks: Sequence[int],
                 feeds: Sequence[str], reaches: Sequence[int] | None = None) -> EntityRecords:
        """An entity's records given as lists, one value per record."""
        return cls(cuts, range(len(cuts)), FamilyRows(records, watermarks, feeds, reaches))

    @property
    def records(self) -> list[Any]:
        return [self.of.records[r] for r in self.rows]

    @property
    def watermarks(self) -> list[int]:
        return [self.of.watermarks[r] for r in self.rows]

    @property
    def feeds(self) -> list[str]:
        return [self.of.feeds[r] for r in self.rows]

    @property
    def reaches(self) -> list[int] | None:
        reaches = self.of.reaches
        return None if reaches is None else [reaches[r] for r in self.rows]


def index(streams: Sequence[Stream], ends: Sequence[Sequence[int]], families: Sequence[Family],
          wanted: dict[str, dict[str, int]], reaches: bool = True,
          ) -> list[dict[str, EntityRecords]]:
    """Per family, entity id -> its records in replay order. Only entities ``wanted[entity
    type]`` names, and of each only the records up to the last cut (index) it is read at:
    nothing later can change what is read. Rows become records only where some family keeps
    them (:meth:`Stream.need`). ``reaches``: with each record's reach (a tenth of the index's
    time: worth leaving out where no key can expire)."""
    out: list[dict[str, EntityRecords]] = [{} for _ in families]
    grouped: list[tuple[int, Family, _Grouped]] = []
    by_rows: list[tuple[int, Family]] = []
    for k, family in enumerate(families):
        found = _group_columns(streams, ends, family, wanted.get(family.entity, {}))
        if found is None:
            by_rows.append((k, family))
        else:
            grouped.append((k, family, found))
    kept: dict[int, list[Any]] = {}
    for _, _, found in grouped:
        for si, rows in found.kept.items():
            kept.setdefault(si, []).append(rows)
    for si, parts in kept.items():
        streams[si].need(sorted(set().union(*parts)) if len(parts) > 1 else parts[0])
    for k, family, found in grouped:
        out[k] = _entity_records(streams, family, found, reaches)
    if by_rows:
        for stream in streams:
            if any(stream.topic in family.topics for _, family in by_rows):
                stream.need()
        _index_rows(streams, ends, by_rows, wanted, out, reaches)
    return out


@dataclass
class _Grouped:
    """A family's rows of wanted entities, found column-wise, in replay order per entity: the
    entity ids, where each one's rows end in ``rows``/``cuts``, and per stream the rows kept
    (ascending)."""

    #: the family's streams, in order: a row here counts across them, one after another
    mine: list[int]
    ids: list[str]
    ends: list[int]
    #: per record, its row among the family's, and the cut (index) from which it counts
    rows: list[int]
    cuts: list[int]
    kept: dict[int, list[int]]


def _group_columns(streams: Sequence[Stream], ends: Sequence[Sequence[int]], family: Family,
                   want: dict[str, int]) -> _Grouped | None:
    """The rows of :func:`index` for a family keyed by one top-level string column, found
    and ordered column-wise (in C); None for another key."""
    key = family.reader.key_field
    mine = [si for si, stream in enumerate(streams) if stream.topic in family.topics]
    tables = [streams[si].table for si in mine]
    if key is None or not all(key in t.column_names and pa.types.is_string(t.schema.field(key).type)
                              for t in tables):
        return None
    ids = [i for i in want if i]  # an empty key is no entity's (CompiledFeature.entity_id)
    value_set = pa.array(ids, pa.string())
    lasts = pa.array([want[i] for i in ids], pa.int64())
    pieces = []
    kept: dict[int, list[int]] = {}
    base = 0  # the stream's first row among the family's rows of every stream, one after another
    for si in mine:
        stream, counted = streams[si], ends[si][-1] if ends[si] else 0
        if counted:
            cuts = stream.cut_indexes(ends[si])
            # per row, its entity (a number: its place in ``ids``; null: not wanted)
            entity = pc.index_in(stream.table.column(key).slice(0, counted),
                                 value_set=value_set)
            # rows of wanted entities up to the last cut each is read at
            keep = pc.fill_null(pc.less_equal(cuts, pc.take(lasts, entity)), False)
            # base, base + 1, ...: the rows' places among the family's
            places = pc.add(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), counted)),
                            base - 1)
            refs = pc.add(pc.shift_left(cuts, _REF_BITS), places)
            pieces.append(pa.table({"e": entity, "r": refs}).filter(keep))
            kept[si] = pc.indices_nonzero(keep).to_pylist()
        base += len(stream.records)
    if not pieces:
        return _Grouped(mine, [], [], [], [], kept)
    # by entity, then in replay order: cut, then partition, then offset
    found = pa.concat_tables(pieces).sort_by([("e", "ascending"), ("r", "ascending")])
    runs = pc.run_end_encode(found.column("e").combine_chunks())
    refs = found.column("r")
    return _Grouped(mine, [ids[e] for e in runs.values.to_pylist()], runs.run_ends.to_pylist(),
                    pc.bit_wise_and(refs, _REF_MASK).to_pylist(),
                    pc.shift_right(refs, _REF_BITS).to_pylist(), kept)


def _family_rows(streams: Sequence[Stream], mine: Sequence[int], family: Family,
                 with_reaches: bool) -> tuple[FamilyRows, list[int]]:
    """The family's rows of streams ``mine``, one after the other (what the combiner is handed),
    and where each stream's rows start among them."""
    records: list[Any] = []
    watermarks: list[int] = []
    feeds: list[str] = []
    reaches: list[int] = []
    bases = []
    for si in mine:
        stream = streams[si]
        bases.append(len(records))
        records += stream.records
        watermarks += stream.watermarks
        feeds += [family.feed(stream.topic)] * len(stream.watermarks)
        if with_reaches:
            reaches += stream.reach
    return FamilyRows(records, watermarks, feeds, reaches if with_reaches else None), bases


def _entity_records(streams: Sequence[Stream], family: Family, found: _Grouped,
                    with_reaches: bool) -> dict[str, EntityRecords]:
    """Per entity of ``found``, its records in replay order, as :class:`EntityRecords`."""
    of, _ = _family_rows(streams, found.mine, family, with_reaches)
    out: dict[str, EntityRecords] = {}
    start = 0
    rows, cuts = found.rows, found.cuts
    for entity_id, end in zip(found.ids, found.ends, strict=True):
        out[entity_id] = EntityRecords(cuts[start:end], rows[start:end], of)
        start = end
    return out


def gaps(found: EntityRecords, min_gap_ms: int) -> list[int]:
    """The cuts (indexes) after which the entity's next records reached the broker at least
    ``min_gap_ms`` later than every record before them (``reaches`` required). A record counts
    from the first cut at or after its reach, so the records of a later cut all came later."""
    reaches, cuts = found.reaches, found.cuts
    assert reaches is not None
    out: list[int] = []
    top = -1  # the highest reach of the cuts before
    start = 0
    while start < len(cuts):
        end = bisect.bisect_right(cuts, cuts[start], start)
        block = reaches[start:end]
        if start and min(block) - top >= min_gap_ms:
            out.append(cuts[start - 1])
        top = max(top, max(block))
        start = end
    return out


#: per entity, the label moments (cut indexes) it is read at with the offsets counted then,
#: per ``topic:partition``: positions never go back along it (:func:`restrict`)
Chain = list[tuple[int, "dict[str, int]"]]


def places_of(streams: Sequence[Stream]) -> dict[int, tuple[str, int]]:
    """Per record made so far (by ``id``), its partition and offset (:func:`restrict`)."""
    out: dict[int, tuple[str, int]] = {}
    for stream in streams:
        tp = stream.tp
        for record, offset in zip(stream.records, stream.offsets, strict=True):
            if record is not None:
                out[id(record)] = (tp, offset)
    return out


def restrict(found: EntityRecords, chain: Chain, places: dict[int, tuple[str, int]],
             ) -> EntityRecords:
    """``found`` cut down to the records the chain's positions count, each from the first
    moment whose positions count it, in that order, then in replay order: what a worker that
    had applied exactly those offsets at those moments holds (the consistency report, with the
    positions a served read logged). Order matters where records tie (``last``) and to float
    sums; the worker applied them in that order, read by read."""
    for (x, before), (y, after) in itertools.pairwise(chain):
        if y == x and after != before:
            raise ValueError(f"two positions read at one moment (cut {x}): {before}, {after}")
    limits: dict[str, list[int]] = {}
    for step, (_, positions) in enumerate(chain):
        for tp, offset in positions.items():
            limits.setdefault(tp, [-1] * len(chain))[step] = offset
    for tp, offsets in limits.items():  # an offset not given is the one before (or none)
        for step in range(1, len(offsets)):
            if offsets[step] < offsets[step - 1]:
                raise ValueError(f"positions of {tp} go back along the chain: {offsets}")
    taken: list[tuple[int, int]] = []  # (step, place in found)
    for j, record in enumerate(found.records):
        tp, offset = places[id(record)]
        step = bisect.bisect_left(limits.get(tp, ()), offset)
        if step < len(chain):
            taken.append((step, j))
    taken.sort()
    return EntityRecords([chain[step][0] for step, _ in taken],
                         [found.rows[j] for _, j in taken], found.of)


#: a record reference of the column-wise index: cut index << _REF_BITS | row of the family
_REF_BITS = 40
_REF_MASK = (1 << _REF_BITS) - 1


def _index_rows(streams: Sequence[Stream], ends: Sequence[Sequence[int]],
                families: Sequence[tuple[int, Family]], wanted: dict[str, dict[str, int]],
                out: list[dict[str, EntityRecords]], with_reaches: bool) -> None:
    """:func:`index` record by record, for families with any key (composite, nested, not a
    string column)."""
    # per family, its rows of every stream it reads (FamilyRows) and where each stream's start
    shared: dict[int, tuple[FamilyRows, dict[int, int]]] = {}
    for k, family in families:
        mine = [si for si, stream in enumerate(streams) if stream.topic in family.topics]
        of, bases = _family_rows(streams, mine, family, with_reaches)
        shared[k] = of, dict(zip(mine, bases, strict=True))
    #: per stream, per family reading its topic: (entity id reader, key field, wanted, lists,
    #: the family's rows, the stream's first row among them)
    readers = [[(family.reader.entity_id, family.reader.key_field,
                 wanted.get(family.entity, {}), out[k], shared[k][0], shared[k][1][si])
                for k, family in families if stream.topic in family.topics]
               for si, stream in enumerate(streams)]
    # an archived record is its view (eventpulse.archive.read); only the streams these
    # families read are looked at: the others' rows may have no records
    views: list[list[Any]] = [stream.records if readers[si] else []
                              for si, stream in enumerate(streams)]
    starts = [0] * len(streams)
    n_cuts = len(ends[0]) if ends else 0
    for x in range(n_cuts):
        for si in range(len(streams)):
            lo, hi = starts[si], ends[si][x]
            if lo == hi:
                continue
            starts[si] = hi
            rows = views[si]
            for entity_id, key_field, want, lists, of, base in readers[si]:
                for i in range(lo, hi):
                    view = rows[i]
                    # the common case inline (a top-level string key), else the whole rule
                    eid = view.get(key_field) if key_field is not None else None
                    if eid.__class__ is not str or not eid:
                        eid = entity_id(view)
                        if eid is None:
                            continue
                    last = want.get(eid)
                    if last is None or last < x:
                        continue
                    found = lists.get(eid)
                    if found is None:
                        found = lists[eid] = EntityRecords([], [], of)
                    found.cuts.append(x)
                    found.rows.append(base + i)  # type: ignore[attr-defined]


def observed_since(streams: Sequence[Stream], ends: Sequence[Sequence[int]], batch: int,
                   ) -> list[tuple[int, int]]:
    """(cut index, event time) per partition joined mid-stream: the ``observed_since`` a replay
    of the whole archive in offset order records when it applies the partition's first batch
    (the combiner's rule: the earliest event time of that batch's records of the partition),
    from that cut on. That replay applies, at each cut, every partition's new rows in order, in
    batches of ``batch`` rows."""
    out = []
    for si, stream in enumerate(streams):
        if not stream.offsets or stream.starts_at <= 0:
            continue
        x = bisect.bisect_right(ends[si], 0)  # the first cut that applies a row of it
        if x == len(ends[si]):
            continue
        before = sum(e[x] - (e[x - 1] if x else 0) for e in ends[:si])
        count = min(ends[si][x], (before // batch + 1) * batch - before)
        out.append((x, pc.min(stream.table.column("timestamp").slice(0, count)).as_py()))
    return sorted(out)
