"""Point-in-time training sets: the value a FeatureClient read at each label's time would have
returned, recomputed from the archive with the worker's own code.

One code path, not a second implementation: archived records go through the live worker's
:class:`BatchCombiner` (the same lateness rule, per-partition watermarks and partials) and
``apply.lua`` (the same rings and sketches) into a private Redis, and each label row is read back
with :class:`AsyncFeatureClient` at the label's timestamp. What the worker had at a moment is
what the broker had by then: records are applied, per partition in offset order, up to the first
whose broker timestamp (archived with every row) is after the label's time. Only the entities a
moment reads are brought up to it (:func:`compute`), which gives what applying every record at
every moment gives (:mod:`eventpulse.offline.reference`, the test's yardstick).

Exact where the worker was caught up at that moment. Where it was behind (a record the broker
already had was not applied yet), the live read would have lacked it and this one does not; the
consistency report (issue 14, part 3) is what tells those moments apart.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from eventpulse import gctune
from eventpulse.archive.read import TopicRows, read_topic
from eventpulse.archive.store import ArchiveStore
from eventpulse.config import JobConfig
from eventpulse.offline import entityindex, expiry, gaps
from eventpulse.offline.moments import Moment, MomentPipe
from eventpulse.offline.settle import RecentWrites
from eventpulse.offline.ties import ORDER_DEPENDENT, Ties
from eventpulse.redisretry import failure_name
from eventpulse.streams.entitykey import BadKey, key_text
from eventpulse.streams.schemas import to_epoch_ms
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.batch import BatchCombiner, PartitionPosition
from eventpulse.tables.client import AsyncFeatureClient, FeatureValue, ReadPlan
from eventpulse.tables.spec import CompiledFeature, FeatureSpec
from eventpulse.tables.store import FeatureStore

log = logging.getLogger("eventpulse.offline")
#: how long the build's keys live (apply.lua's lease): its writes model the worker's key expiry
#: on the archive's time (expiry.py), so its keys must outlive any build, and a build that dies
#: before dropping its namespace leaves them for a day at most
KEY_LEASE_MS = 24 * 3_600_000
#: records per combined write, as the worker's batches
BATCH = 50_000
ENTITY_COLUMNS = ("entity", "entity_type")
#: the first bytes of a parquet file
PARQUET_MAGIC = b"PAR1"
STATUS_SUFFIX = "__status"
NOT_APPLICABLE = "not_applicable"
#: the value counts records the broker had for less than the settle time at the row's moment
LAG_SENSITIVE = "lag_sensitive"
#: the one made-up partition the per-entity replay feeds the combiner under (its offsets are
#: the replay's own sequence: records of many partitions and entities, each judged late by
#: its own partition's watermark, which is handed over with it)
REPLAY_TP = "replay:0"


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
    #: per row, the offsets applied, per ``topic:partition`` (absent: none): the row's entity
    #: holds exactly those of its records, whatever their broker times (the consistency report,
    #: with the positions a served read logged). Given for every row or none; the cut-off must
    #: be at or after the broker time of each, and an entity's rows in cut-off order must have
    #: positions that never go back (equal at an equal cut-off): :func:`entityindex.restrict`
    positions: list[dict[str, int]] | None = None


@dataclass
class TrainingStats:
    events: int = 0
    rows: int = 0
    seconds: float = 0.0
    late: dict[str, int] = field(default_factory=dict)
    #: values given the status LAG_SENSITIVE
    lag_sensitive: int = 0
    #: values given the status ORDER_DEPENDENT (eventpulse.offline.ties)
    order_dependent: int = 0
    #: values given the status INCOMPLETE (records the archive lost: eventpulse.offline.gaps)
    incomplete: int = 0
    #: the archive's gaps (records lost) in the partitions read
    gaps: list[gaps.Gap] = field(default_factory=list)
    #: records handed to the combiner (once per key family of an entity type that needs them)
    applied: int = 0
    #: seconds per phase of the build, in order (where the time goes: bench/training_compare.py)
    phases: dict[str, float] = field(default_factory=dict)
    #: processes the label rows were split over (:mod:`eventpulse.offline.parallel`)
    processes: int = 1
    #: per label row read where the live key had expired (eventpulse.offline.expiry), how long
    #: before its moment, had the worker written each record as the broker had it (one
    #: process's rows: :func:`compute`'s, not merged by eventpulse.offline.parallel)
    expired: dict[int, int] = field(default_factory=dict)
    #: per (label row, feature) read from an entry a worker late by at least this many ms had
    #: found gone (its key expired before that write: :meth:`expiry.Expiry.late_renewal`)
    renewed_late: dict[tuple[int, str], int] = field(default_factory=dict)


def read_labels(path: Path) -> Labels:
    """A parquet file (told by its content, whatever its name) or CSV file with entity type,
    entity id and timestamp columns (any others are labels, kept as they are)."""
    try:
        with path.open("rb") as head:
            parquet = head.read(4) == PARQUET_MAGIC
        # ParquetFile, not read_table: a file with two columns of one name is read (and then
        # refused naming them) instead of failing in the dataset layer's column lookup
        table = pq.ParquetFile(path).read() if parquet else pacsv.read_csv(
            path, convert_options=pacsv.ConvertOptions(
                column_types={"entity_id": pa.string(), "timestamp": pa.string()}))
    except (OSError, pa.ArrowInvalid) as exc:
        raise TrainingSetError(f"{path}: cannot read labels: {exc}") from None
    if not parquet and "timestamp" in table.column_names:
        table = _epoch_column(table)
    if not parquet and "entity_id" in table.column_names:
        table = _whole_number_ids(table)
    return labels_of(table, str(path))


#: an id pandas writes to CSV from an integer column with a missing value (a float column)
_WHOLE_FLOAT = r"^-?[0-9]+\.0*$"


def _whole_number_ids(table: pa.Table) -> pa.Table:
    """A CSV's entity ids (read as text) without the ``.0`` of whole numbers where the column
    is all whole numbers and some are written so: what pandas writes of an integer column with a
    missing value (found by an outside test: ``7.0`` read as the id "7.0", every value
    missing without a word), read as the worker keys the integer. A column with any other text
    keeps it as written (``"1.0"`` among ``"abc"`` is an id of its own)."""
    index = table.column_names.index("entity_id")
    ids = table.column(index)
    floats = pc.match_substring_regex(ids, _WHOLE_FLOAT)
    if not pc.any(floats).as_py() or not pc.all(pc.or_kleene(floats, pc.match_substring_regex(
            ids, r"^(-?[0-9]+)?$"))).as_py():  # an empty id is refused later, naming the row
        return table
    try:  # as integers, as the worker keys them ("-0.0" is 0)
        digits = pc.if_else(floats, pc.replace_substring_regex(ids, r"\.0*$", ""), "0")
        whole = pc.cast(pc.cast(digits, pa.int64()), pa.string())
    except pa.ArrowInvalid:  # beyond 64 bits: no integer pandas wrote
        return table
    return table.set_column(index, "entity_id", pc.if_else(floats, whole, ids))


def _epoch_column(table: pa.Table) -> pa.Table:
    """A CSV's timestamp column (read as text, so that ISO-8601 and numbers are both taken as
    written) as integers where every value is one: the output keeps the label columns, and an
    epoch column stays a number, as in a parquet label file."""
    index = table.column_names.index("timestamp")
    try:
        return table.set_column(index, "timestamp", pc.cast(table.column(index), pa.int64()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return table


def labels_of(table: pa.Table, source: str = "labels") -> Labels:
    names = table.column_names
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:  # readers refuse a file with two columns of one name
        raise TrainingSetError(f"{source}: the column names {doubled} appear more than once")
    entity_column = next((c for c in ENTITY_COLUMNS if c in names), None)
    missing = ([] if entity_column else ["entity"]) + [
        c for c in ("entity_id", "timestamp") if c not in names]
    if missing:
        hint = ("; is it separated by commas? (one column read: "
                f"{names[0][:60]!r})" if len(names) == 1 else "")
        raise TrainingSetError(
            f"{source}: needs columns entity (or entity_type), entity_id and timestamp, in "
            f"lower case; missing {missing}, found {names[:10]}{hint}")
    if table.num_rows == 0:
        raise TrainingSetError(f"{source}: no label rows (only a header)")
    if all(c in names for c in ENTITY_COLUMNS):
        raise TrainingSetError(f"{source}: has both entity and entity_type columns; keep one "
                               "(they name the same thing)")
    assert entity_column is not None
    entities = _texts(table.column(entity_column).to_pylist(), source, entity_column, str)
    ids = _texts(table.column("entity_id").to_pylist(), source, "entity_id", _label_id)
    times: list[int] = []
    raw_times = table.column("timestamp")
    if pa.types.is_timestamp(raw_times.type):
        # to milliseconds, a finer time floored to its millisecond (pandas writes nanoseconds):
        # the broker's times are milliseconds, so a read within a millisecond reads what a
        # read at its start does
        raw_times = pc.cast(raw_times, pa.timestamp("ms", tz=raw_times.type.tz),
                            safe=False).cast(pa.int64())
    for row, value in enumerate(raw_times.to_pylist(), 1):
        try:
            times.append(to_epoch_ms(_epoch_number(value) if isinstance(value, str) else value))
        except ValueError as exc:
            # out of range or not a time: the reason to_epoch_ms gives (a year-10000 time was
            # once said not to be ISO-8601)
            reason = str(exc).removeprefix("timestamp ")
            raise TrainingSetError(f"{source}: row {row}: timestamp {value!r}: {reason}; "
                                   "give epoch milliseconds (or seconds) or ISO-8601, "
                                   "1970 to 9999") from None
    return Labels(table, entities, ids, times)


#: an epoch number as CSV text: digits, maybe a fraction and an exponent (as a float column
#: with a missing value is written: "1796308467055.0")
_EPOCH_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?")


def _epoch_number(text: str) -> int | float | str:
    """A label's CSV timestamp as the number it writes, as a parquet column holds it (an
    integer, else a float); any other text as it is (ISO-8601, or refused by to_epoch_ms)."""
    if text.isdigit():
        return int(text)
    return float(text) if _EPOCH_NUMBER.fullmatch(text) else text


def _texts(values: list[Any], source: str, column: str, text: Callable[[Any], str],
           ) -> list[str]:
    """A label column as text, each value through ``text``; an empty or missing one, or one
    ``text`` refuses (ValueError), refused naming its row (counted from 1)."""
    out = []
    for row, value in enumerate(values, 1):
        try:
            found = "" if value is None else value if value.__class__ is str else text(value)
        except ValueError as exc:
            raise TrainingSetError(f"{source}: row {row}: {exc}") from None
        if found == "":
            raise TrainingSetError(f"{source}: row {row}: no {column} (empty)")
        out.append(found)
    return out


def _label_id(value: Any) -> str:
    """A label's entity id as the worker keys records (``key_text``: strings, integers,
    booleans); a float that is a whole number as the integer (what a column of integers with
    a missing value becomes in pandas)."""
    if value.__class__ is float and value.is_integer():
        value = int(value)
    try:
        return key_text(value)
    except BadKey:
        raise ValueError(f"entity_id {value!r} is not an entity id (a string, an integer or "
                         "a boolean)") from None


def choose_features(job: JobConfig, labels: Labels, names: Sequence[str] | None,
                    ) -> list[FeatureSpec]:
    by_name = {f.name: f for f in job.features}
    if names:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise TrainingSetError(f"--features: no feature named {unknown}; known: "
                                   f"{sorted(by_name)}")
        chosen = [by_name[n] for n in names]
    else:
        wanted = set(labels.entities)
        chosen = [f for f in job.features if f.entity in wanted]
        if not chosen:
            raise TrainingSetError(f"no feature has entity {sorted(wanted)}; the job's "
                                   f"entities: {sorted({f.entity for f in job.features})}")
    taken = sorted({name for spec in chosen for name in (spec.name, spec.name + STATUS_SUFFIX)}
                   & set(labels.table.column_names))
    if taken:  # the output would hold two columns of one name, which readers refuse
        raise TrainingSetError(f"labels: the columns {taken} have the names of output columns; "
                               "rename them, or leave those features out with --features")
    return chosen


async def build(job: JobConfig, store: ArchiveStore, labels: Labels, specs: list[FeatureSpec],
                redis: aioredis.Redis, namespace: str | None = None, settle_ms: int = 0,
                ) -> tuple[pa.Table, TrainingStats]:
    """The labels with a value and a status column per feature (see :func:`compute`)."""
    values, stats = await compute(job, store, labels, specs, redis, namespace, settle_ms)
    return _table(labels, specs, values), stats


async def compute(job: JobConfig, store: ArchiveStore, labels: Labels, specs: list[FeatureSpec],
                  redis: aioredis.Redis, namespace: str | None = None, settle_ms: int = 0,
                  all_cutoffs: Sequence[int] | None = None, hold: list[Any] | None = None,
                  drop: bool = False, archive: ArchiveTables | None = None,
                  lag_ms: int = 0, ties: bool = True, mark_gaps: bool = True,
                  ) -> tuple[list[dict[str, FeatureValue] | None], TrainingStats]:
    """Per label row, the features a read at its time returns (None: no feature of its
    entity was asked for).

    ``lag_ms``: the consistency report's longest lag: the values a worker that late (beyond
    ``settle_ms``) would have served ``missing`` are noted in the stats (``renewed_late``).

    ``drop``: remove the namespace's keys after (a Redis the user gave keeps nothing of the
    build; a private one is discarded whole).

    ``hold``: a list the archive's records and their index are appended to, for a caller that
    would rather not wait for millions of objects to be freed (about a second per million
    archived events): a process that exits right after, without freeing.

    ``archive``: the archive already read (:func:`read_archive`, up to the latest of
    ``all_cutoffs``), by a parent process that forked this one.

    ``all_cutoffs``: the cut-offs of a whole label set of which ``labels`` is a share (default:
    ``labels``' own). The replay stops at the whole set's moments, so that a share computes
    what the whole set does for its rows (:mod:`eventpulse.offline.parallel`): where a
    partition joined mid-stream, its ``observed_since`` depends on where the replay stops.

    ``mark_gaps``: give the status :data:`~eventpulse.offline.gaps.INCOMPLETE` to the values
    that may count records the archive lost (the gaps are in the stats either way: the
    consistency report tells them apart itself).

    ``settle_ms`` > 0: a feature whose value counts a record the broker received less than
    ``settle_ms`` before the row's cut-off gets the status :data:`LAG_SENSITIVE` (a worker
    lagging by more than that had not applied the record and served another value).

    Moment by moment, as a replay of the whole archive in offset order would (that replay is
    :mod:`eventpulse.offline.reference`, and this gives what it gives), but each moment brings
    up to date only the entities read at it (or read ``settle_ms`` later: the records the
    broker had in between must be told apart), with their own records since they were last
    brought up to date (:mod:`eventpulse.offline.entityindex`). An entity is written about
    once per label row of it instead of at every moment some record touched it. ``late``
    counts the late records among those applied: records no label row needs are not."""
    namespace = namespace or f"offline-{uuid.uuid4().hex[:8]}"
    try:
        # the collector tuned: a build holds millions of objects and allocates millions more
        with gctune.tuned() as settled:
            return await _compute(job, store, labels, specs, redis, namespace, settle_ms,
                                  all_cutoffs, settled, hold, archive, lag_ms, ties, mark_gaps)
    finally:
        if drop:
            await drop_namespace(redis, namespace)


async def drop_namespace(redis: aioredis.Redis, namespace: str) -> bool:
    """Remove every key of ``namespace`` (SCAN, UNLINK), saying so where that fails (a Redis
    gone: the keys of a build expire within :data:`KEY_LEASE_MS`); whether it did."""
    try:
        batch: list[Any] = []
        async for key in redis.scan_iter(match=f"{namespace}:*", count=1_000):
            batch.append(key)
            if len(batch) >= 1_000:
                await redis.unlink(*batch)
                batch = []
        if batch:
            await redis.unlink(*batch)
    except RedisError as exc:
        log.warning("could not remove the keys of %s: %s", namespace, failure_name(exc))
        return False
    return True


async def _compute(job: JobConfig, store: ArchiveStore, labels: Labels, specs: list[FeatureSpec],
                   redis: aioredis.Redis, namespace: str, settle_ms: int,
                   all_cutoffs: Sequence[int] | None, settled: Callable[[], None],
                   hold: list[Any] | None, archive: ArchiveTables | None, lag_ms: int,
                   ties: bool, mark_gaps: bool,
                   ) -> tuple[list[dict[str, FeatureValue] | None], TrainingStats]:
    started = time.perf_counter()
    stats = TrainingStats()
    # the asked-for features and those of their entity types on the same topics: they write
    # the same keys, so their TTLs and writes decide when those keys expire (expiry.py)
    replay = replayed(job, specs)
    compiled = [CompiledFeature(spec, i) for i, spec in enumerate(replay)]
    # a private namespace: one fence shard, so that a write is one script, not one per shard
    # (the shard count only places keys; the client below reads with the same count)
    feature_store = FeatureStore(redis, namespace, "offline", shards=1)
    await feature_store.publish(replay, KEY_LEASE_MS)
    client = AsyncFeatureClient(redis, replay, namespace, shards=1)
    cutoffs = labels.cutoffs if labels.cutoffs is not None else labels.times
    if all_cutoffs is None:
        all_cutoffs = cutoffs
    if archive is None:
        archive = read_archive(job, store, specs, max(all_cutoffs, default=0))
    streams = streams_of(archive)
    stats.phases["read archive"] = time.perf_counter() - started
    cuts = cuts_of(all_cutoffs, settle_ms)
    cut_index = {cut: x for x, cut in enumerate(cuts)}
    ends = [stream.ends(cuts) for stream in streams]
    stats.events = sum(e[-1] for e in ends) if cuts else 0
    families = entityindex.families_of(compiled)
    families_by_entity: dict[str, list[int]] = {}
    for k, family in enumerate(families):
        families_by_entity.setdefault(family.entity, []).append(k)
    catch_up, reads, wanted, read_at = _schedule(labels, cutoffs, cut_index,
                                                 families_by_entity, settle_ms)
    # when the live worker wrote each entity's key, for its expiry (eventpulse.offline.expiry)
    expiries = expiry.Expiry(replay, job.features, namespace, settle_ms, lag_ms)
    # within a shorter span of time than a key's TTL no check can be due, and the records'
    # reaches (when the worker can have written each) are left out of the index
    span = max(labels.times, default=0) - min((s.reach[0] for s in streams if s.reach),
                                              default=0)
    may_expire = expiries.may_expire_within(span)
    records = entityindex.index(streams, ends, families, wanted, reaches=may_expire)
    if labels.positions is not None:
        restrict_to_positions(records, families, labels, cutoffs, cut_index, streams)
    if may_expire:
        # a bring-up never spans an idle time in which the live key may have expired: the
        # entity is brought up to the last moment before it too, so that the write after it
        # is checked (Expiry.wrote) as the worker's found the key (as long as some label
        # moment falls in between)
        for k, family in enumerate(families):
            limit = expiries.idle_limit(family.entity)
            for entity_id, kept in records[k].items():
                for x in entityindex.gaps(kept, limit):
                    catch_up.setdefault(x, set()).add((family.entity, entity_id))
    # `last` values a tie between partitions decides (not with logged positions: the
    # consistency report tells those apart itself, by the offsets the read held)
    asked = {spec.name for spec in specs}
    tied = (Ties(streams, ends, [f for f in compiled if f.name in asked], wanted)
            if ties and labels.positions is None else None)
    settled()  # the archive and its index live until the end: out of the collector's sight
    if hold is not None:
        hold.append((streams, records))
    stats.phases["index"] = time.perf_counter() - started - sum(stats.phases.values())
    joined = entityindex.observed_since(streams, ends, BATCH)
    recent = (RecentWrites(settle_ms, {spec.name: spec.entity for spec in replay})
              if settle_ms > 0 else None)
    out: list[dict[str, FeatureValue] | None] = [None] * len(cutoffs)

    def written(moment: Moment) -> None:
        if recent is not None and moment.plan is not None:
            recent.wrote(moment.plan.touched, cuts[moment.x])
            if moment.spans:
                recent.note(moment.spans, cuts[moment.x])
        for check in moment.before_write:
            if expiries.settled(check) and recent is not None:
                recent.created(*check.key, cuts[moment.x])  # maybe afresh, after an expiry

    def answered(moment: Moment, values: list[tuple[dict[str, dict[str, FeatureValue]],
                                                    list[int]]]) -> None:
        for found, rows in values:
            for row in rows:
                out[row] = found[labels.ids[row]]
        for (plan, _), checks in zip(moment.reads, moment.read_checks, strict=True):
            for check in checks:
                if check.answer == expiry.EXPIRED:  # what the live read of no key returns
                    for row in check.rows:
                        out[row] = {f.name: f.missing for f in plan.features}
                expired_for = check.expired_for
                if expired_for is not None:
                    stats.expired.update(dict.fromkeys(check.rows, expired_for))
        since = cuts[moment.x] - settle_ms
        if recent is not None and moment.reads:
            stats.lag_sensitive += mark_lag_sensitive(labels, reads[moment.x], out, recent,
                                                      since)
            # a key created within the settle time: a worker that lagged found none
            stats.lag_sensitive += mark_born(labels, reads[moment.x], out, since, recent)
        for checks in moment.read_checks:
            for check in checks:
                if check.answer == expiry.UNKNOWN:  # the live key may have expired, or not
                    stats.lag_sensitive += mark_all(out, check.rows)
        if expiries.doubt or expiries.unseen:
            for plan, rows in moment.reads:
                stats.lag_sensitive += mark_doubtful(expiries, labels, plan.at_ms, rows, out)
        if expiries.renewals:
            for _, rows in moment.reads:
                note_late_renewals(expiries, labels, rows, out, stats.renewed_late)

    await expiries.load(redis)
    # moment by moment, in order; the writes and reads of many moments per round trip, the
    # next moments combined while Redis runs the last ones' (eventpulse.offline.moments)
    async with MomentPipe(redis, feature_store, written, answered) as pipe:
        combiner = BatchCombiner(namespace, compiled, shards=1, feed_of=entityindex.feed_of,
                                 lease_ms=KEY_LEASE_MS)
        position: PartitionPosition | None = None
        observed: int | None = None
        seq = 0  # the replay's own offsets: one made-up partition, always moving on
        for x in sorted(catch_up.keys() | reads.keys()):
            combiner.reset({REPLAY_TP: position})
            first = seq
            moment = Moment(x)
            # the entities a read within the settle time may count this write for: only
            # their writes are noted (eventpulse.offline.settle)
            soon: dict[str, set[str]] = {}
            for entity, entity_id in catch_up.get(x, ()):
                if recent is not None and _read_within(read_at[entity][entity_id], x, cuts,
                                                       settle_ms):
                    soon.setdefault(entity, set()).add(entity_id)
                low = high = -1  # the reaches of the records some feature took
                for k in families_by_entity[entity]:
                    found = records[k].get(entity_id)
                    if found is not None:
                        seq, low, high = _bring_up(combiner, found, x, seq, low, high)
                if low >= 0:
                    check = expiries.wrote(entity, entity_id, low, high)
                    if check is not None:
                        moment.before_write.append(check)
            if seq > first:
                count_late(combiner, stats)
                if recent is not None:
                    moment.spans = combiner.spans(soon)
                moment.plan = combiner.plan()
                moved = moment.plan.positions[REPLAY_TP]
                position = PartitionPosition(moved.offset, moved.watermark)
            group = reads.get(x)
            if group:
                while joined and joined[0][0] <= x:
                    since = joined.pop(0)[1]
                    if observed is None or since < observed:
                        observed = moment.observed_since = since
                moment.reads = read_plans(client, labels, specs, group)
                moment.read_checks = [expiry_checks(expiries, labels, rows)
                                      for _, rows in moment.reads]
            pipe.add(moment)
            if pipe.full:
                await pipe.send()
        stats.applied = seq
        stats.phases["combine"] = time.perf_counter() - started - sum(stats.phases.values())
        await pipe.finish()
    if tied:
        stats.order_dependent = mark_order_dependent(tied, labels, cutoffs, cut_index, out,
                                                     records, families)
        stats.phases["last writes and reads"] = (time.perf_counter() - started
                                                 - sum(stats.phases.values()))
    stats.gaps = gaps.gaps_of(streams, [(topic, rows.gaps) for topic, _, rows, _ in archive])
    if mark_gaps:
        stats.incomplete = gaps.mark_incomplete(stats.gaps, specs, job.limits.max_future,
                                                gaps.key_ttls(job.features, settle_ms + lag_ms),
                                                labels.entities, cutoffs, out,
                                                labels.positions)
    stats.rows = len(cutoffs)
    stats.seconds = time.perf_counter() - started
    return out, stats


def _schedule(labels: Labels, cutoffs: Sequence[int], cut_index: dict[int, int],
              families_by_entity: dict[str, list[int]], settle_ms: int,
              ) -> tuple[dict[int, set[tuple[str, str]]], dict[int, list[int]],
                         dict[str, dict[str, int]], dict[str, dict[str, list[int]]]]:
    """Per cut index, the entities (type, id) to bring up to it and the rows read there; per
    entity type and id, the last cut index it is read at and (with ``settle_ms``) every one,
    in order. An entity is brought up to each moment a row of it is read at and, with
    ``settle_ms``, to that much before it: the records in between are the ones that make a
    value lag_sensitive."""
    catch_up: dict[int, set[tuple[str, str]]] = {}
    reads: dict[int, list[int]] = {}
    wanted: dict[str, dict[str, int]] = {}
    read_at: dict[str, dict[str, list[int]]] = {}
    for row, (entity, entity_id, cutoff) in enumerate(zip(labels.entities, labels.ids, cutoffs,
                                                          strict=True)):
        x = cut_index[cutoff]
        reads.setdefault(x, []).append(row)
        if entity not in families_by_entity:
            continue
        catch_up.setdefault(x, set()).add((entity, entity_id))
        if settle_ms > 0:
            catch_up.setdefault(cut_index[cutoff - settle_ms], set()).add((entity, entity_id))
            read_at.setdefault(entity, {}).setdefault(entity_id, []).append(x)
        last = wanted.setdefault(entity, {})
        if last.get(entity_id, -1) < x:
            last[entity_id] = x
    for by_id in read_at.values():
        for xs in by_id.values():
            xs.sort()
    return catch_up, reads, wanted, read_at


def _read_within(xs: list[int], x: int, cuts: Sequence[int], settle_ms: int) -> bool:
    """Whether one of the cut indexes ``xs`` (ascending) is at ``x`` or after it, less than
    ``settle_ms`` later: a read a write at ``x`` can make lag_sensitive (its settle time,
    ``(cut - settle_ms, cut]``, holds the write's moment)."""
    i = bisect.bisect_left(xs, x)
    return i < len(xs) and cuts[xs[i]] < cuts[x] + settle_ms


def restrict_to_positions(records: list[dict[str, entityindex.EntityRecords]],
                          families: list[entityindex.Family], labels: Labels,
                          cutoffs: Sequence[int], cut_index: dict[int, int],
                          streams: list[entityindex.Stream]) -> None:
    """Cut each entity's records down to those its rows' ``labels.positions`` count."""
    assert labels.positions is not None
    chains: dict[tuple[str, str], entityindex.Chain] = {}
    for row in sorted(range(len(cutoffs)), key=cutoffs.__getitem__):
        chains.setdefault((labels.entities[row], labels.ids[row]), []).append(
            (cut_index[cutoffs[row]], labels.positions[row]))
    places = entityindex.places_of(streams)
    for k, family in enumerate(families):
        kept = records[k]
        for entity_id, found in kept.items():
            chain = chains.get((family.entity, entity_id))
            if chain is not None:
                kept[entity_id] = entityindex.restrict(found, chain, places)


def _bring_up(combiner: BatchCombiner, found: entityindex.EntityRecords, x: int, seq: int,
              low: int, high: int) -> tuple[int, int, int]:
    """Feed the combiner an entity's records that count by cut ``x`` and are not applied yet,
    under the replay's partition from offset ``seq`` on, each with its partition's watermark
    before it (what the lateness rule compares with); the next offset, and ``low``/``high``
    widened to the reaches of those some feature took (``fold.add_each``)."""
    at, upto = found.applied, bisect.bisect_right(found.cuts, x, found.applied)
    found.applied = upto
    of = found.of
    out: tuple[int, int, int] = combiner.add_each(
        REPLAY_TP, of.feeds, of.records, of.watermarks, of.reaches, found.rows, at, upto, seq,
        low, high)
    return out


def expiry_checks(expiries: expiry.Expiry, labels: Labels, rows: list[int]) -> list[expiry.Check]:
    """The key expiry checks before one read (``rows``: of one entity type and read time): one
    per entity whose live key may have expired by then, deciding for all its rows."""
    checks: dict[str, expiry.Check] = {}
    for row in rows:
        entity_id = labels.ids[row]
        check = checks.get(entity_id)
        if check is None:
            found = expiries.before_read(labels.entities[row], entity_id, labels.times[row])
            if found is None:
                continue
            check = checks[entity_id] = found
        check.rows.append(row)
    return list(checks.values())


def mark_doubtful(expiries: expiry.Expiry, labels: Labels, at_ms: int, rows: list[int],
                  out: list[dict[str, FeatureValue] | None]) -> int:
    """Give the status lag_sensitive to the values of ``rows`` (read at ``at_ms``) that the
    live read may have served ``missing`` (:meth:`expiry.Expiry.in_doubt`); how many."""
    marked = 0
    for row in rows:
        values = out[row]
        if values is not None:
            marked += _mark(values, _PRESENT_ONLY, functools.partial(
                _in_doubt, expiries, labels.entities[row], labels.ids[row], at_ms))
    return marked


def note_late_renewals(expiries: expiry.Expiry, labels: Labels, rows: list[int],
                       out: list[dict[str, FeatureValue] | None],
                       renewed_late: dict[tuple[int, str], int]) -> None:
    """Note in ``renewed_late`` the values of ``rows`` a worker that wrote some record late
    would have served ``missing`` (:meth:`expiry.Expiry.late_renewal`)."""
    for row in rows:
        values = out[row]
        if values is None:
            continue
        entity, entity_id = labels.entities[row], labels.ids[row]
        for name, value in values.items():
            if value.status != "missing":
                lag = expiries.late_renewal(entity, entity_id, value.newest_event_ms)
                if lag is not None:
                    renewed_late[row, name] = lag


def _in_doubt(expiries: expiry.Expiry, entity: str, entity_id: str, at_ms: int, name: str,
              value: FeatureValue) -> bool:
    return expiries.in_doubt(entity, entity_id, at_ms, name, value.newest_event_ms)


def mark_born(labels: Labels, rows: list[int], out: list[dict[str, FeatureValue] | None],
              since: int, recent: RecentWrites) -> int:
    """Give the status lag_sensitive to the values of ``rows`` read from a key that a write
    after moment ``since`` created (first written, or maybe afresh after an expiry): a worker
    that had not applied those records read no key, every value ``missing``; how many."""
    return sum(_mark(values, _PRESENT_ONLY) for row in rows
               if (values := out[row]) is not None
               and recent.created_since(labels.entities[row], labels.ids[row], since))


def mark_all(out: list[dict[str, FeatureValue] | None], rows: list[int]) -> int:
    """Give every value of ``rows`` the status lag_sensitive; how many."""
    return sum(_mark(values) for row in rows if (values := out[row]) is not None)


#: statuses :func:`_mark` leaves: a value marked already; and one read ``missing``, which a key
#: or entry that did not exist reads too
_MARKED = frozenset({LAG_SENSITIVE})
_PRESENT_ONLY = frozenset({LAG_SENSITIVE, "missing"})


def _mark(values: dict[str, FeatureValue], spare: frozenset[str] = _MARKED,
          doubtful: Callable[[str, FeatureValue], bool] | None = None) -> int:
    """Give the status lag_sensitive to the values of one row whose status is not in
    ``spare`` (and that ``doubtful`` says may differ, if given); how many."""
    marked = 0
    for name, value in values.items():
        if value.status not in spare and (doubtful is None or doubtful(name, value)):
            values[name] = value._replace(status=LAG_SENSITIVE)  # type: ignore[arg-type]
            marked += 1
    return marked


#: per topic of the features: its record kind, its archived rows as columns and where each
#: partition's archive starts (:func:`read_archive`), and the fields the features read
ArchiveTables = list[tuple[str, RecordKind, TopicRows, set[str]]]


def replayed(job: JobConfig, specs: list[FeatureSpec]) -> list[FeatureSpec]:
    """``specs`` and the job's other features of their entity types on their topics: what a
    build replays. Those write the same entity keys from the same records, and a key expires
    the longest TTL of its entries after the last record any of them took
    (eventpulse/offline/expiry.py); they cost folding, not reading. Only ``specs`` are read."""
    names = {spec.name for spec in specs}
    entities = {spec.entity for spec in specs}
    topics = {spec.topic for spec in specs}
    return [*specs, *(f for f in job.features if f.name not in names and f.entity in entities
                      and f.topic in topics)]


def read_archive(job: JobConfig, store: ArchiveStore, specs: list[FeatureSpec], until: int,
                 ) -> ArchiveTables:
    """The features' topics' archived rows the broker had by ``until``, as columns (pyarrow's
    buffers: read on its threads, shared by forked processes, freed at once), with the fields
    :func:`replayed` features read."""
    fields: dict[str, set[str]] = {}
    for spec in replayed(job, specs):
        fields.setdefault(spec.topic, set()).update(spec.fields_read)
    return [(topic, RecordKind(job.topics[topic]), read_topic(store, topic, until), read)
            for topic, read in sorted(fields.items())]


def streams_of(tables: ArchiveTables) -> list[entityindex.Stream]:
    """Every archived partition of ``tables`` (their rows become records where needed, with
    the fields the features read)."""
    return [stream for topic, kind, rows, fields in tables
            for stream in entityindex.streams_of(topic, kind, rows, fields)]


def load_streams(job: JobConfig, store: ArchiveStore, specs: list[FeatureSpec], until: int,
                 ) -> list[entityindex.Stream]:
    """Every archived partition of the features' topics, rows the broker had by ``until``,
    their records with every field, as the worker has them (the reference replay)."""
    return [stream for topic, kind, rows, _ in read_archive(job, store, specs, until)
            for stream in entityindex.streams_of(topic, kind, rows)]


def cuts_of(cutoffs: Sequence[int], settle_ms: int) -> list[int]:
    """The moments a replay stops at: every cut-off, and with ``settle_ms``, that much before
    each (what the broker had by then is what a lag_sensitive value is told apart by)."""
    return sorted({*cutoffs, *(c - settle_ms for c in cutoffs)} if settle_ms > 0
                  else set(cutoffs))


def count_late(combiner: BatchCombiner, stats: TrainingStats) -> None:
    for name, count in combiner.stats.late.items():
        stats.late[name] = stats.late.get(name, 0) + count


async def apply(feature_store: FeatureStore, combiner: BatchCombiner, stats: TrainingStats,
                recent: RecentWrites | None, cut: int) -> dict[str, PartitionPosition | None]:
    """Write what the combiner holds (noting it in ``recent`` as written at ``cut``); where
    each partition then stands."""
    count_late(combiner, stats)
    spans = combiner.spans() if recent is not None else None
    plan = combiner.plan()
    conflict = await feature_store.apply(plan)
    if conflict is not None:  # a private namespace: nobody else writes there
        raise RuntimeError(f"unexpected writer in the private namespace at {conflict.tp}")
    if recent is not None and spans is not None:
        recent.wrote(plan.touched, cut)
        recent.note(spans, cut)
    return {tp: PartitionPosition(p.offset, p.watermark) for tp, p in plan.positions.items()}


def mark_lag_sensitive(labels: Labels, rows: list[int], out: list[dict[str, FeatureValue] | None],
                       recent: RecentWrites, since: int) -> int:
    """Mark the values that may count records the broker had only after ``since``
    (:mod:`eventpulse.offline.settle`); how many."""
    marked = 0
    counted = recent.counted
    for row in rows:
        values = out[row]
        if values is None:
            continue
        entity_id = labels.ids[row]
        for name, value in values.items():
            if counted(name, entity_id, since, value):
                values[name] = value._replace(status=LAG_SENSITIVE)  # type: ignore[arg-type]
                marked += 1
    return marked


def mark_order_dependent(ties: Ties, labels: Labels, cutoffs: Sequence[int],
                         cut_index: dict[int, int], out: list[dict[str, FeatureValue] | None],
                         records: list[dict[str, entityindex.EntityRecords]],
                         families: list[entityindex.Family]) -> int:
    """Give the status :data:`ORDER_DEPENDENT` to the `last` values a tie between partitions
    decided (:mod:`eventpulse.offline.ties`); how many."""
    family_of = {name: k for name, feature in ties.features.items()
                 for k, family in enumerate(families)
                 if (family.entity, family.key) == (feature.entity, tuple(feature.spec.key))}
    marked = 0
    for row, values in enumerate(out):
        if values is None:
            continue
        entity_id = labels.ids[row]
        for name, k in family_of.items():
            value = values.get(name)
            if value is None:
                continue
            if value.status == ORDER_DEPENDENT:  # the rows of one read share their values
                marked += 1
            elif ties.decided(name, entity_id, value, cut_index[cutoffs[row]],
                              records[k].get(entity_id)):
                values[name] = value._replace(status=ORDER_DEPENDENT)  # type: ignore[arg-type]
                marked += 1
    return marked


async def read(client: AsyncFeatureClient, labels: Labels, specs: list[FeatureSpec],
               rows: list[int], out: list[dict[str, FeatureValue] | None]) -> None:
    """Read the rows of one cut-off, one ``get_many`` per entity type and read time."""
    for plan, members in read_plans(client, labels, specs, rows):
        values = await client.fetch(plan)
        for r in members:
            out[r] = values[labels.ids[r]]


def read_plans(client: AsyncFeatureClient, labels: Labels, specs: list[FeatureSpec],
               rows: list[int]) -> list[tuple[ReadPlan, list[int]]]:
    """The reads of one cut-off's rows, one per entity type and read time, each with its rows
    (rows of an entity type no requested feature has are in none)."""
    by_read: dict[tuple[str, int], list[int]] = {}
    for row in rows:
        by_read.setdefault((labels.entities[row], labels.times[row]), []).append(row)
    plans = []
    # in time order: a key expiry check before a later read must not change an earlier one
    for (entity, moment), members in sorted(by_read.items(), key=lambda item: item[0][1]):
        names = [s.name for s in specs if s.entity == entity]
        if names:
            ids = sorted({labels.ids[r] for r in members})
            plans.append((client.read_plan(entity, ids, names, moment), members))
    return plans


#: per feature name, a value and a status per label row: the output's columns
#: per feature, its values and statuses in label row order: Python lists (:func:`columns_of`),
#: or arrow arrays where the values have one type (:func:`typed_columns`)
Columns = dict[str, tuple["list[Any] | pa.Array", "list[str] | pa.Array"]]


def columns_of(specs: list[FeatureSpec], out: list[dict[str, FeatureValue] | None]) -> Columns:
    """The values and statuses of :func:`compute`'s result, feature by feature."""
    columns: dict[str, tuple[list[Any], list[str]]] = {
        spec.name: ([None] * len(out), [NOT_APPLICABLE] * len(out)) for spec in specs}
    # row by row, each row's values once (spec by spec, every row's dict was visited once per
    # feature: a tenth of a share's time on 100k rows, mostly waiting on memory)
    for row, values in enumerate(out):
        if values is None:
            continue
        for name, cell in values.items():
            column = columns.get(name)
            if column is not None:
                column[0][row] = cell.value
                column[1][row] = cell.status
    return dict(columns)


def typed_columns(columns: Columns) -> Columns:
    """``columns`` as arrow arrays, values too where they have one type (else left as they
    are: :func:`value_array` types them once every share's are joined). A share sends these:
    pickled as buffers, joined in C (eventpulse.offline.parallel), instead of a million Python
    objects through a pipe and a loop in the parent while nothing else runs. Only where the
    arrow values give back the values themselves: integers arrow made floats (``[1, 2.5]``)
    stay Python values, which the parent types with every share's (found by an outside test:
    a share whose values were all lists of numbers sent ``[1.0, 2.5]``, which the joined
    column of several types wrote as its JSON text, where one process wrote ``[1, 2.5]``)."""
    out: Columns = {}
    for name, (values, statuses) in columns.items():
        typed = _typed(values, lossless=True) if isinstance(values, list) else None
        out[name] = (values if typed is None else typed, pa.array(statuses, pa.string()))
    return out


#: what pyarrow raises for values it cannot put in one array
_UNTYPED = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError)


def _typed(values: list[Any], lossless: bool = False) -> pa.Array | None:
    """The values as one arrow array of the type arrow infers, or None where it cannot type
    them, or where that type holds a struct: arrow gives objects of several shapes every
    member of all of them (the missing ones null), which is not the value served.
    ``lossless``: None too where arrow made integers floats."""
    try:
        typed = pa.array(values)
    except _UNTYPED:
        return None
    if _holds_struct(typed.type) or (_holds_float(typed.type) and (
            _any_of(values, bool) or (lossless and _any_of(values, int)))):
        # arrow takes a boolean after a float for 1.0 (found by an outside test: a served
        # true read 1.0 where a float came first, "true" where it came last)
        return None
    return typed


def _any_of(values: Iterable[Any], kind: type) -> bool:
    """Whether a value of exactly ``kind`` (a boolean is not an ``int`` here) is among
    ``values`` or in their lists."""
    return any(value.__class__ is kind or (value.__class__ is list and _any_of(value, kind))
               for value in values)


def _item_type(kind: pa.DataType) -> pa.DataType:
    """``kind``, or what its lists hold (at any depth)."""
    while (pa.types.is_list(kind) or pa.types.is_large_list(kind)
           or pa.types.is_fixed_size_list(kind)):
        kind = kind.value_type
    return kind


def _holds_struct(kind: pa.DataType) -> bool:
    """Whether ``kind`` is a struct or map, or a list of them (at any depth)."""
    item = _item_type(kind)
    return bool(pa.types.is_struct(item) or pa.types.is_map(item))


def _holds_float(kind: pa.DataType) -> bool:
    """Whether ``kind`` is floating point, or a list of it (at any depth)."""
    return bool(pa.types.is_floating(_item_type(kind)))


def value_array(values: list[Any] | pa.Array) -> pa.Array:
    """A feature's values as one column: as arrow types them (numbers, text, booleans, lists of
    those); values of several types (a `last` over a field that is a string here, a number or
    an object there) and objects each as JSON text, which decodes to what was served."""
    if isinstance(values, pa.Array):
        return values
    typed = _typed(values)
    if typed is not None:
        return typed
    return _json_text(values)


def _json_text(values: list[Any]) -> pa.Array:
    return pa.array([None if v is None else json.dumps(v, default=str) for v in values],
                    pa.string())


def _table(labels: Labels, specs: list[FeatureSpec],
           out: list[dict[str, FeatureValue] | None]) -> pa.Table:
    return table_of(labels, specs, columns_of(specs, out))


def table_of(labels: Labels, specs: list[FeatureSpec], columns: Columns) -> pa.Table:
    """The labels with a value and a status column per feature."""
    table = labels.table
    for spec in specs:
        values, statuses = columns[spec.name]
        table = table.append_column(spec.name, value_array(values))
        table = table.append_column(spec.name + STATUS_SUFFIX, (
            statuses if isinstance(statuses, pa.Array) else pa.array(statuses, pa.string())))
    return table


def write(table: pa.Table, path: Path) -> None:
    """The training set to ``path`` (``eventpulse.offline.cli.check_output`` first); a write
    that fails leaves no file behind."""
    try:
        if path.suffix.lower() == ".csv":
            # CSV holds no lists: a feature's list values as JSON text (label columns that are
            # lists were refused before the build: eventpulse.offline.cli.check_output)
            for index, column in enumerate(table.schema):
                if pa.types.is_nested(column.type):
                    table = table.set_column(index, column.name, _json_text(
                        table.column(index).to_pylist()))
            pacsv.write_csv(table, path)
        else:
            pq.write_table(table, path)
    except (OSError, pa.ArrowException) as exc:
        path.unlink(missing_ok=True)
        raise TrainingSetError(f"--out {path}: cannot write it ({exc})") from None
