"""A closed segment -> its parquet files (one per event-time hour), deterministically."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from eventpulse.archive.layout import HOUR_MS, KindLayout, data_path
from eventpulse.archive.segment import Segment


def encode(layout: KindLayout, segment: Segment) -> list[tuple[str, bytes, int]]:
    """``(object name, parquet bytes, rows)`` per hour; rows in offset order within a file.

    The same segment always encodes to the same bytes (no wall-clock metadata is written), so a
    replay that rewrites a file writes what is already there.
    """
    by_hour: dict[int, list[tuple[object, ...]]] = {}
    for ts, row in segment.rows:
        by_hour.setdefault(ts - ts % HOUR_MS, []).append(row)
    out = []
    for hour, rows in sorted(by_hour.items()):
        sink = pa.BufferOutputStream()
        pq.write_table(layout.table(rows), sink, compression="zstd")
        name = data_path(segment.topic, hour, segment.partition, segment.start, segment.end)
        out.append((name, sink.getvalue().to_pybytes(), len(rows)))
    return out
