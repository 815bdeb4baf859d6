"""The archive's own CPU per record, in-process: decode, row, cut, parquet (no Kafka, no store).

    .venv/bin/python bench/archive_cpu.py TREE [--events 200000]

``TREE`` is a source tree of eventpulse (this checkout, or an older commit exported with
``git archive <ref> | tar -x -C /tmp/base``); its ``eventpulse`` is imported, so that runs of
two trees alternate on the same events (bench/throughput.py's) and the same machine. Prints one
line: microseconds of CPU (process time) per record.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tree", type=Path)
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    tree = str(args.tree.resolve())
    sys.path[:0] = [tree, str(Path(__file__).parent)]
    import eventpulse
    if not (eventpulse.__file__ or "").startswith(tree):
        raise SystemExit(f"imported {eventpulse.__file__}, not from {tree}")
    from throughput import make_events

    from eventpulse.archive.layout import KindLayout
    from eventpulse.archive.segment import CutRules, PartitionSegmenter
    from eventpulse.archive.writer import encode
    from eventpulse.streams.decode import RecordDecoder
    from eventpulse.streams.topics import RecordKind

    events = make_events(args.events)
    now = int(time.time() * 1000)
    layout, decoder = KindLayout(RecordKind.BEHAVIOUR), RecordDecoder(RecordKind.BEHAVIOUR)
    segmenter = PartitionSegmenter("events", 0, CutRules(max_records=50_000))
    started = time.process_time()
    for offset, raw in enumerate(events):  # as ArchiveService._cut, one partition
        record = decoder.decode(raw, now)
        row = layout.row(record, 0, offset, now)  # type: ignore[arg-type]
        if not segmenter.is_open:
            segmenter.begin(offset, None)
        if segmenter.append(offset, len(raw), record.timestamp, row):  # type: ignore[union-attr]
            encode(layout, segmenter.close())
    seconds = time.process_time() - started
    print(f"{tree}: archive_cpu_us_per_record={1e6 * seconds / args.events:.2f}", flush=True)


if __name__ == "__main__":
    main()
