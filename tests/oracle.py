"""Features computed offline, in plain Python, straight from the definitions: the test oracle.

Deliberately written without any of eventpulse's machinery (no combiner, no Redis, no sketches):
windows are enumerated per event, lateness is judged per partition in offset order, and
percentiles and distinct counts are exact, so the tests can hold the sketches to their documented
error.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from eventpulse.streams.schemas import to_epoch_ms
from eventpulse.tables.spec import FeatureSpec

# (partition, offset, record as dict) in offset order within each partition
Stream = Iterable[tuple[int, int, dict[str, Any]]]


def _get(record: dict[str, Any], path: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _holds(op: str, value: Any, expected: Any) -> bool:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if op == "eq":
        return bool(value == expected)
    if op == "ne":
        return bool(value != expected)
    if op == "in":
        return value in expected
    if op == "not_in":
        return value not in expected
    if op == "exists":
        return (value is not None) == bool(expected)
    if number is None:
        return False
    return {"gt": number > expected, "gte": number >= expected, "lt": number < expected,
            "lte": number <= expected}[op]


def _passes(record: dict[str, Any], condition: dict[str, Any] | None) -> bool:
    for path, test in (condition or {}).items():
        value = _get(record, path)
        checks = test if isinstance(test, dict) else {"eq": test}
        if not all(_holds(op, value, expected) for op, expected in checks.items()):
            return False
    return True


class Oracle:
    """window contents per (feature, entity, window end), and the newest event per entity."""

    def __init__(self, specs: list[FeatureSpec], topic_of_partition: dict[int, str] | None = None):
        self.specs = specs
        self.windows: dict[tuple[str, str, int], list[tuple[int, Any, bool]]] = defaultdict(list)
        self.newest: dict[tuple[str, str], int] = {}
        self.ends: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.late = 0

    def feed(self, topic: str, stream: Stream) -> None:
        watermark: dict[int, int] = {}
        for partition, _offset, record in stream:
            ts = to_epoch_ms(record["timestamp"])
            before = watermark.get(partition, -(2**62))
            watermark[partition] = max(before, ts)
            for spec in self.specs:
                if spec.topic != topic or not _passes(record, spec.where):
                    continue
                parts = [_get(record, k) for k in spec.key]
                if any(p is None or p == "" for p in parts):
                    continue
                entity = "|".join(str(p) for p in parts)
                if ts < before - spec.window.lateness:
                    self.late += 1
                    continue
                value = _get(record, spec.value) if spec.value else None
                if spec.aggregation not in ("count", "ratio", "last", "distinct") and not (
                        isinstance(value, int | float) and not isinstance(value, bool)
                        and math.isfinite(value)):
                    continue
                if spec.aggregation in ("last", "distinct") and value is None:
                    continue
                step, size = spec.window.step_ms, spec.window.size
                bucket = ts - ts % step
                numerator = _passes(record, spec.numerator) if spec.numerator else False
                for end in range(bucket + step, bucket + size + 1, step):
                    self.windows[(spec.name, entity, end)].append((ts, value, numerator))
                    self.ends[(spec.name, entity)].add(end)
                key = (spec.name, entity)
                self.newest[key] = max(self.newest.get(key, ts), ts)

    def value(self, spec: FeatureSpec, entity: str, end: int) -> Any:
        items = self.windows.get((spec.name, entity, end), [])
        agg = spec.aggregation
        if agg == "count":
            return len(items)
        if agg == "sum":
            return sum(float(v) for _, v, _ in items)
        if not items:
            return 0 if agg == "distinct" else None
        values = [float(v) for _, v, _ in items] if agg not in ("last", "distinct", "ratio") else []
        if agg == "mean":
            return sum(values) / len(values)
        if agg == "min":
            return min(values)
        if agg == "max":
            return max(values)
        if agg == "last":
            newest = max(ts for ts, _, _ in items)
            return [v for ts, v, _ in items if ts == newest][-1]
        if agg == "distinct":
            return len({str(v) for _, v, _ in items})
        if agg == "ratio":
            return sum(1 for _, _, n in items if n) / len(items)
        q = float(agg[1:]) / 100
        ordered = sorted(values)
        return ordered[math.floor(q * (len(ordered) - 1))]

    def live_windows(self, spec: FeatureSpec, entity: str) -> list[int]:
        """Window ends still kept in Redis: from the newest event's step back by the lateness
        (what a reader now and a late event can still reach), up to its last window."""
        newest = self.newest.get((spec.name, entity))
        if newest is None:
            return []
        step = spec.window.step_ms
        low = newest - newest % step - -(-spec.window.lateness // step) * step
        return sorted(end for end in self.ends[(spec.name, entity)] if end >= low)

    def entities(self, spec: FeatureSpec) -> set[str]:
        return {entity for (name, entity) in self.newest if name == spec.name}


def close_enough(spec: FeatureSpec, expected: Any, actual: Any) -> bool:
    """Exact for counts; float noise for sums; the documented sketch errors otherwise."""
    if expected is None or actual is None:
        return expected is None and actual is None
    agg = spec.aggregation
    if agg in ("count", "last"):
        return bool(expected == actual)
    if agg == "distinct":
        return abs(actual - expected) <= max(1, 0.03 * expected)  # HLL: 0.81% std error
    if agg in ("p50", "p90", "p95", "p99"):
        return abs(actual - expected) <= 0.0101 * abs(expected) + 1e-9  # DDSketch: 1% relative
    return math.isclose(float(actual), float(expected), rel_tol=1e-9, abs_tol=1e-9)
