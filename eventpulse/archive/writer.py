"""A closed segment -> its parquet files (one per event-time hour), deterministically."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from eventpulse.archive.layout import HOUR_MS, SEGMENT_HOURS, KindLayout, data_path, hour_of
from eventpulse.archive.segment import Segment


def encode(layout: KindLayout, segment: Segment) -> list[tuple[str, bytes, int]]:
    """``(object name, parquet bytes, rows)`` per hour; rows in offset order within a file.

    The same segment always encodes to the same bytes (no wall-clock metadata is written), so a
    replay that rewrites a file writes what is already there.
    """
    by_hour: dict[int, list[tuple[object, ...]]] = {}
    for ts, row in segment.rows:
        by_hour.setdefault(ts - ts % HOUR_MS, []).append(row)
    names = [data_path(segment.topic, hour, segment.partition, segment.start, segment.end)
             for hour in sorted(by_hour)]
    # every file says which hours the segment's files are in (a reader finds a lost one)
    hours = ",".join(hour_of(name) or "" for name in names).encode()
    out = []
    for name, (_, rows) in zip(names, sorted(by_hour.items()), strict=True):
        sink = pa.BufferOutputStream()
        table = layout.table(rows)
        pq.write_table(table.replace_schema_metadata(
            {**(table.schema.metadata or {}), SEGMENT_HOURS: hours}), sink,
                       compression="zstd")
        out.append((name, sink.getvalue().to_pybytes(), len(rows)))
    return out
