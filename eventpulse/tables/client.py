"""Read features: many features of many entities in one pipelined round trip.

Each value comes with its contract: which window it covers, when the newest event in it happened,
how old that is, and whether it can be trusted (``present``), is ``stale`` (no event for longer
than the feature's ``max_age``), ``partial`` (the window reaches back before eventpulse started
observing, so it is an under-count) or ``missing`` (no event for this entity within its TTL).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis
import redis.asyncio as aioredis

from eventpulse.tables import sketch
from eventpulse.tables.keys import entity_key, hll_key, meta_key, sketch_key, window_field
from eventpulse.tables.spec import PERCENTILES, FeatureSpec

Status = Literal["present", "stale", "partial", "missing"]
REGISTRY_SUFFIX = ":features"


@dataclass(frozen=True, slots=True)
class FeatureValue:
    value: float | int | str | bool | None
    window_start_ms: int
    window_end_ms: int
    newest_event_ms: int | None
    age_ms: int | None
    status: Status
    #: Events in the window, where the aggregation keeps it (count, mean, ratio's denominator).
    count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnknownFeature(KeyError):
    pass


def registry_key(namespace: str) -> str:
    return namespace + REGISTRY_SUFFIX


class _ReadPlan:
    """The commands of one read and how to turn their replies into values; I/O-free."""

    def __init__(self, specs: dict[str, FeatureSpec], namespace: str, entity: str,
                 ids: Sequence[str], names: Sequence[str], at_ms: int) -> None:
        self.namespace = namespace
        self.entity = entity
        self.ids = list(ids)
        self.at_ms = at_ms
        self.features: list[FeatureSpec] = []
        if not names:
            raise UnknownFeature(f"no features of entity {entity!r} are known "
                                 f"(known: {sorted(specs) or 'none; has a worker started?'})")
        for name in names:
            spec = specs.get(name)
            if spec is None:
                raise UnknownFeature(f"no feature named {name!r}; known: {sorted(specs)}")
            if spec.entity != entity:
                raise UnknownFeature(f"feature {name!r} is keyed by {spec.entity!r}, not {entity!r}")
            self.features.append(spec)
        self.fields: list[str] = []
        self.ends: list[int] = []
        for spec in self.features:
            end = spec.window.current_end(at_ms)
            self.ends.append(end)
            self.fields.append(f"{spec.name}|t")
            self.fields.extend(window_field(spec.name, end, s) for s in _value_suffixes(spec))

    def commands(self) -> list[tuple[str, ...]]:
        cmds: list[tuple[str, ...]] = [("HGET", meta_key(self.namespace), "observed_since")]
        for entity_id in self.ids:
            key = entity_key(self.namespace, self.entity, entity_id)
            cmds.append(("HMGET", key, *self.fields))
            for spec, end in zip(self.features, self.ends, strict=True):
                # sketches are stored per step and merged here: PFCOUNT of several HyperLogLogs
                # is their union; DDSketch bins add up
                steps = range(end - spec.window.size, end, spec.window.step_ms)
                if spec.aggregation == "distinct":
                    cmds.append(("PFCOUNT", *(hll_key(key, spec.name, b) for b in steps)))
                elif spec.aggregation in PERCENTILES:
                    cmds.extend(("HGETALL", sketch_key(key, spec.name, b)) for b in steps)
        return cmds

    def decode(self, replies: list[Any]) -> dict[str, dict[str, FeatureValue]]:
        observed = _int(replies[0])
        out: dict[str, dict[str, FeatureValue]] = {}
        pos = 1
        for entity_id in self.ids:
            fields = iter(replies[pos])
            pos += 1
            values: dict[str, FeatureValue] = {}
            for spec, end in zip(self.features, self.ends, strict=True):
                newest = _int(next(fields))
                raw = [next(fields) for _ in _value_suffixes(spec)]
                extra: Any = None
                if spec.aggregation == "distinct":
                    extra = replies[pos]
                    pos += 1
                elif spec.aggregation in PERCENTILES:
                    count = spec.window.windows_per_event
                    extra = _merge_bins(replies[pos:pos + count])
                    pos += count
                values[spec.name] = self._value(spec, end, newest, raw, extra, observed)
            out[entity_id] = values
        return out

    def _value(self, spec: FeatureSpec, end: int, newest: int | None, raw: list[Any],
               extra: Any, observed: int | None) -> FeatureValue:
        start = end - spec.window.size
        age = None if newest is None else max(0, self.at_ms - newest)
        status: Status
        if newest is None:
            status = "missing"
        elif spec.max_age is not None and age is not None and age > spec.max_age:
            status = "stale"
        elif observed is None or start < observed:
            status = "partial"
        else:
            status = "present"
        return FeatureValue(_aggregate(spec, raw, extra), start, end, newest, age, status,
                            _count(spec, raw))


def _value_suffixes(spec: FeatureSpec) -> tuple[str, ...]:
    if spec.aggregation in ("mean",):
        return ("|s", "|n")
    if spec.aggregation == "ratio":
        return ("|n", "|d")
    if spec.aggregation in ("distinct", "p50", "p90", "p95", "p99"):
        return ()
    return ("",)


def _int(raw: Any) -> int | None:
    return None if raw is None else int(float(raw))


def _count(spec: FeatureSpec, raw: list[Any]) -> int | None:
    if spec.aggregation == "count":
        return int(raw[0] or 0)
    if spec.aggregation in ("mean", "ratio"):
        return int(raw[1] or 0)
    return None


def _aggregate(spec: FeatureSpec, raw: list[Any], extra: Any) -> Any:
    agg = spec.aggregation
    if agg == "count":
        return int(raw[0]) if raw[0] is not None else 0
    if agg == "sum":
        return float(raw[0]) if raw[0] is not None else 0.0
    if agg in ("min", "max"):
        return None if raw[0] is None else float(raw[0])
    if agg == "last":
        return None if raw[0] is None else json.loads(raw[0])
    if agg == "mean":
        total, count = raw
        return None if not count else float(total) / int(count)
    if agg == "ratio":
        numerator, denominator = raw
        return None if not denominator else int(numerator or 0) / int(denominator)
    if agg == "distinct":
        return int(extra or 0)
    return sketch.quantile(extra, PERCENTILES[agg])


def _merge_bins(replies: list[dict[Any, Any]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for bins in replies:
        for k, v in bins.items():
            name = k.decode() if isinstance(k, bytes) else k
            merged[name] = merged.get(name, 0) + int(v)
    return merged


def _now_ms() -> int:
    return int(time.time() * 1000)


class AsyncFeatureClient:
    """Async reader; build with :meth:`connect` to load feature definitions from Redis."""

    def __init__(self, client: aioredis.Redis, specs: Sequence[FeatureSpec], namespace: str = "ep"):
        self.client = client
        self.namespace = namespace
        self.specs = {spec.name: spec for spec in specs}

    @classmethod
    async def connect(cls, url: str, namespace: str = "ep") -> AsyncFeatureClient:
        client = aioredis.Redis.from_url(url)
        raw: dict[Any, Any] = await client.hgetall(registry_key(namespace))
        specs = [FeatureSpec.model_validate_json(v) for v in raw.values()]
        return cls(client, specs, namespace)

    async def get(self, entity: str, entity_id: str, names: Sequence[str] | None = None,
                  at_ms: int | None = None) -> dict[str, FeatureValue]:
        return (await self.get_many(entity, [entity_id], names, at_ms))[entity_id]

    async def get_many(self, entity: str, ids: Sequence[str], names: Sequence[str] | None = None,
                       at_ms: int | None = None) -> dict[str, dict[str, FeatureValue]]:
        plan = self._plan(entity, ids, names, at_ms)
        async with self.client.pipeline(transaction=False) as pipe:
            for cmd in plan.commands():
                pipe.execute_command(*cmd)
            replies = await pipe.execute()
        return plan.decode(replies)

    def _plan(self, entity: str, ids: Sequence[str], names: Sequence[str] | None,
              at_ms: int | None) -> _ReadPlan:
        chosen = names if names is not None else [s.name for s in self.specs.values() if s.entity == entity]
        return _ReadPlan(self.specs, self.namespace, entity, ids, chosen,
                         _now_ms() if at_ms is None else at_ms)

    async def aclose(self) -> None:
        await self.client.aclose()


class FeatureClient:
    """Blocking reader for code without an event loop (most model servers)."""

    def __init__(self, client: redis.Redis, specs: Sequence[FeatureSpec], namespace: str = "ep"):
        self.client = client
        self.namespace = namespace
        self.specs = {spec.name: spec for spec in specs}

    @classmethod
    def connect(cls, url: str, namespace: str = "ep") -> FeatureClient:
        client = redis.Redis.from_url(url)
        raw: dict[Any, Any] = client.hgetall(registry_key(namespace))
        specs = [FeatureSpec.model_validate_json(v) for v in raw.values()]
        return cls(client, specs, namespace)

    def get(self, entity: str, entity_id: str, names: Sequence[str] | None = None,
            at_ms: int | None = None) -> dict[str, FeatureValue]:
        return self.get_many(entity, [entity_id], names, at_ms)[entity_id]

    def get_many(self, entity: str, ids: Sequence[str], names: Sequence[str] | None = None,
                 at_ms: int | None = None) -> dict[str, dict[str, FeatureValue]]:
        chosen = names if names is not None else [s.name for s in self.specs.values() if s.entity == entity]
        plan = _ReadPlan(self.specs, self.namespace, entity, ids, chosen,
                         _now_ms() if at_ms is None else at_ms)
        with self.client.pipeline(transaction=False) as pipe:
            for cmd in plan.commands():
                pipe.execute_command(*cmd)  # type: ignore[no-untyped-call]
            replies = pipe.execute()
        return plan.decode(replies)

    def close(self) -> None:
        self.client.close()
