"""Object names and the parquet schema of the archive: the contract other readers rely on.

Names derive only from records (topic, event-time hour, Kafka partition and the segment's offset
range), never from the wall clock, so a replay after a crash rewrites the same names with the
same content. Kept in one place: the writer, the readers and docs/archive.md follow it.
"""

from __future__ import annotations

import json
import operator
import re
import types
from datetime import UTC, datetime
from typing import Any, Union, get_args, get_origin

import orjson
import pyarrow as pa

from eventpulse.streams.schemas import SCHEMAS, Record
from eventpulse.streams.topics import RecordKind

HOUR_MS = 3_600_000
#: columns every file carries after the record's own fields
EXTRA = "extra"
PARTITION = "kafka_partition"
OFFSET = "kafka_offset"
BROKER_TS = "kafka_timestamp"
TIMESTAMP = pa.timestamp("ms", tz="UTC")
#: the per-partition markers that make every cut durable (see :mod:`eventpulse.archive.segment`)
CUTS_DIR = "_cuts"


def hour_dir(topic: str, event_ms: int) -> str:
    """``topic=<t>/date=<YYYY-MM-DD>/hour=<HH>`` of an event time (UTC)."""
    at = datetime.fromtimestamp((event_ms - event_ms % HOUR_MS) / 1000, UTC)
    return f"topic={topic}/date={at:%Y-%m-%d}/hour={at:%H}"


def data_path(topic: str, hour_start_ms: int, partition: int, start: int, end: int) -> str:
    """One file per (segment, event-time hour): the segment's offsets make the name unique."""
    return f"{hour_dir(topic, hour_start_ms)}/{data_name(partition, start, end)}"


def data_name(partition: int, start: int, end: int) -> str:
    """The name of a segment's file (in each hour directory it spans)."""
    return f"part-{partition:05d}-{start:020d}-{end:020d}.parquet"


#: what :func:`data_name` writes (any width of digits read)
_DATA_NAME = re.compile(r"part-(\d+)-(\d+)-(\d+)\.parquet")


#: the footer key (parquet key-value metadata) of every file of a segment listing the hour
#: directories (``date=<d>/hour=<h>``, comma-separated) that all its files are in: a reader
#: tells that one of them is gone (an hour directory removed), which the names alone do not say
SEGMENT_HOURS = b"eventpulse.segment_hours"


def hour_of(path: str) -> str | None:
    """The ``date=<d>/hour=<h>`` directory of a data file's path (None: not in one)."""
    parts = path.rsplit("/", 3)
    if len(parts) < 3 or not parts[-3].startswith("date=") or not parts[-2].startswith("hour="):
        return None
    return f"{parts[-3]}/{parts[-2]}"


def parse_data_name(name: str) -> tuple[int, int, int] | None:
    """The partition, first and last offset a :func:`data_name` holds; None for another name."""
    found = _DATA_NAME.fullmatch(name)
    if found is None or int(found[2]) > int(found[3]):  # a range the archive never writes
        return None
    return int(found[1]), int(found[2]), int(found[3])


def cut_path(topic: str, partition: int, start: int) -> str:
    return f"{CUTS_DIR}/topic={topic}/partition={partition:05d}/{start:020d}.json"


#: what :func:`cut_path` writes under a topic's directory of markers: partition, start offset
_CUT_NAME = re.compile(r"partition=(\d+)/(\d+)\.json")


def parse_cut_path(path: str) -> tuple[int, int] | None:
    """The partition and start offset of a cut marker's path (None: another file)."""
    found = _CUT_NAME.search(path)
    return None if found is None or not path.endswith(found[0]) else (int(found[1]),
                                                                          int(found[2]))


def encode_cut(end: int) -> bytes:
    return json.dumps({"end": end}).encode()


def decode_cut(raw: bytes) -> int:
    return int(json.loads(raw)["end"])


def _arrow_type(name: str, annotation: Any) -> pa.DataType | None:
    """Scalar fields keep their type; free-form ones (dicts, Any) are stored as JSON text."""
    if name == "timestamp":
        return TIMESTAMP
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else Any
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}.get(annotation)


class KindLayout:
    """The columns of one record kind, and how a decoded record becomes a row."""

    def __init__(self, kind: RecordKind) -> None:
        model: type[Record] = SCHEMAS[kind]
        self.kind = kind
        self.fields = list(model.model_fields)
        fields: list[pa.Field] = []
        self.json_fields: set[str] = set()
        for name, info in model.model_fields.items():
            arrow = _arrow_type(name, info.annotation)
            if arrow is None:
                self.json_fields.add(name)
                arrow = pa.string()
            fields.append(pa.field(name, arrow))
        fields += [pa.field(EXTRA, pa.string()), pa.field(PARTITION, pa.int32()),
                   pa.field(OFFSET, pa.int64()), pa.field(BROKER_TS, TIMESTAMP)]
        self.schema = pa.schema(fields)
        self.ts_index = self.fields.index("timestamp")
        # the archive makes a row of every record: one C call takes the fields out of the
        # record's dict (pydantic fills in every declared field), then the JSON ones, if any,
        # are serialised (a loop over all fields per record was a fifth of the archive's CPU)
        self._take = operator.itemgetter(*self.fields)
        self._json_at = [i for i, name in enumerate(self.fields) if name in self.json_fields]

    def row(self, record: Record, partition: int, offset: int, broker_ms: int) -> tuple[Any, ...]:
        values = self._take(record.__dict__)
        if self._json_at:
            listed = list(values)
            for i in self._json_at:
                if listed[i] is not None:
                    listed[i] = dumps(listed[i])
            values = tuple(listed)
        extra = record.__pydantic_extra__
        return (*values, dumps(extra) if extra else None, partition, offset, broker_ms)

    def table(self, rows: list[tuple[Any, ...]]) -> pa.Table:
        columns = list(zip(*rows, strict=True)) if rows else [()] * len(self.schema)
        return pa.Table.from_arrays(
            [pa.array(column, type=f.type) for column, f in zip(columns, self.schema, strict=True)],
            schema=self.schema)


def dumps(value: Any) -> str:
    """Deterministic JSON (sorted keys): the same record always gives the same bytes.

    orjson: the archive serialises every record's extra fields, and the standard library's
    sorted dumps was a fifth of its CPU (2.5 us a record against 0.16). Its text is the
    standard library's but for the notation of some floats (``1.5e-7`` for ``1.5e-07``,
    ``0.000025`` for ``2.5e-05``: the same number, to the last bit, to any reader); NaN and
    infinities, which orjson writes as null, are refused by the decoder, and integers beyond
    64 bits, which orjson refuses, go through the standard library. (A replay over files
    written before 2026-12-03 rewrites the same rows, such floats in the new notation.)"""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
