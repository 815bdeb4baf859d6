"""``eventpulse consistency``: served reads (logged by :mod:`eventpulse.offline.readlog` and
archived like any topic) recomputed from the archive, feature by feature.

Every logged read is recomputed at its moment with what the broker had then (the training-set
code). A read that differs and logged the offsets the worker had applied to its entity
(``applied``) is recomputed with exactly those records: if that equals what was served, the
worker had not applied some records yet (``not_yet_applied``, with how long the broker had held
the oldest of them), or had applied records the broker had only after the read's moment
(``applied_after_moment``: the read reached Redis after its ``at``), or, with the same records,
in another order or grouping (``applied_order``: ``last`` ties, float sums' last bits). Per
partition: a worker may have applied one partition further than another, which no single lag
reproduces. A read without positions (or one they do not explain) is recomputed with what the
broker had a little earlier (up to ``max_lag_ms``, on a ladder of lags): if one of those equals
what was served, the difference is the worker not having applied the newest records yet
(``not_yet_applied``, with the lag). So is
a value served from a key the recomputation says had expired less than that long before (the
worker wrote the entity's last records later than the broker had them, and its key lived on
as long after them: eventpulse/offline/expiry.py), and a value served ``missing`` from an
entry a write that late would have found gone (its key expired before it: ``renewed_late``).
Where the recomputation lacks events the served value had, the archive is behind or refused
them (``archive_behind``), or lost them: a value that may count records of offsets no archive
file holds (``archive_gap``, eventpulse/offline/gaps.py) is not recomputed further. Anything
else is ``unexplained``: a bug.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from eventpulse.archive.layout import KindLayout
from eventpulse.archive.read import ArchiveError, read_table, records
from eventpulse.archive.store import ArchiveStore
from eventpulse.config import JobConfig
from eventpulse.offline import entityindex, gaps, training
from eventpulse.offline.ties import REFUSED, candidates, entity_of, taken
from eventpulse.offline.values import float_sums, identical, rounding_apart, rounding_bound
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.client import FeatureValue
from eventpulse.tables.spec import CompiledFeature


def _ladder(first_ms: int, last_ms: int, ratio: float) -> tuple[int, ...]:
    lags = [first_ms]
    while lags[-1] < last_ms:
        lags.append(min(last_ms, max(lags[-1] + 1, round(lags[-1] * ratio))))
    return tuple(lags)


#: the lags a differing read is recomputed at: 20 ms to 2 min, each 10% above the last (a value
#: changes only where a record comes in: a coarser ladder, 1 s then 2 s, missed a worker 1.2 s
#: behind, found by an outside test); about 90 recomputations of each differing read
LAGS_MS = _ladder(20, 120_000, 1.1)
#: a read served this much after its ``at`` read a past moment (:attr:`Served.moment`)
PAST_READ_MS = 60_000
CAUSES = ("not_yet_applied", "applied_after_moment", "applied_order", "archive_behind",
          "archive_gap", "unexplained")


@dataclass
class FeatureReport:
    rows: int = 0
    exact: int = 0
    missing: int = 0  # served a value, recomputed none
    extra: int = 0  # recomputed a value, served none
    smape: list[float] = field(default_factory=list)
    causes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSES, 0))
    #: largest lag that explained a difference
    max_lag_ms: int = 0

    def not_yet_applied(self, lag_ms: int) -> None:
        """A difference explained by a worker ``lag_ms`` behind."""
        self.causes["not_yet_applied"] += 1
        self.max_lag_ms = max(self.max_lag_ms, lag_ms)

    def attribute(self, cause: str, lag_ms: int = 0) -> None:
        if cause == "not_yet_applied":
            self.not_yet_applied(lag_ms)
        else:
            self.causes[cause] += 1

    def to_dict(self) -> dict[str, Any]:
        ordered = sorted(self.smape)
        return {
            "rows": self.rows,
            "exact_rate": self.exact / self.rows if self.rows else None,
            "missing_rate": self.missing / self.rows if self.rows else None,
            "extra_rate": self.extra / self.rows if self.rows else None,
            "smape_mean": sum(ordered) / len(ordered) if ordered else None,
            "smape_p99": ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
            if ordered else None,
            "causes": dict(self.causes),
            "max_explained_lag_ms": self.max_lag_ms,
        }


@dataclass
class Served:
    entity: str
    entity_id: str
    at: int
    values: dict[str, dict[str, Any]]
    #: per ``topic:partition``, the offsets the worker had applied to the entity when the read
    #: began and ended (None: not logged)
    applied: dict[str, tuple[int, int]] | None = None
    #: when the read returned (the log's ``served_ms``; else when the broker had the log
    #: record, a little later; None: not known)
    served_ms: int | None = None

    @property
    def moment(self) -> int:
        """When the read was served, as far as the log says: its ``at``, or for a read of a
        past moment (served more than :data:`PAST_READ_MS` after ``at``) when it was served.
        Such a read (a backfill reading old windows) reads the window at ``at`` as the worker
        held it then, with records the broker had after ``at`` (found by an outside test:
        recomputed as of ``at``, they were not attributed). A log without ``served_ms`` (a
        foreign writer's) gives the time its record reached the broker: a read of the present
        whose log took longer than that is recomputed a little later than it was served, which
        the lags explain."""
        if self.served_ms is not None and self.served_ms - self.at > PAST_READ_MS:
            return self.served_ms
        return self.at

    def positions(self) -> list[dict[str, int]]:
        """What the read may have seen: the offsets applied when it began and, if a write came
        in before it ended, those then too (partitions with none applied left out)."""
        if not self.applied:
            return []
        first = {tp: start for tp, (start, _) in self.applied.items() if start >= 0}
        last = {tp: end for tp, (_, end) in self.applied.items() if end >= 0}
        return [first] if first == last else [first, last]

    def applied_through(self) -> dict[str, int] | None:
        """The offsets applied when the read ended, per ``topic:partition`` (None: not
        logged): it may count no record after them."""
        if not self.applied:
            return None
        return {tp: end for tp, (_, end) in self.applied.items()}


def served_reads(store: ArchiveStore, topic: str, since: int, until: int | None) -> list[Served]:
    """The reads logged on ``topic`` (archived) from ``since`` until before ``until``. Raises
    :class:`ArchiveError` where the topic's rows are not logged reads (another kind's)."""
    table = read_table(store, topic)
    missing = [name for name in KindLayout(RecordKind.FEATURE_READ).fields
               if name not in table.column_names]
    if table.num_rows and missing:
        raise ArchiveError(
            f"the archived topic {topic!r} holds no logged reads (its rows have no "
            f"{', '.join(missing)}): --topic names the topic a ServedReadLog writes "
            f"(default eventpulse-feature-reads)")
    out = []
    for item in records(table, RecordKind.FEATURE_READ):
        fields = item.record
        at = int(fields["timestamp"])
        if at < since or (until is not None and at >= until):
            continue
        out.append(Served(fields["entity"], fields["entity_id"], at, fields["values"],
                          applied_of(fields.get("applied")),
                          _served_ms(fields.get("served_ms"), item.broker_ms)))
    return out


def _served_ms(raw: Any, logged_ms: int) -> int:
    """A logged read's ``served_ms`` (an integer of milliseconds), else when the broker had its
    log record (a foreign writer's log, or one from before the field)."""
    return raw if type(raw) is int else logged_ms


def applied_of(raw: Any) -> dict[str, tuple[int, int]] | None:
    """A logged read's ``applied`` field, or None where it is absent or not of that form (a
    foreign writer's: the read is then explained without it)."""
    if not isinstance(raw, dict):
        return None
    out = {}
    for tp, pair in raw.items():
        if not (isinstance(tp, str) and isinstance(pair, list) and len(pair) == 2
                and all(type(o) is int for o in pair) and -1 <= pair[0] <= pair[1]
                and pair[1] >= 0):
            return None
        out[tp] = (pair[0], pair[1])
    return out


def same(served: dict[str, Any], value: FeatureValue) -> bool:
    return served.get("status") == value.status and identical(served.get("value"), value.value)


def lived_on(served: dict[str, Any], value: FeatureValue, expired_for: int | None,
             lag: int) -> bool:
    """Whether ``served`` is ``value`` but for a key the recomputation says had expired
    ``expired_for`` ms before the read (had the worker written the entity's last records as
    the broker had them), less than ``lag`` before: a worker that wrote them that much later
    kept its key that much longer, and served what was there (an empty window)."""
    return (expired_for is not None and expired_for < lag and value.status == "missing"
            and served.get("status") != "missing" and identical(served.get("value"), value.value))


def renewed_late(served: dict[str, Any], value: FeatureValue, late_by: int | None,
                 lag: int) -> bool:
    """Whether ``served`` is ``missing`` where the recomputation found an entry that a worker
    writing some later record of the entity ``late_by`` ms after the broker had it would have
    found gone, less than ``lag``: its key had expired by then, and the write started a fresh
    key without the entry."""
    return (late_by is not None and late_by <= lag and served.get("status") == "missing"
            and value.status != "missing")


def expiry_lag(served: dict[str, Any], value: FeatureValue, expired_for: int | None,
               late_by: int | None, longest: int) -> int | None:
    """The worker's lag, up to ``longest``, that explains a difference by when it wrote a key
    that expired (:func:`lived_on`, :func:`renewed_late`); None: not that."""
    if expired_for is not None and lived_on(served, value, expired_for, longest):
        return expired_for + 1
    if late_by is not None and renewed_late(served, value, late_by, longest):
        return late_by
    return None


def smape(a: Any, b: Any) -> float | None:
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b)):
        return None
    scale = (abs(a) + abs(b)) / 2
    return 0.0 if scale == 0 else abs(a - b) / scale


async def report(job: JobConfig, store: ArchiveStore, topic: str, since: int, until: int | None,
                 redis: aioredis.Redis, lags_ms: Sequence[int] = LAGS_MS, drop: bool = False,
                 ) -> dict[str, FeatureReport]:
    """Per feature, how the logged reads compare with their recomputation (``drop``: the
    namespaces computed in are removed after, for a Redis the user gave)."""
    reads = served_reads(store, topic, since, until)
    specs_by_name = {f.name: f for f in job.features}
    names = sorted({n for r in reads for n in r.values if n in specs_by_name})
    reports = {n: FeatureReport() for n in names}
    if not reads or not names:
        return reports
    # every feature of the entity types read, logged or not: the live key's TTL is the longest
    # of its entries', which the recomputation must hold to tell when it expired
    entities = {specs_by_name[n].entity for n in names}
    specs = [f for f in job.features if f.entity in entities]
    labels = training.Labels(pa.table({}), [r.entity for r in reads],
                             [r.entity_id for r in reads], [r.at for r in reads],
                             [r.moment for r in reads])
    longest = max(lags_ms, default=0)
    recomputed, stats = await training.compute(job, store, labels, specs, redis, drop=drop,
                                               lag_ms=longest, ties=False, mark_gaps=False)
    by_name = {spec.name: spec for spec in specs}
    ttls = gaps.key_ttls(job.features, longest)
    differing: list[tuple[int, str]] = []
    for i, (read, values) in enumerate(zip(reads, recomputed, strict=True)):
        for name, served in read.values.items():
            if name not in reports or values is None or name not in values:
                continue
            rep, value = reports[name], values[name]
            rep.rows += 1
            if same(served, value):
                rep.exact += 1
                continue
            served_missing = served.get("status") == "missing"
            if not served_missing and value.status == "missing":
                rep.missing += 1
            elif served_missing and value.status != "missing":
                rep.extra += 1
            if any(gaps.may_count(gap, by_name[name], job.limits.max_future,
                                  ttls[by_name[name].entity], read.moment, value,
                                  read.applied_through()) for gap in stats.gaps):
                rep.causes["archive_gap"] += 1  # recomputed without records the archive lost
                continue
            # without logged positions, a mean's count says the records are the same (a sum's
            # says nothing: a record left out of it may be below any rounding bound)
            if read.applied is None and rounding_apart(by_name[name].aggregation, served, value):
                rep.causes["applied_order"] += 1  # the same records, added up in another order
                rep.smape.append(smape(served.get("value"), value.value) or 0.0)
                continue
            lag = expiry_lag(served, value, stats.expired.get(i),
                             stats.renewed_late.get((i, name)), longest)
            if lag is not None:
                rep.not_yet_applied(lag)
                continue
            diff = smape(served.get("value"), value.value)
            if diff is not None:
                rep.smape.append(diff)
            differing.append((i, name))
    differing = await _attribute_by_positions(job, store, reads, differing, specs, reports,
                                              redis, longest, drop)
    await _attribute(job, store, reads, recomputed, differing, specs, reports, redis, lags_ms,
                     drop)
    return reports


class _Partitions:
    """The archived partitions of the features read, asked by offset: per partition its topic,
    offsets and, per row, the highest broker time up to it (its reach)."""

    def __init__(self, streams: list[entityindex.Stream]) -> None:
        self.streams = streams
        self.of = {s.tp: (s.topic, s.offsets, s.reach) for s in streams}

    def at(self, tp: str, offset: int) -> int | None:
        """The reach of the last row at or before ``offset`` (None: no such row)."""
        _, offsets, reach = self.of.get(tp, ("", (), ()))
        k = bisect.bisect_right(offsets, offset)
        return reach[k - 1] if k else None

    def behind(self, positions: dict[str, int], at: int, topic: str) -> int | None:
        """How long before ``at`` the broker had the oldest record of ``topic`` (a feature's)
        ``positions`` do not count (None: it had none by then; 0: it had it since ``at``'s
        millisecond). Only that topic's partitions: another topic's lag says nothing of this
        feature's (an outside test saw a user feature given a model topic's lag)."""
        oldest = None
        for tp, (of_topic, offsets, reach) in self.of.items():
            if of_topic != topic:
                continue
            k = bisect.bisect_right(offsets, positions.get(tp, -1))
            if k < len(offsets) and reach[k] <= at and (oldest is None or reach[k] < oldest):
                oldest = reach[k]
        return None if oldest is None else at - oldest

    def cause(self, feature: CompiledFeature, read: Served, served: dict[str, Any],
              value: FeatureValue, positions: dict[str, int]) -> tuple[str, int] | None:
        """Why ``served`` differs from what the moment's records give, ``value`` being what
        exactly the records ``positions`` count give: (cause, lag); None: not explained.
        ``served`` is those records' value if it is ``value``, or differs from it only in the
        order the records were applied (a `last` tie, a float sum's rounding); then the
        positions say why it differs from the moment's: a record not applied yet first (found
        by an outside test: a lagging worker's sum, rounded otherwise, was put to the order
        alone, its lag lost)."""
        topic = feature.spec.topic
        if not same(served, value) and not (
                self.tied(feature, read, served, value, positions)
                or self.rounded(feature, read, served, value, positions)):
            return None
        if (behind := self.behind(positions, read.moment, topic)) is not None:
            return "not_yet_applied", behind
        if self.ahead(positions, read.moment, topic):
            return "applied_after_moment", 0
        return "applied_order", 0

    def tied(self, feature: CompiledFeature, read: Served, served: dict[str, Any],
             value: FeatureValue, positions: dict[str, int]) -> bool:
        """Whether a ``last`` value served differs from the recomputed one only in which of
        two records of the same event time won: the newest event time the feature took in
        the window read belongs to records of the entity in two partitions, applied by the
        worker in the order its fetches brought them (the later one wins a tie), and the
        served value is the last such record of one of them. (A worker's fetches cannot be
        replayed.) The newest event time of the entity's entry says nothing of it: a hopping
        window read ends before the newest records (an outside test had ties attributed
        only where the two were the same)."""
        newest = served.get("newest_event_ms")
        if (feature.spec.aggregation != "last" or newest is None
                or newest != value.newest_event_ms or served.get("status") != value.status):
            return False
        values = candidates(self.taken_rows(feature, read, value, positions))
        return len(values) > 1 and any(identical(served.get("value"), v) for v in values)

    def rounded(self, feature: CompiledFeature, read: Served, served: dict[str, Any],
                value: FeatureValue, positions: dict[str, int]) -> bool:
        """Whether a ``sum`` or ``mean`` served differs from the one recomputed with exactly
        the records the read held (``positions``) by no more than adding those records up in
        another order and grouping can (found by outside tests: a sum differing in its
        twelfth digit, and one whose terms cancel, 1e16 + 1 + 1 - 1e16, which the worker's
        batches made 0.0 and the recomputation 2.0): the same status and newest event, apart
        by at most :func:`~eventpulse.offline.values.rounding_bound` of those records."""
        pair = float_sums(feature.spec.aggregation, served, value)
        if pair is None:
            return False
        a, b = pair
        terms = [float(v) for _, _, v in self.taken_rows(feature, read, value, positions)
                 if type(v) in (int, float)]
        bound = rounding_bound(terms)
        if feature.spec.aggregation == "mean":  # the sum's bound over the count, and the division
            bound = bound / max(1, len(terms)) + 2 * math.ulp(max(abs(a), abs(b)))
        return abs(a - b) <= bound

    def taken_rows(self, feature: CompiledFeature, read: Served, value: FeatureValue,
                   positions: dict[str, int]) -> list[tuple[int, str, Any]]:
        """The records ``positions`` count that the feature took for the read's entity in the
        window of ``value``: (event time, partition, value) each, each partition's in offset
        order."""
        start, end = value.window_start_ms, value.window_end_ms
        taken_rows: list[tuple[int, str, Any]] = []
        for stream in self.streams:
            if stream.topic != feature.spec.topic or stream.tp not in positions:
                continue
            upto = bisect.bisect_right(stream.offsets, positions[stream.tp])
            times = stream.table.column("timestamp").slice(0, upto)
            rows = pc.and_(pc.greater_equal(times, start), pc.less(times, end))
            key = feature.key_field
            if key is not None and key in stream.table.column_names:
                rows = pc.and_(rows, pc.equal(stream.table.column(key).slice(0, upto),
                                              read.entity_id))
            found = pc.indices_nonzero(rows).to_pylist()
            stream.need(found)
            for row in found:
                view = stream.records[row]
                taken_value = taken(feature, view, stream.watermarks[row])
                if (taken_value is not REFUSED
                        and entity_of(feature, view) == read.entity_id):
                    taken_rows.append((view["timestamp"], stream.tp, taken_value))
        return taken_rows

    def ahead(self, positions: dict[str, int], at: int, topic: str) -> bool:
        """Whether ``positions`` count a record of ``topic`` the broker had only after ``at``."""
        return any(self.of[tp][0] == topic and (r := self.at(tp, o)) is not None and r > at
                   for tp, o in positions.items() if tp in self.of)


def _rounds(candidates: list[tuple[int, Served, int, dict[str, int]]],
            ) -> list[list[tuple[int, Served, int, dict[str, int]]]]:
    """(read, served read, cut-off, positions) split into label sets in which an entity's
    positions never go back in cut-off order (:func:`training.restrict_to_positions`): one
    set as a rule, as a shard's fence only moves on; another where a write came in during a
    read (its second positions) or reads arrived out of order."""
    rounds: list[list[tuple[int, Served, int, dict[str, int]]]] = []
    lasts: list[dict[tuple[str, str], tuple[int, dict[str, int]]]] = []
    for candidate in sorted(candidates, key=lambda c: (c[2], sum(c[3].values()))):
        _, read, cutoff, positions = candidate
        key = (read.entity, read.entity_id)
        for r, last in enumerate(lasts):
            before = last.get(key)
            if before is None or (
                    (before[1] == positions) if before[0] == cutoff else
                    all(positions.get(tp, -1) >= o for tp, o in before[1].items())):
                rounds[r].append(candidate)
                last[key] = (cutoff, positions)
                break
        else:
            rounds.append([candidate])
            lasts.append({key: (cutoff, positions)})
    return rounds


async def _attribute_by_positions(job: JobConfig, store: ArchiveStore, reads: list[Served],
                                  differing: list[tuple[int, str]], specs: list[Any],
                                  reports: dict[str, FeatureReport], redis: aioredis.Redis,
                                  longest: int, drop: bool) -> list[tuple[int, str]]:
    """Recompute the differing reads that logged positions with exactly the records those
    count; attribute those that then equal what was served; the rest, returned, go on to the
    ladder of lags."""
    rows = sorted({i for i, _ in differing if reads[i].applied})
    if not rows:
        return differing
    archive = training.read_archive(job, store, specs, max(reads[i].moment for i in rows) + longest)
    partitions = _Partitions(training.streams_of(archive))
    candidates = []
    for i in rows:
        for positions in reads[i].positions():
            # the cut-off takes in every record the positions count, however late the broker
            # had it (a read reaches Redis after its moment)
            cutoff = max([reads[i].moment, *(r for tp, o in positions.items()
                                         if (r := partitions.at(tp, o)) is not None)])
            candidates.append((i, reads[i], cutoff, positions))
    compiled = {spec.name: CompiledFeature(spec, k) for k, spec in enumerate(specs)}
    unexplained = set(differing)
    for group in _rounds(candidates):
        labels = training.Labels(pa.table({}), [read.entity for _, read, _, _ in group],
                                 [read.entity_id for _, read, _, _ in group],
                                 [read.at for _, read, _, _ in group],
                                 [cutoff for _, _, cutoff, _ in group],
                                 [positions for _, _, _, positions in group])
        values, stats = await training.compute(job, store, labels, specs, redis, drop=drop,
                                               archive=archive, lag_ms=longest, ties=False)
        for k, (i, read, _, positions) in enumerate(group):
            found = values[k]
            if found is None:
                continue
            for name, served in read.values.items():
                if (i, name) not in unexplained or name not in found:
                    continue
                lag = expiry_lag(served, found[name], stats.expired.get(k),
                                 stats.renewed_late.get((k, name)), longest)
                cause = (("not_yet_applied", lag) if lag is not None else partitions.cause(
                    compiled[name], read, served, found[name], positions))
                if cause is not None:
                    reports[name].attribute(*cause)
                    unexplained.discard((i, name))
    return [d for d in differing if d in unexplained]


async def _attribute(job: JobConfig, store: ArchiveStore, reads: list[Served],
                     recomputed: list[dict[str, FeatureValue] | None],
                     differing: list[tuple[int, str]], specs: list[Any],
                     reports: dict[str, FeatureReport], redis: aioredis.Redis,
                     lags_ms: Sequence[int], drop: bool) -> None:
    if not differing:
        return
    rows = sorted({i for i, _ in differing})
    entities, ids, times, cutoffs = [], [], [], []
    for lag in lags_ms:
        for i in rows:
            entities.append(reads[i].entity)
            ids.append(reads[i].entity_id)
            times.append(reads[i].at)
            cutoffs.append(reads[i].moment - lag)
    labels = training.Labels(pa.table({}), entities, ids, times, cutoffs)
    earlier, stats = await training.compute(job, store, labels, specs, redis, drop=drop,
                                            ties=False)
    where = {i: k for k, i in enumerate(rows)}
    for i, name in differing:
        served = reads[i].values[name]
        rep = reports[name]
        for step, lag in enumerate(lags_ms):
            k = step * len(rows) + where[i]
            values = earlier[k]
            if values is not None and (same(served, values[name]) or lived_on(
                    served, values[name], stats.expired.get(k), lag)):
                rep.not_yet_applied(lag)
                break
        else:
            now_values = recomputed[i]
            newest = served.get("newest_event_ms")
            ours = now_values[name].newest_event_ms if now_values else None
            if newest is not None and (ours is None or ours < newest):
                rep.causes["archive_behind"] += 1
            else:
                rep.causes["unexplained"] += 1


def as_text(reports: dict[str, FeatureReport]) -> str:
    lines = [f"{'feature':<24} {'rows':>7} {'exact':>7} {'missing':>8} {'extra':>7} "
             f"{'smape':>8} {'p99':>8} {'max lag':>9}  causes"]
    for name, rep in reports.items():
        d = rep.to_dict()

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.2f}%"

        def lag(ms: int) -> str:  # the largest lag that explained a difference
            return f"{ms / 1000:.3f}s" if ms else "-"

        causes = ", ".join(f"{k}={v}" for k, v in rep.causes.items() if v) or "-"
        lines.append(f"{name:<24} {rep.rows:>7} {pct(d['exact_rate']):>7} "
                     f"{pct(d['missing_rate']):>8} {pct(d['extra_rate']):>7} "
                     f"{pct(d['smape_mean']):>8} {pct(d['smape_p99']):>8} "
                     f"{lag(rep.max_lag_ms):>9}  {causes}")
    return "\n".join(lines)


def write_metrics(reports: dict[str, FeatureReport], path: str) -> None:
    """A Prometheus text file (node-exporter's textfile collector reads it)."""
    registry = CollectorRegistry()
    rows = Gauge("eventpulse_consistency_rows", "Served reads compared", ["feature"],
                 registry=registry)
    exact = Gauge("eventpulse_consistency_exact_ratio", "Share equal to the recomputation",
                  ["feature"], registry=registry)
    causes = Gauge("eventpulse_consistency_differences", "Differences by cause",
                   ["feature", "cause"], registry=registry)
    for name, rep in reports.items():
        rows.labels(name).set(rep.rows)
        exact.labels(name).set(rep.exact / rep.rows if rep.rows else float("nan"))
        for cause, count in rep.causes.items():
            causes.labels(name, cause).set(count)
    write_to_textfile(path, registry)
