"""Where files are cut: a pure function of the partition's records, so a replay cuts the same.

A *segment* is a contiguous offset range of one Kafka partition; it becomes one parquet file per
event-time hour its records fall in. Rules, applied in offset order:

- a segment closes *after* the record that brings it to ``max_records`` records or ``max_bytes``
  raw bytes (known without looking further);
- a valid record whose event time is ``max_span_ms`` or more past the segment's first event time
  opens a new segment (so data lands every few minutes of event time). This needs the *next*
  record, so the open tail of a fetch is held in memory, uncommitted: after a crash it is read
  again from the last committed offset and cut at the same place;
- a segment starts where the last one ended (its offset + 1; after a restart, the committed
  offset): offsets Kafka gives no record (transaction markers, compacted records) are inside a
  segment's range, so a partition's files cover its offsets without a hole, and a hole means a
  file lost (:func:`eventpulse.archive.read.gaps_of`);
- a segment without a valid record does not close (it would have no file, a hole): it grows
  until one comes;
- a tail idle for a while on the wall clock is cut early (so a quiet partition still lands).
  That choice is not reproducible, so every cut is first written down as a marker object
  (``_cuts/...``, start offset -> end offset) before any data file; a segment that starts where
  a marker exists ends where the marker says. A replay therefore rewrites exactly the objects
  of the first attempt, whatever settings or timing changed in between.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CutRules:
    max_records: int = 100_000
    max_bytes: int = 32 * 1024 * 1024
    max_span_ms: int = 300_000


@dataclass(slots=True)
class Segment:
    topic: str
    partition: int
    start: int
    end: int
    #: rows (see :class:`eventpulse.archive.layout.KindLayout`) with their event time first
    rows: list[tuple[int, tuple[Any, ...]]]
    #: True when a marker already fixed this cut (no need to write it again)
    from_marker: bool


@dataclass(slots=True)
class PartitionSegmenter:
    """The open segment of one partition."""

    topic: str
    partition: int
    rules: CutRules
    start: int | None = None
    last_offset: int = -1
    count: int = 0
    size: int = 0
    first_ts: int | None = None
    #: end offset a marker fixed for the open segment
    fixed_end: int | None = None
    rows: list[tuple[int, tuple[Any, ...]]] = field(default_factory=list)
    #: where the next segment starts: the last one's end + 1 (None: at its first record; the
    #: committed offset after a restart)
    next_start: int | None = None

    @property
    def is_open(self) -> bool:
        return self.start is not None

    def closes_before(self, offset: int, ts: int | None) -> bool:
        """Does this record open a new segment (the open one closing first)?"""
        if self.start is None:
            return False
        if self.fixed_end is not None:
            return offset > self.fixed_end
        return ts is not None and self.first_ts is not None and ts - self.first_ts >= \
            self.rules.max_span_ms

    def start_for(self, offset: int) -> int:
        """Where a segment opened by the record at ``offset`` starts."""
        return offset if self.next_start is None else self.next_start

    def begin(self, offset: int, fixed_end: int | None) -> None:
        """Open a segment at ``offset`` (:meth:`start_for` the first record's offset)."""
        self.start, self.fixed_end = offset, fixed_end
        self.count = self.size = 0
        self.first_ts = None
        self.rows = []

    def append(self, offset: int, size: int, ts: int | None, row: tuple[Any, ...] | None) -> bool:
        """Add a record (``row`` None: refused, only its offset counts). True: the segment is
        full and must close now."""
        self.last_offset = offset
        self.count += 1
        self.size += size
        if row is not None and ts is not None:
            if self.first_ts is None:
                self.first_ts = ts
            self.rows.append((ts, row))
        if self.fixed_end is not None:
            return offset >= self.fixed_end
        return bool(self.rows) and (self.count >= self.rules.max_records
                                    or self.size >= self.rules.max_bytes)

    def close(self) -> Segment:
        assert self.start is not None
        end = self.fixed_end if self.fixed_end is not None else self.last_offset
        segment = Segment(self.topic, self.partition, self.start, end, self.rows,
                          self.fixed_end is not None)
        self.start, self.fixed_end, self.rows = None, None, []
        self.next_start = end + 1
        return segment
