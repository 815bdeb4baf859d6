"""Read archived records back, per partition in offset order, as the feature code sees records.

The rows were decoded and pseudonymised by the worker's decoders when they were archived; here
they become light record objects with the two things the feature combiner reads (``__dict__``
with the typed fields and ``__pydantic_extra__``), without validating them again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from eventpulse.archive.layout import BROKER_TS, EXTRA, OFFSET, PARTITION, KindLayout
from eventpulse.archive.store import ArchiveStore
from eventpulse.streams.topics import RecordKind


class ArchivedRecord:
    """A record as the combiner reads it: typed fields in ``__dict__``, extra fields apart."""

    __slots__ = ("__dict__", "__pydantic_extra__")

    def __init__(self, fields: dict[str, Any], extra: dict[str, Any] | None) -> None:
        self.__dict__ = fields
        self.__pydantic_extra__ = extra

    timestamp: int


@dataclass(slots=True)
class Archived:
    partition: int
    offset: int
    broker_ms: int
    record: ArchivedRecord


def topic_files(store: ArchiveStore, topic: str) -> list[str]:
    selector = pafs.FileSelector(f"{store.root}/topic={topic}", recursive=True,
                                 allow_not_found=True)
    return sorted(i.path for i in store.fs.get_file_info(selector)
                  if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def read_table(store: ArchiveStore, topic: str, until_broker_ms: int | None = None) -> pa.Table:
    """Every archived row of a topic (optionally: only those the broker had by a time), sorted
    by partition and offset, timestamps as epoch milliseconds."""
    files = topic_files(store, topic)
    if not files:
        return pa.table({})
    dataset = ds.dataset(files, filesystem=store.fs, format="parquet")
    table = dataset.to_table()
    if until_broker_ms is not None:
        broker = table.column(BROKER_TS).cast(pa.int64())
        table = table.filter(pc.less_equal(broker, until_broker_ms))
    for name in ("timestamp", BROKER_TS):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, name, table.column(name).cast(pa.int64()))
    return table.sort_by([(PARTITION, "ascending"), (OFFSET, "ascending")])


def records(table: pa.Table, kind: RecordKind) -> Iterator[Archived]:
    """The rows of :func:`read_table` as records, in its order."""
    if table.num_rows == 0:
        return
    layout = KindLayout(kind)
    names = layout.fields
    json_fields = layout.json_fields
    columns = {name: table.column(name).to_pylist() for name in
               [*names, EXTRA, PARTITION, OFFSET, BROKER_TS]}
    typed = [columns[n] for n in names]
    extras, partitions, offsets, brokers = (columns[EXTRA], columns[PARTITION], columns[OFFSET],
                                            columns[BROKER_TS])
    loads = json.loads
    for values, extra, partition, offset, broker in zip(zip(*typed, strict=True), extras,
                                                        partitions, offsets, brokers, strict=True):
        fields = dict(zip(names, values, strict=True))
        for name in json_fields:
            if fields[name] is not None:
                fields[name] = loads(fields[name])
        yield Archived(partition, offset, broker,
                       ArchivedRecord(fields, loads(extra) if extra is not None else None))
