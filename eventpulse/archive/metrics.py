"""Prometheus metrics of the archive service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

ROWS = Counter("eventpulse_archive_rows_total", "Valid records written to the archive", ["topic"])
REFUSED = Counter("eventpulse_archive_refused_total",
                  "Records the archive skipped as invalid (the feature agent dead-letters them)",
                  ["topic"])
FILES = Counter("eventpulse_archive_files_total", "Parquet objects written", ["topic"])
BYTES = Counter("eventpulse_archive_bytes_total", "Parquet bytes written", ["topic"])
RETRIES = Counter("eventpulse_archive_store_retries_total",
                  "Store calls retried after an error (the store was unreachable)")
COMMITTED = Gauge("eventpulse_archive_committed_offset",
                  "Next offset to archive per partition (committed after upload)",
                  ["topic", "partition"])
STORE_UP = Gauge("eventpulse_archive_store_up", "1 while the last store call succeeded")
