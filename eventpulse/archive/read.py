"""Read archived records back, per partition in offset order, as the feature code sees records.

The rows were decoded and pseudonymised by the worker's decoders when they were archived; here
they become record views: one dict per row of its typed and extra fields, which is what the
feature combiner reads of a record (:data:`eventpulse.tables.spec.View`), without validating
them again.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pydantic_core

from eventpulse.archive.layout import (
    BROKER_TS,
    CUTS_DIR,
    EXTRA,
    OFFSET,
    PARTITION,
    SEGMENT_HOURS,
    TIMESTAMP,
    KindLayout,
    decode_cut,
    hour_of,
    parse_cut_path,
    parse_data_name,
)
from eventpulse.archive.store import ArchiveStore
from eventpulse.streams.topics import RecordKind

log = logging.getLogger("eventpulse.archive")


#: an archived record: its typed and extra fields in one dict (extra fields win on a clash, as
#: in :func:`eventpulse.tables.spec.record_view`), the view the combiner reads of a record,
#: handed to it as it is (no object around it: a million of those cost a third of a second)
ArchivedRecord = dict[str, Any]


@dataclass(slots=True)
class Archived:
    partition: int
    offset: int
    broker_ms: int
    record: ArchivedRecord


@dataclass(slots=True)
class PartitionRows:
    """One partition's archived rows in offset order, as parallel lists (no object per row
    beyond the record itself)."""

    partition: int
    offsets: list[int]
    broker_ms: list[int]
    records: list[ArchivedRecord]
    #: the same rows as columns (:func:`read_table`'s), for readers that work column-wise
    table: pa.Table | None = None


class ArchiveError(ValueError):
    """The archive cannot be read as asked; the message says what to check."""


class ArchiveEmpty(ArchiveError):
    """A topic asked for (or every one) has no archived file where the archive was said to be."""


class ArchiveUnreadable(ArchiveError):
    """The store failed (an S3 endpoint down or refusing, a directory not readable)."""

    @classmethod
    def of(cls, store: ArchiveStore, exc: OSError) -> ArchiveUnreadable:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        credentials = "" if store.local else " and EVENTPULSE_ARCHIVE_S3_*"
        return cls(f"cannot read the archive under {store.description} ({reason}): check "
                   f"--archive or EVENTPULSE_ARCHIVE_URL{credentials}")


def _named_files(store: ArchiveStore, topic: str, warn: bool = True,
                 ) -> list[tuple[int, int, int, str]]:
    """The archive's files of a topic with the partition, first and last offset of each, from
    its name, by partition, then first offset: read one after another, their rows are in
    :func:`read_table`'s order, which then needs no sort. Only files named as the archive names
    them (``part-<partition>-<first offset>-<last offset>.parquet``) are the archive's; hidden
    files (a name starting with ``.`` or ``_``, in any directory under the topic's) are never
    read, and other files are left out with a warning naming them (``warn``; a foreign file's
    rows are not records the archive wrote, exactly once)."""
    base = f"{store.root}/topic={topic}"
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    try:
        infos = store.fs.get_file_info(selector)
    except OSError as exc:
        raise ArchiveUnreadable.of(store, exc) from None
    kept: list[tuple[int, int, int, str]] = []
    foreign: list[str] = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        parts = info.path.split(f"/topic={topic}/", 1)[-1].split("/")
        if any(part.startswith((".", "_")) for part in parts):
            continue
        named = parse_data_name(parts[-1])
        if named is None:
            foreign.append(info.path)
        else:
            kept.append((*named, info.path))
    if foreign and warn:
        foreign.sort()
        _warn_once("%d file(s) under %s/topic=%s are not named as the archive names its files "
                    "(part-<partition>-<first offset>-<last offset>.parquet) and are not read: "
                    "%s%s", len(foreign), store.description, topic, ", ".join(foreign[:5]),
                    ", ..." if len(foreign) > 5 else "")
    return sorted(kept)


#: the warnings given by this process: a command reads an archive several times (the
#: consistency report: the logged reads, then their recomputations), and says each thing once
_warned: set[str] = set()


def _warn_once(message: str, *args: Any) -> None:
    """Log a warning about the archive unless this process has given that very one (found by
    an outside test: the consistency report printed each three times)."""
    text = message % args
    if text not in _warned:
        _warned.add(text)
        log.warning("%s", text)


def gaps_of(named: list[tuple[int, int, int, str]]) -> dict[int, list[tuple[int, int]]]:
    """Per partition, the offset ranges (first, last) no file covers between two of its files:
    a segment's file lost (deleted, or never uploaded by something other than the archive,
    which commits only what it uploaded). Segments are contiguous (a refused record's offset is
    inside one), so the rows of a missing one are records a replay lacks: the values that may
    count them are ``incomplete`` (eventpulse/offline/gaps.py)."""
    ranges: dict[int, list[tuple[int, int]]] = {}
    for partition, first, last, _ in named:
        ranges.setdefault(partition, []).append((first, last))
    gaps: dict[int, list[tuple[int, int]]] = {}
    for partition, spans in sorted(ranges.items()):
        reached = None
        for first, last in sorted(set(spans)):
            if reached is not None and first > reached + 1:
                gaps.setdefault(partition, []).append((reached + 1, first - 1))
            reached = last if reached is None else max(reached, last)
    return gaps


#: the columns every archived row has a value in (eventpulse.archive.layout)
_REQUIRED = ("timestamp", PARTITION, OFFSET, BROKER_TS)


def _check_columns(table: pa.Table, store: ArchiveStore, topic: str) -> None:
    """Refuse rows without a partition, offset or time: a file named as the archive's that
    the archive did not write (its rows cannot be placed in the replay)."""
    missing = [name for name in _REQUIRED if name not in table.column_names]
    if not missing:
        missing = [name for name in _REQUIRED if table.column(name).null_count]
    if missing:
        raise ArchiveError(f"archived rows of topic {topic} under {store.description} without "
                           f"{', '.join(missing)}: a file there is named as the archive's "
                           "but was not written by it; move it away")


def _check_placed(tagged: list[tuple[str, pa.RecordBatch]],
                  named: list[tuple[int, int, int, str]], store: ArchiveStore, topic: str,
                  ) -> None:
    """Refuse a file holding rows outside the partition and offsets its name says: a file
    changed or renamed after the archive wrote it (found by an outside test: such rows were
    read under the partition they name, and the offsets the name covers, which lacked their
    records, read as complete). Its name is what the gaps are found by, so its rows cannot be
    trusted to be the segment's; moved away, its offsets read as records the archive lost."""
    placed = {path: (partition, first, last) for partition, first, last, path in named}
    for path, batch in tagged:
        if batch.num_rows == 0:
            continue
        partition, first, last = placed[path]
        partitions = pc.min_max(batch.column(PARTITION))
        offsets = pc.min_max(batch.column(OFFSET))
        low, high = partitions["min"].as_py(), partitions["max"].as_py()
        least, most = offsets["min"].as_py(), offsets["max"].as_py()
        if low == high == partition and first <= least and most <= last:
            continue
        held = f"partition {low}" if low == high else f"partitions {low}-{high}"
        raise ArchiveError(
            f"{path} (topic {topic} under {store.description}) holds rows of {held}, offsets "
            f"{least}-{most}, where its name says partition {partition}, offsets {first}-{last}: "
            "the file was changed or renamed after the archive wrote it; restore it, or move it "
            "away (its offsets are then read as records the archive lost)")


def _in_offset_order(table: pa.Table, store: ArchiveStore, topic: str) -> pa.Table:
    """``table`` sorted by partition, then offset (files read in their names' order usually
    are already: checked in C, sorted only where not), with one row per (partition, offset),
    the first: a row the archive wrote is in exactly one file, so a second is a copy made
    outside it (a file copied under another segment's name), left out with a warning."""
    later, again = _after_previous(table)
    if not pc.all(pc.or_(later, again)).as_py():
        table = table.sort_by([(PARTITION, "ascending"), (OFFSET, "ascending")])
        _, again = _after_previous(table)
    copies = pc.sum(again).as_py() or 0
    if not copies:
        return table
    _warn_once("%d archived row(s) of topic %s under %s repeat a (partition, offset) of an "
                "earlier file and are not read: a copy made outside the archive?", copies,
                topic, store.description)
    return table.filter(pa.concat_arrays([pa.array([True]), pc.invert(again)]))


def _after_previous(table: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Per row but the first, whether its (partition, offset) comes after the row before's,
    and whether it is the same."""
    n = max(0, table.num_rows - 1)
    partitions = table.column(PARTITION).combine_chunks()
    offsets = table.column(OFFSET).combine_chunks()
    before, after = partitions.slice(0, n), partitions.slice(1)
    same = pc.equal(after, before)
    earlier, later = offsets.slice(0, n), offsets.slice(1)
    return (pc.or_(pc.greater(after, before), pc.and_(same, pc.greater(later, earlier))),
            pc.and_(same, pc.equal(later, earlier)))


def require_files(store: ArchiveStore, topics: Iterable[str]) -> None:
    """Raise :class:`ArchiveEmpty` unless every one of ``topics`` has files, or cut markers
    (its files lost: the values they may change are marked): a mistyped directory, bucket or
    prefix otherwise reads as an archive of nothing, and a topic the archive does not store
    (``EVENTPULSE_ARCHIVE_TOPICS``) as one without records, every value of its features
    ``missing`` (found by an outside test: exit 0, no word)."""
    wanted = sorted(set(topics))
    empty = [topic for topic in wanted
             if not _named_files(store, topic, warn=False) and not _has_cut_markers(store, topic)]
    if not empty:
        return
    credentials = "" if store.local else " (and EVENTPULSE_ARCHIVE_S3_*)"
    if empty == wanted:
        raise ArchiveEmpty(f"no archived file of {', '.join(wanted)} under {store.description}"
                           f"{_not_there(store)}: check --archive or EVENTPULSE_ARCHIVE_URL"
                           f"{credentials}")
    raise ArchiveEmpty(
        f"no archived file of topic {', '.join(empty)} under {store.description}, where "
        f"{', '.join(t for t in wanted if t not in empty)} has files: the archive does not store "
        "it (EVENTPULSE_ARCHIVE_TOPICS) or its files were removed, and its features would all "
        "read missing: archive it, or leave its features out (training-set --features)")


def _not_there(store: ArchiveStore) -> str:
    """What of the archive's root is missing, said after its name: its bucket (on S3) or its
    directory ("" where it is there, or the store does not say)."""
    top = store.root.split("/", 1)[0] if not store.local else store.root
    try:
        found = store.fs.get_file_info(top)
    except OSError:
        return ""
    if found.type == pafs.FileType.NotFound:
        return " (no such bucket)" if not store.local else " (no such directory)"
    return ""


def _has_cut_markers(store: ArchiveStore, topic: str) -> bool:
    """Whether the archive cut some segment of ``topic`` (``_cuts/``: a marker per segment)."""
    selector = pafs.FileSelector(f"{store.root}/{CUTS_DIR}/topic={topic}", recursive=True,
                                 allow_not_found=True)
    try:
        return any(info.type == pafs.FileType.File for info in store.fs.get_file_info(selector))
    except OSError as exc:
        raise ArchiveUnreadable.of(store, exc) from None


def read_table(store: ArchiveStore, topic: str, until_broker_ms: int | None = None) -> pa.Table:
    """Every archived row of a topic, sorted by partition and offset, timestamps as epoch
    milliseconds. ``until_broker_ms``: of each partition, only the rows a replay up to that time
    can count: those before the first row the broker had after it. Not every row the broker
    had by then: broker times (CreateTime, as producers set them) can go back within a
    partition, and a row after one the broker had later counts only from that later time
    (found by an outside test: dropping the later row made the ones after it count early)."""
    return read_topic(store, topic, until_broker_ms).table


@dataclass(slots=True)
class TopicRows:
    """A topic's archived rows (:func:`read_table`) and, per partition, the first offset its
    archive covers: the first file's first offset, from its name. Refused records (dead
    letters) have offsets and no rows, so a partition whose first records were refused is
    archived from offset 0 although its first row is later: the worker read it from its start
    (a replay must not take it for a partition joined mid-stream, whose values are partial)."""

    table: pa.Table
    starts: dict[int, int]
    #: per partition, the offset ranges whose records some file lacks: between its files, none
    #: covers them (:func:`gaps_of`); or a segment's hour file is gone (:func:`lost_hours`)
    gaps: dict[int, list[tuple[int, int]]] = field(default_factory=dict)


def read_topic(store: ArchiveStore, topic: str, until_broker_ms: int | None = None,
               ) -> TopicRows:
    """:func:`read_table`, with where each partition's archive starts."""
    named = _named_files(store, topic)
    # every file of the topic gone, their cut markers kept: no rows, only what was lost
    gaps = _lost_records(store, topic, named)
    if not named:
        return TopicRows(pa.table({}), {}, gaps)
    starts: dict[int, int] = {}
    for partition, first, _, _ in named:  # by partition, then first offset: the first is least
        starts.setdefault(partition, first)
    table, left_out = _read_rows(store, topic, named, until_broker_ms)
    # a gap after a row left out (the broker had it after ``until_broker_ms``) came later still
    relevant = {partition: kept for partition, spans in gaps.items()
                if (kept := [span for span in spans if span[0] <= left_out.get(partition, span[0])])}
    return TopicRows(table, starts, relevant)


def _lost_records(store: ArchiveStore, topic: str, named: list[tuple[int, int, int, str]],
                  ) -> dict[int, list[tuple[int, int]]]:
    """Per partition, the offset ranges whose records the archive lost, each named in a
    warning: between two files (:func:`gaps_of`), a segment's hour file (:func:`lost_hours`),
    a segment cut and without files (:func:`lost_segments`)."""
    gaps = gaps_of(named)
    for partition, spans in sorted(gaps.items()):
        for first, last in spans:
            _warn_once("the archive of topic %s under %s has no file for offsets %d-%d of "
                       "partition %d: values that may count those records get the status "
                       "incomplete (was a file removed?)", topic, store.description, first,
                       last, partition)
    for lost in (lost_hours(store, topic, named), lost_segments(store, topic, named, gaps)):
        for partition, spans in lost.items():
            gaps[partition] = sorted(set(gaps.get(partition, [])).union(spans))
    return gaps


def lost_segments(store: ArchiveStore, topic: str, named: list[tuple[int, int, int, str]],
                  named_gaps: dict[int, list[tuple[int, int]]] | None = None,
                  ) -> dict[int, list[tuple[int, int]]]:
    """Per partition, the segments (first, last offset) the archive cut, by its markers
    (``_cuts/``: one per segment, written before its files), that no file holds: a partition's
    first or last file removed leaves no hole between files (found by an outside test: 144
    values of a lost last file read ``present`` without a word). A marker without files is
    also an upload the archive has not finished (a crash between the two: it rewrites them),
    which the warning says too: either way the records are not in the archive. A segment
    inside ``named_gaps`` (between two files) is warned of once, as such."""
    base = f"{store.root}/{CUTS_DIR}/topic={topic}"
    try:
        infos = store.fs.get_file_info(pafs.FileSelector(base, recursive=True,
                                                          allow_not_found=True))
    except OSError as exc:
        raise ArchiveUnreadable.of(store, exc) from None
    held = {(partition, first) for partition, first, _, _ in named}
    lost: dict[int, list[tuple[int, int]]] = {}
    for info in infos:
        cut = parse_cut_path(info.path) if info.type == pafs.FileType.File else None
        if cut is None or cut in held:
            continue
        try:
            with store.fs.open_input_stream(info.path) as source:
                end = decode_cut(source.read())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a marker the archive wrote
        partition, start = cut
        lost.setdefault(partition, []).append((start, end))
        if any(first <= start and end <= last
               for first, last in (named_gaps or {}).get(partition, ())):
            continue  # between two files: warned of as such (gaps_of)
        _warn_once("the archive of topic %s under %s cut offsets %d-%d of partition %d (its "
                   "marker is in %s/) but holds no file of them: values that may count those "
                   "records get the status incomplete (a file removed, or an upload the "
                   "archive has not finished)", topic, store.description, start, end,
                   partition, CUTS_DIR)
    return lost


def lost_hours(store: ArchiveStore, topic: str, named: list[tuple[int, int, int, str]],
               ) -> dict[int, list[tuple[int, int]]]:
    """Per partition, the segments (first, last offset) one of whose hour files is gone: a
    segment spanning two event-time hours is a file of one name in each hour's directory, and
    each says in its footer which hours they are (``SEGMENT_HOURS``), so a removed hour
    directory does not go unseen (found by an outside test: the name left in the other hour
    covered the offsets, and values lacking 55 rows read ``present``). Files without that
    footer key (written by an older eventpulse, or rewritten by another tool) are not
    checked. One footer per segment, read on threads (a store's round trips)."""
    segments: dict[tuple[int, int, int], list[str]] = {}
    for partition, first, last, path in named:
        segments.setdefault((partition, first, last), []).append(path)

    def hours_listed(path: str) -> str | None:
        try:
            with store.fs.open_input_file(path) as source:
                metadata = pq.read_metadata(source).metadata or {}
        except (OSError, pa.ArrowException):
            return None  # the read of its rows says what is wrong with it
        listed = metadata.get(SEGMENT_HOURS)
        return None if listed is None else listed.decode()

    keys = list(segments)
    with ThreadPoolExecutor(max_workers=8) as pool:
        listed = list(pool.map(hours_listed, [segments[key][0] for key in keys]))
    lost: dict[int, list[tuple[int, int]]] = {}
    for (partition, first, last), hours in zip(keys, listed, strict=True):
        if hours is None:
            continue
        present = {hour_of(path) for path in segments[(partition, first, last)]}
        missing = [hour for hour in hours.split(",") if hour not in present]
        if missing:
            lost.setdefault(partition, []).append((first, last))
            _warn_once("the archive of topic %s under %s has no file of offsets %d-%d of "
                       "partition %d in %s (its other hours' files are read): values that may "
                       "count its records get the status incomplete (was an hour removed?)",
                       topic, store.description, first, last, partition, ", ".join(missing))
    return lost


def _read_rows(store: ArchiveStore, topic: str, named: list[tuple[int, int, int, str]],
               until_broker_ms: int | None) -> tuple[pa.Table, dict[int, int]]:
    """The rows of the files ``named`` (:func:`_named_files`; of each partition those the
    broker had by ``until_broker_ms``), and per partition whose rows were cut so, the offset of
    its first row left out."""
    files = [path for *_, path in named]
    try:
        first = ds.dataset(files, filesystem=store.fs, format="parquet").schema  # its 1st file's
        scanner = ds.dataset(files, filesystem=store.fs, format="parquet",
                             schema=_as_archived(first)).scanner()
        # batch by batch, each with its file (in the files' order): as fast as one table
        tagged = [(found.fragment.path, found.record_batch) for found in scanner.scan_batches()]
        table = pa.Table.from_batches([batch for _, batch in tagged],
                                      schema=scanner.projected_schema)
    except OSError as exc:  # pyarrow's errors of the store are OSErrors
        raise ArchiveUnreadable.of(store, exc) from None
    except pa.ArrowException as exc:  # a file that is not parquet, or of another schema
        raise ArchiveError(f"cannot read the archive of topic {topic} under "
                           f"{store.description}: {_unreadable(exc)}") from None
    _check_columns(table, store, topic)
    _check_placed(tagged, named, store, topic)
    for name in ("timestamp", BROKER_TS):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, table.column(name).cast(pa.int64()))
    table = _in_offset_order(table, store, topic)
    if until_broker_ms is None or table.num_rows == 0:
        return table, {}
    kept = []
    left_out: dict[int, int] = {}
    start = 0
    for count in pc.value_counts(table.column(PARTITION)).field("counts").to_pylist():
        # the highest broker time up to each row only grows: the rows kept are a prefix
        reach = pc.cumulative_max(table.column(BROKER_TS).slice(start, count))
        taken = pc.sum(pc.less_equal(reach, until_broker_ms)).as_py() or 0
        kept.append(table.slice(start, taken))
        if taken < count:
            left_out[table.column(PARTITION)[start].as_py()] = table.column(OFFSET)[
                start + taken].as_py()
        start += count
    return pa.concat_tables(kept), left_out


def _unreadable(exc: pa.ArrowException) -> str:
    """Why Arrow could not read the files, in the archive's words where we know them."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "would lose data" in text and "timestamp" in text:
        # a time cast to milliseconds that has a finer part (found by an outside test: Arrow's
        # own words, "Casting from timestamp[us, tz=UTC] ... would lose data: 1796...")
        return ("a file there holds a time finer than a millisecond (the archive writes "
                "milliseconds: another tool rewrote it?); floor its times to milliseconds or "
                "move it away")
    return text


def _as_archived(schema: pa.Schema) -> pa.Schema:
    """``schema`` (a file's) with its columns typed as the archive writes them, whatever another
    tool that rewrote a file made of them; every file is read into it: the event and broker
    times in milliseconds (a file in microseconds read in its own unit, not in the first
    file's, which read other files' times a thousand-fold), a dictionary-encoded column
    (pandas' categories) as its values (the readers compare and join columns whose
    dictionaries differ from file to file)."""
    for index, column in enumerate(schema):
        if column.name in ("timestamp", BROKER_TS):
            schema = schema.set(index, pa.field(column.name, TIMESTAMP))
        elif pa.types.is_dictionary(column.type):
            schema = schema.set(index, pa.field(column.name, column.type.value_type))
    return schema


def records(table: pa.Table, kind: RecordKind) -> Iterator[Archived]:
    """The rows of :func:`read_table` as records, in its order."""
    for rows in partitions(table, kind):
        for offset, broker, record in zip(rows.offsets, rows.broker_ms, rows.records,
                                          strict=True):
            yield Archived(rows.partition, offset, broker, record)


def partitions(table: pa.Table, kind: RecordKind) -> list[PartitionRows]:
    """The rows of :func:`read_table`, partition by partition, as records."""
    return [PartitionRows(partition, part.column(OFFSET).to_pylist(),
                          part.column(BROKER_TS).to_pylist(), records_of(part, kind), part)
            for partition, part in partition_tables(table)]


def partition_tables(table: pa.Table) -> list[tuple[int, pa.Table]]:
    """The rows of :func:`read_table` per partition, as columns: slices of it (it is sorted by
    partition), nothing copied."""
    if table.num_rows == 0:
        return []
    runs = pc.run_end_encode(table.column(PARTITION).combine_chunks())
    out = []
    start = 0
    for partition, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        out.append((partition, table.slice(start, end - start)))
        start = end
    return out


def records_of(table: pa.Table, kind: RecordKind, fields: Collection[str] | None = None,
               ) -> list[ArchivedRecord]:
    """Archived rows as records, in order. Columns are turned into Python values column by
    column (in C), then zipped into one dict per row; only JSON text (free-form fields, extra
    fields) is parsed per row. ``fields``: the record kind's fields to keep (besides its
    ``timestamp`` and every extra field; default: all), for a reader that knows what it reads
    (a dict of five entries instead of eight costs about a quarter less)."""
    layout = KindLayout(kind)
    names = _kept_fields(layout, fields)
    typed = [_values(table.column(name)) for name in names]
    for k, name in enumerate(names):
        if name in layout.json_fields:
            typed[k] = [None if v is None else _loads(v) for v in typed[k]]
    # one dict per row; extra fields (JSON) only where a row has them
    rows = list(map(_row_maker(tuple(names)), *typed))
    for fields, extra in zip(rows, table.column(EXTRA).to_pylist(), strict=True):
        if extra is not None:
            found = _loads(extra)
            if not isinstance(found, dict):
                raise ArchiveError(f"an archived row holds {extra[:60]!r} where the archive "
                                   "writes a JSON object (the extra fields): a file of the "
                                   "archive was changed after the archive wrote it; restore "
                                   "or move it")
            fields.update(found)
    return rows


def record_columns(kind: RecordKind, fields: Collection[str] | None = None) -> list[str]:
    """The columns :func:`records_of` reads: the record kind's fields kept, then the extra
    fields' (a reader taking rows out of a table takes these alone)."""
    return [*_kept_fields(KindLayout(kind), fields), EXTRA]


def _kept_fields(layout: KindLayout, fields: Collection[str] | None) -> list[str]:
    """The record kind's fields kept (``fields``, and the timestamp; None: all)."""
    return [name for name in layout.fields
            if fields is None or name in fields or name == "timestamp"]


@functools.lru_cache(maxsize=64)
def _row_maker(names: tuple[str, ...]) -> Callable[..., dict[str, Any]]:
    """A function of one value per name that returns the dict of them: a dict display with
    constant keys, built in one step (half of what ``dict(zip(names, row))`` costs a row, with
    its zip and tuple). Made from source, as the standard library makes namedtuples; the names
    are the record kind's fields (``KindLayout.fields``), written into it as literals."""
    params = ", ".join(f"v{k}" for k in range(len(names)))
    display = ", ".join(f"{name!r}: v{k}" for k, name in enumerate(names))
    made: Callable[..., dict[str, Any]] = eval(f"lambda {params}: {{{display}}}")
    return made


def _values(column: pa.ChunkedArray) -> list[Any]:
    """A column as Python values; a string column through a dictionary, so that equal strings
    are one object (an action, a device, a user id repeated over a million rows: about 0.2 GB
    less per million records, at the same speed)."""
    if len(column) < 2 or not (pa.types.is_string(column.type)
                               or pa.types.is_large_string(column.type)):
        return column.to_pylist()  # type: ignore[no-any-return]
    encoded = pc.dictionary_encode(column.combine_chunks(), null_encoding="encode")
    return list(operator.itemgetter(*encoded.indices.to_pylist())(encoded.dictionary.to_pylist()))


def _loads(text: str) -> Any:
    """JSON text as Python values: pydantic-core's parser (Rust; a sixth of ``json.loads``' time
    on the archive's extra fields), ``json.loads`` for what it refuses and the standard library
    takes (an escaped lone surrogate, which the writer's ``json.dumps`` can produce)."""
    try:
        return pydantic_core.from_json(text)
    except ValueError:
        try:
            return json.loads(text)
        except ValueError:
            raise ArchiveError(f"an archived row holds {text[:60]!r} where the archive writes "
                               "JSON: a file of the archive was changed after the archive "
                               "wrote it; restore or move it") from None
