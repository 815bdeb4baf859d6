"""``eventpulse consistency``: served reads (logged by :mod:`eventpulse.offline.readlog` and
archived like any topic) recomputed from the archive, feature by feature.

Every logged read is recomputed at its moment with what the broker had then (the training-set
code). A read that differs is then recomputed with what the broker had a little earlier (up to
``max_lag_ms``, on a ladder of lags): if one of those equals what was served, the difference is
the worker not having applied the newest records yet (``not_yet_applied``, with the lag). So is
a value served from a key the recomputation says had expired less than that long before (the
worker wrote the entity's last records later than the broker had them, and its key lived on
as long after them: eventpulse/offline/expiry.py), and a value served ``missing`` from an
entry a write that late would have found gone (its key expired before it: ``renewed_late``).
Where the recomputation lacks events the served value had, the archive is behind or refused
them (``archive_behind``). Anything else is ``unexplained``: a bug.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from eventpulse.archive.read import read_table, records
from eventpulse.archive.store import ArchiveStore
from eventpulse.config import JobConfig
from eventpulse.offline import training
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.client import FeatureValue


def _ladder(first_ms: int, last_ms: int, ratio: float) -> tuple[int, ...]:
    lags = [first_ms]
    while lags[-1] < last_ms:
        lags.append(min(last_ms, max(lags[-1] + 1, round(lags[-1] * ratio))))
    return tuple(lags)


#: the lags a differing read is recomputed at: 20 ms to 2 min, each 10% above the last (a value
#: changes only where a record comes in: a coarser ladder, 1 s then 2 s, missed a worker 1.2 s
#: behind, found by an outside test); about 90 recomputations of each differing read
LAGS_MS = _ladder(20, 120_000, 1.1)
CAUSES = ("not_yet_applied", "archive_behind", "unexplained")


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


def served_reads(store: ArchiveStore, topic: str, since: int, until: int | None) -> list[Served]:
    out = []
    for item in records(read_table(store, topic), RecordKind.FEATURE_READ):
        fields = item.record.__dict__
        at = int(fields["timestamp"])
        if at < since or (until is not None and at >= until):
            continue
        out.append(Served(fields["entity"], fields["entity_id"], at, fields["values"]))
    return out


def same(served: dict[str, Any], value: FeatureValue) -> bool:
    return served.get("status") == value.status and identical(served.get("value"), value.value)


def identical(a: Any, b: Any) -> bool:
    """Equal as JSON values of the same types: ``1`` is not ``1.0``, ``-0.0`` not ``0.0``,
    ``True`` not ``1`` (Python's ``==`` says they are, and the report counted such differences,
    which a `last` feature can serve, as exact; found by an outside test). Object members in
    any order; NaN is NaN."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is float:
        return (a == b and math.copysign(1.0, a) == math.copysign(1.0, b)) or (a != a and b != b)
    if kind is list:
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if kind is dict:
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    return bool(a == b)


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
                             [r.entity_id for r in reads], [r.at for r in reads])
    longest = max(lags_ms, default=0)
    recomputed, stats = await training.compute(job, store, labels, specs, redis, drop=drop,
                                               lag_ms=longest)
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
            lag = expiry_lag(served, value, stats.expired.get(i),
                             stats.renewed_late.get((i, name)), longest)
            if lag is not None:
                rep.not_yet_applied(lag)
                continue
            diff = smape(served.get("value"), value.value)
            if diff is not None:
                rep.smape.append(diff)
            differing.append((i, name))
    await _attribute(job, store, reads, recomputed, differing, specs, reports, redis, lags_ms,
                     drop)
    return reports


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
            cutoffs.append(reads[i].at - lag)
    labels = training.Labels(pa.table({}), entities, ids, times, cutoffs)
    earlier, stats = await training.compute(job, store, labels, specs, redis, drop=drop)
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
