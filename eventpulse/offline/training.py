"""Point-in-time training sets: the value a FeatureClient read at each label's time would have
returned, recomputed from the archive with the worker's own code.

One code path, not a second implementation: archived records go through the live worker's
:class:`BatchCombiner` (the same lateness rule, per-partition watermarks and partials) and
``apply.lua`` (the same rings and sketches) into a private Redis, and each label row is read back
with :class:`AsyncFeatureClient` at the label's timestamp. What the worker had at a moment is
what the broker had by then: records are applied, per partition in offset order, up to the first
whose broker timestamp (archived with every row) is after the label's time.

Exact where the worker was caught up at that moment. Where it was behind (a record the broker
already had was not applied yet), the live read would have lacked it and this one does not; the
consistency report (issue 14, part 3) is what tells those moments apart.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import redis.asyncio as aioredis

from eventpulse.archive.read import PartitionRows, partitions, read_table
from eventpulse.archive.store import ArchiveStore
from eventpulse.config import JobConfig
from eventpulse.streams.schemas import to_epoch_ms
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.batch import BatchCombiner, PartitionPosition
from eventpulse.tables.client import AsyncFeatureClient, FeatureValue
from eventpulse.tables.spec import CompiledFeature, FeatureSpec
from eventpulse.tables.store import FeatureStore

log = logging.getLogger("eventpulse.offline")
#: records per combined write, as the worker's batches
BATCH = 50_000
ENTITY_COLUMNS = ("entity", "entity_type")
STATUS_SUFFIX = "__status"
NOT_APPLICABLE = "not_applicable"
#: the value counts records the broker had for less than the settle time at the row's moment
LAG_SENSITIVE = "lag_sensitive"


class TrainingSetError(ValueError):
    """The labels or the requested features are wrong; the message says how."""


@dataclass
class Labels:
    table: pa.Table
    entities: list[str]
    ids: list[str]
    #: when each row is read (the window and the age follow from it)
    times: list[int]
    #: per row, apply what the broker had by this time (default: ``times``); the consistency
    #: report reads at a moment with what the broker had a little earlier
    cutoffs: list[int] | None = None


@dataclass
class TrainingStats:
    events: int = 0
    rows: int = 0
    seconds: float = 0.0
    late: dict[str, int] = field(default_factory=dict)
    #: values given the status LAG_SENSITIVE
    lag_sensitive: int = 0


def read_labels(path: Path) -> Labels:
    """A parquet or CSV file with entity type, entity id and timestamp columns (any others are
    labels, kept as they are)."""
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(
            path, convert_options=pacsv.ConvertOptions(
                column_types={"entity_id": pa.string(), "timestamp": pa.string()}))
    except (OSError, pa.ArrowInvalid) as exc:
        raise TrainingSetError(f"{path}: cannot read labels: {exc}") from None
    return labels_of(table, str(path))


def labels_of(table: pa.Table, source: str = "labels") -> Labels:
    names = table.column_names
    entity_column = next((c for c in ENTITY_COLUMNS if c in names), None)
    missing = [c for c in ("entity_id", "timestamp") if c not in names]
    if entity_column is None or missing:
        raise TrainingSetError(
            f"{source}: needs columns entity (or entity_type), entity_id and timestamp; "
            f"missing {missing or ['entity']}")
    entities = [str(e) for e in table.column(entity_column).to_pylist()]
    ids = [str(i) for i in table.column("entity_id").to_pylist()]
    times: list[int] = []
    raw_times = table.column("timestamp")
    if pa.types.is_timestamp(raw_times.type):
        raw_times = raw_times.cast(pa.timestamp("ms", tz=raw_times.type.tz)).cast(pa.int64())
    for row, value in enumerate(raw_times.to_pylist(), 1):
        try:
            times.append(to_epoch_ms(int(value) if isinstance(value, str) and value.isdigit()
                                     else value))
        except (ValueError, AttributeError):
            raise TrainingSetError(f"{source}: row {row}: timestamp {value!r} is not epoch "
                                   "milliseconds or ISO-8601") from None
    return Labels(table, entities, ids, times)


def choose_features(job: JobConfig, labels: Labels, names: Sequence[str] | None,
                    ) -> list[FeatureSpec]:
    by_name = {f.name: f for f in job.features}
    if names:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise TrainingSetError(f"--features: no feature named {unknown}; known: "
                                   f"{sorted(by_name)}")
        return [by_name[n] for n in names]
    wanted = set(labels.entities)
    chosen = [f for f in job.features if f.entity in wanted]
    if not chosen:
        raise TrainingSetError(f"no feature has entity {sorted(wanted)}; the job's entities: "
                               f"{sorted({f.entity for f in job.features})}")
    return chosen


async def build(job: JobConfig, store: ArchiveStore, labels: Labels, specs: list[FeatureSpec],
                redis: aioredis.Redis, namespace: str | None = None, settle_ms: int = 0,
                ) -> tuple[pa.Table, TrainingStats]:
    """The labels with a value and a status column per feature (see :func:`compute`)."""
    values, stats = await compute(job, store, labels, specs, redis, namespace, settle_ms)
    return _table(labels, specs, values), stats


async def compute(job: JobConfig, store: ArchiveStore, labels: Labels, specs: list[FeatureSpec],
                  redis: aioredis.Redis, namespace: str | None = None, settle_ms: int = 0,
                  ) -> tuple[list[dict[str, FeatureValue] | None], TrainingStats]:
    """Per label row, the features a read at its time returns (None: no feature of its
    entity was asked for).

    ``settle_ms`` > 0: a feature whose value counts a record the broker received less than
    ``settle_ms`` before the row's cut-off gets the status :data:`LAG_SENSITIVE` (a worker
    lagging by more than that had not applied the record and served another value)."""
    started = time.perf_counter()
    namespace = namespace or f"offline-{uuid.uuid4().hex[:8]}"
    stats = TrainingStats()
    compiled = [CompiledFeature(spec, i) for i, spec in enumerate(specs)]
    # a private namespace: one fence shard, so that a write is one script, not one per shard
    # (the shard count only places keys; the client below reads with the same count)
    feature_store = FeatureStore(redis, namespace, "offline", shards=1)
    await feature_store.publish(specs)
    client = AsyncFeatureClient(redis, specs, namespace, shards=1)
    cutoffs = labels.cutoffs if labels.cutoffs is not None else labels.times
    until = max(cutoffs, default=0)
    streams = [_Stream(f"{topic}:{rows.partition}", topic, rows)
               for topic in sorted({spec.topic for spec in specs})
               for rows in partitions(read_table(store, topic, until),
                                      RecordKind(job.topics[topic]))]
    positions: dict[str, PartitionPosition | None] = {s.tp: None for s in streams}
    order = sorted(range(len(cutoffs)), key=cutoffs.__getitem__)
    cuts = sorted({*cutoffs, *(c - settle_ms for c in cutoffs)} if settle_ms > 0
                  else set(cutoffs))
    #: (feature, entity id) -> the last cut whose records counted for it (settle_ms > 0 only)
    touched_at: dict[tuple[str, str], int] | None = {} if settle_ms > 0 else None
    out: list[dict[str, FeatureValue] | None] = [None] * len(order)
    at = 0
    for cut in cuts:
        # everything the broker had by this moment, per partition in offset order
        combiner = BatchCombiner(namespace, compiled, positions, shards=1)
        fed = 0
        for stream in streams:
            end = bisect.bisect_right(stream.reach, cut)
            while stream.cursor < end:
                upto = min(end, stream.cursor + BATCH - fed)
                add, tp, topic = combiner.add, stream.tp, stream.topic
                for offset, record in zip(stream.rows.offsets[stream.cursor:upto],
                                          stream.rows.records[stream.cursor:upto], strict=True):
                    add(tp, topic, offset, record)
                fed += upto - stream.cursor
                stream.cursor = upto
                if fed >= BATCH:
                    positions = await _apply(feature_store, combiner, stats, touched_at, cut)
                    combiner = BatchCombiner(namespace, compiled, positions, shards=1)
                    stats.events += fed
                    fed = 0
        if fed:
            positions = await _apply(feature_store, combiner, stats, touched_at, cut)
            stats.events += fed
        group = []
        while at < len(order) and cutoffs[order[at]] == cut:
            group.append(order[at])
            at += 1
        if group:
            await _read(client, labels, specs, group, out)
            if touched_at is not None:
                stats.lag_sensitive += _mark_lag_sensitive(labels, group, out, touched_at,
                                                           cut - settle_ms)
    stats.rows = len(order)
    stats.seconds = time.perf_counter() - started
    return out, stats


class _Stream:
    """One archived partition being applied: where it stands, and per row the highest broker
    time up to it, so that "up to the first record the broker had after t" is a bisection."""

    def __init__(self, tp: str, topic: str, rows: PartitionRows) -> None:
        self.tp, self.topic, self.rows = tp, topic, rows
        self.reach = list(itertools.accumulate(rows.broker_ms, max))
        self.cursor = 0


async def _apply(feature_store: FeatureStore, combiner: BatchCombiner, stats: TrainingStats,
                 touched_at: dict[tuple[str, str], int] | None, cut: int,
                 ) -> dict[str, PartitionPosition | None]:
    for name, count in combiner.stats.late.items():
        stats.late[name] = stats.late.get(name, 0) + count
    plan = combiner.plan()
    conflict = await feature_store.apply(plan)
    if conflict is not None:  # a private namespace: nobody else writes there
        raise RuntimeError(f"unexpected writer in the private namespace at {conflict.tp}")
    if touched_at is not None:
        for name, ids in plan.touched.items():
            touched_at.update(dict.fromkeys(((name, i) for i in ids), cut))
    return {tp: PartitionPosition(p.offset, p.watermark) for tp, p in plan.positions.items()}


def _mark_lag_sensitive(labels: Labels, rows: list[int], out: list[dict[str, FeatureValue] | None],
                        touched_at: dict[tuple[str, str], int], since: int) -> int:
    """Mark the values that count records the broker had only after ``since``; how many."""
    marked = 0
    for row in rows:
        values = out[row]
        if values is None:
            continue
        entity_id = labels.ids[row]
        for name, value in values.items():
            if touched_at.get((name, entity_id), since) > since:
                values[name] = value._replace(status=LAG_SENSITIVE)  # type: ignore[arg-type]
                marked += 1
    return marked


async def _read(client: AsyncFeatureClient, labels: Labels, specs: list[FeatureSpec],
                rows: list[int], out: list[dict[str, FeatureValue] | None]) -> None:
    """Read the rows of one cut-off, one ``get_many`` per entity type and read time."""
    by_read: dict[tuple[str, int], list[int]] = {}
    for row in rows:
        by_read.setdefault((labels.entities[row], labels.times[row]), []).append(row)
    for (entity, moment), members in by_read.items():
        names = [s.name for s in specs if s.entity == entity]
        if not names:
            continue
        ids = sorted({labels.ids[r] for r in members})
        values = await client.get_many(entity, ids, names, moment)
        for r in members:
            out[r] = values[labels.ids[r]]


def _table(labels: Labels, specs: list[FeatureSpec],
           out: list[dict[str, FeatureValue] | None]) -> pa.Table:
    table = labels.table
    for spec in specs:
        values: list[Any] = []
        statuses: list[str] = []
        for row in out:
            value = None if row is None else row.get(spec.name)
            values.append(None if value is None else value.value)
            statuses.append(NOT_APPLICABLE if value is None else value.status)
        try:
            column = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # e.g. `last` over mixed types
            column = pa.array([None if v is None else str(v) for v in values])
        table = table.append_column(spec.name, column)
        table = table.append_column(spec.name + STATUS_SUFFIX, pa.array(statuses))
    return table


def write(table: pa.Table, path: Path) -> None:
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".csv":
        pacsv.write_csv(table, path)
    else:
        raise TrainingSetError(f"{path}: write .parquet or .csv")
