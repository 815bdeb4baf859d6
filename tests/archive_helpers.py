"""Helpers of the archive tests: produce with the offsets Kafka gave, read every archived row."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.dataset as ds
import pyarrow.fs as pafs
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
    """Every row of every data file under root, with its topic and file name."""
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    rows: list[dict[str, Any]] = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        relative = info.path[len(root):].lstrip("/")
        topic = relative.split("/", 1)[0].removeprefix("topic=")
        table = ds.dataset(info.path, filesystem=fs, format="parquet").to_table(columns=columns)
        for row in table.to_pylist():
            rows.append({**row, "topic": topic, "file": relative})
    return rows


def count_rows(fs: pafs.FileSystem, root: str) -> int:
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    paths = [i.path for i in fs.get_file_info(selector)
             if i.type == pafs.FileType.File and i.path.endswith(".parquet")]
    if not paths:
        return 0
    return int(ds.dataset(paths, filesystem=fs, format="parquet").count_rows())
