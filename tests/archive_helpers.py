"""Helpers of the archive tests: produce with the offsets Kafka gave, read every archived row."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from aiokafka import AIOKafkaProducer

Key = tuple[str, int, int]  # topic, partition, offset


async def produce_tracked(bootstrap: str, items: list[tuple[str, Any]]) -> list[Key]:
    """Send (topic, record or raw bytes) in order; the (topic, partition, offset) of each."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                enable_idempotence=False, max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = []
        for topic, record in items:
            value = record if isinstance(record, bytes) else json.dumps(record).encode()
            futures.append(await producer.send(topic, value))
        await producer.flush()
        out = []
        for future in futures:
            meta = await future
            out.append((meta.topic, meta.partition, meta.offset))
        return out
    finally:
        await producer.stop()


def archived_rows(fs: pafs.FileSystem, root: str, columns: list[str] | None = None,
                  ) -> list[dict[str, Any]]:
    """Every row of every data file under root, with its topic and file name (the files read
    on a few threads: one at a time, the reads' latency made this a tenth of a long test)."""
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    paths = [info.path for info in fs.get_file_info(selector)
             if info.type == pafs.FileType.File and info.path.endswith(".parquet")]

    def read(path: str) -> pa.Table:
        return ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)

    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(8) as pool:
        for path, table in zip(paths, pool.map(read, paths), strict=True):
            relative = path[len(root):].lstrip("/")
            topic = relative.split("/", 1)[0].removeprefix("topic=")
            rows += [{**row, "topic": topic, "file": relative} for row in table.to_pylist()]
    return rows


def count_rows(fs: pafs.FileSystem, root: str) -> int:
    """Rows of every data file under root (read afresh: see :class:`RowCounter` for polls)."""
    return RowCounter(fs, root)()


class RowCounter:
    """Rows of the data files under root, for a test polling until the archive has landed
    what it should: each file's footer read once (the archive writes a name once, or again
    with the same rows after a replay), so a poll costs a listing and the new files' footers.
    Reading every footer at each poll kept moto (a server in the test's process) busy enough
    to slow the archive's own uploads. What landed is checked row by row elsewhere
    (:func:`archived_rows`); this only says when to look."""

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self.fs, self.root = fs, root
        self._rows: dict[str, int] = {}

    def __call__(self) -> int:
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        paths = [i.path for i in self.fs.get_file_info(selector)
                 if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
        for path in paths:
            if path not in self._rows:
                self._rows[path] = pq.read_metadata(path, filesystem=self.fs).num_rows
        return sum(self._rows[path] for path in paths)
