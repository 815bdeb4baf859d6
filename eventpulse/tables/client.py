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
from typing import Any, Literal, NamedTuple

import redis
import redis.asyncio as aioredis
from redis.connection import Connection

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    hiredis = None  # type: ignore[assignment]

from eventpulse.tables import sketch
from eventpulse.tables.keys import entity_key, hll_key, meta_key, sketch_key, window_field
from eventpulse.tables.spec import PERCENTILES, FeatureSpec

Status = Literal["present", "stale", "partial", "missing"]
REGISTRY_SUFFIX = ":features"


class FeatureValue(NamedTuple):
    """A feature value with its contract. A NamedTuple: a read builds a thousand of these."""

    value: float | int | str | bool | None
    window_start_ms: int
    window_end_ms: int
    newest_event_ms: int | None
    age_ms: int | None
    status: Status
    #: Events in the window, where the aggregation keeps it (count, mean, ratio's denominator).
    event_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


class UnknownFeature(KeyError):
    pass


def registry_key(namespace: str) -> str:
    return namespace + REGISTRY_SUFFIX


# how a feature's window fields are laid out: suffixes read per aggregation
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "mean": ("|s", "|n"), "ratio": ("|n", "|d"), "distinct": (), "p50": (), "p90": (), "p95": (),
    "p99": (),
}


class _Feature:
    """What one read needs to know of one feature, computed once per read."""

    __slots__ = ("agg", "end", "max_age", "name", "spec", "start", "suffixes")

    def __init__(self, spec: FeatureSpec, at_ms: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.agg = spec.aggregation
        self.end = spec.window.current_end(at_ms)
        self.start = self.end - spec.window.size
        self.max_age = spec.max_age
        self.suffixes = _SUFFIXES.get(spec.aggregation, ("",))


class _ReadPlan:
    """The commands of one read and how to turn their replies into values; I/O-free.

    Commands: the meta HGET, one HMGET per entity (newest-event field, then the window fields of
    every feature), then the sketch reads. Decoding is a flat loop; this is the per-request path
    of every recommender.
    """

    def __init__(self, specs: dict[str, FeatureSpec], namespace: str, entity: str,
                 ids: Sequence[str], names: Sequence[str], at_ms: int) -> None:
        self.namespace = namespace
        self.entity = entity
        self.ids = list(ids)
        self.at_ms = at_ms
        if not names:
            raise UnknownFeature(f"no features of entity {entity!r} are known "
                                 f"(known: {sorted(specs) or 'none; has a worker started?'})")
        self.features: list[_Feature] = []
        for name in names:
            spec = specs.get(name)
            if spec is None:
                raise UnknownFeature(f"no feature named {name!r}; known: {sorted(specs)}")
            if spec.entity != entity:
                raise UnknownFeature(
                    f"feature {name!r} is keyed by {spec.entity!r}, not {entity!r}")
            self.features.append(_Feature(spec, at_ms))
        self.fields: list[str] = []
        for f in self.features:
            self.fields.append(f"{f.name}|t")
            self.fields.extend(window_field(f.name, f.end, sfx) for sfx in f.suffixes)

    def commands(self) -> list[tuple[Any, ...]]:
        cmds: list[tuple[Any, ...]] = [("HGET", meta_key(self.namespace), "observed_since")]
        keys = [entity_key(self.namespace, self.entity, i) for i in self.ids]
        fields = self.fields
        cmds.extend(("HMGET", key, *fields) for key in keys)
        for key in keys:
            for f in self.features:
                # sketches are stored per step and merged here: PFCOUNT of several HyperLogLogs
                # is their union; DDSketch bins add up
                if f.agg == "distinct":
                    steps = range(f.start, f.end, f.spec.window.step_ms)
                    cmds.append(("PFCOUNT", *(hll_key(key, f.name, b) for b in steps)))
                elif f.agg in PERCENTILES:
                    steps = range(f.start, f.end, f.spec.window.step_ms)
                    cmds.extend(("HGETALL", sketch_key(key, f.name, b)) for b in steps)
        return cmds

    def decode(self, replies: list[Any]) -> dict[str, dict[str, FeatureValue]]:
        observed = None if replies[0] is None else int(replies[0])
        n = len(self.ids)
        extras = iter(replies[1 + n:])
        at = self.at_ms
        make = tuple.__new__  # FeatureValue(...) without NamedTuple's Python-level __new__
        # per feature, computed once: (name, agg code, start, end, max_age, partial-before)
        layout = [(f.name, _CODES[f.agg], f.start, f.end, f.max_age, f) for f in self.features]
        out: dict[str, dict[str, FeatureValue]] = {}
        for entity_id, row in zip(self.ids, replies[1:1 + n], strict=True):
            values: dict[str, FeatureValue] = {}
            pos = 0
            for name, code, start, end, max_age, f in layout:
                raw_newest = row[pos]
                count: int | None = None
                if code == 0:  # count
                    raw = row[pos + 1]
                    pos += 2
                    count = 0 if raw is None else int(raw)
                    value: Any = count
                elif code == 1:  # sum
                    raw = row[pos + 1]
                    pos += 2
                    value = 0.0 if raw is None else float(raw)
                elif code == 2:  # min, max
                    raw = row[pos + 1]
                    pos += 2
                    value = None if raw is None else float(raw)
                elif code == 3:  # last
                    raw = row[pos + 1]
                    pos += 2
                    value = None if raw is None else json.loads(raw)
                elif code == 4 or code == 5:  # mean, ratio: (sum or numerator, count)
                    first, second = row[pos + 1], row[pos + 2]
                    pos += 3
                    count = 0 if second is None else int(second)
                    if not count:
                        value = None
                    elif code == 4:
                        value = float(first) / count
                    else:
                        value = (0 if first is None else int(first)) / count
                elif code == 6:  # distinct
                    pos += 1
                    value = int(next(extras))
                else:  # percentile
                    pos += 1
                    bins = _merge_bins([next(extras) for _ in range(f.spec.window.windows_per_event)])
                    value = sketch.quantile(bins, PERCENTILES[f.agg])
                if raw_newest is None:
                    values[name] = make(FeatureValue, (value, start, end, None, None, "missing",
                                                       count))
                    continue
                newest = int(raw_newest)
                age = at - newest if at > newest else 0
                if max_age is not None and age > max_age:
                    status = "stale"
                elif observed is None or start < observed:
                    status = "partial"
                else:
                    status = "present"
                values[name] = make(FeatureValue, (value, start, end, newest, age, status, count))
            out[entity_id] = values
        return out


_CODES = {"count": 0, "sum": 1, "min": 2, "max": 2, "last": 3, "mean": 4, "ratio": 5,
          "distinct": 6, "p50": 7, "p90": 7, "p95": 7, "p99": 7}


def _merge_bins(replies: list[dict[Any, Any]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for bins in replies:
        for k, v in bins.items():
            name = k.decode() if isinstance(k, bytes) else k
            merged[name] = merged.get(name, 0) + int(v)
    return merged


def _packed(commands: list[tuple[Any, ...]]) -> list[bytes]:
    """RESP for all commands at once; hiredis packs in C what redis-py packs arg by arg."""
    if hiredis is not None:
        return [hiredis.pack_command(cmd) for cmd in commands]
    return [Connection().pack_command(*cmd)[0] for cmd in commands]  # pragma: no cover


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Reader:
    """What both clients share: the feature definitions and how a read is planned."""

    def __init__(self, specs: Sequence[FeatureSpec], namespace: str) -> None:
        self.namespace = namespace
        self.specs = {spec.name: spec for spec in specs}

    @staticmethod
    def _specs(raw: dict[Any, Any]) -> list[FeatureSpec]:
        return [FeatureSpec.model_validate_json(v) for v in raw.values()]

    def _plan(self, entity: str, ids: Sequence[str], names: Sequence[str] | None,
              at_ms: int | None) -> _ReadPlan:
        chosen = names if names is not None else [
            s.name for s in self.specs.values() if s.entity == entity]
        return _ReadPlan(self.specs, self.namespace, entity, ids, chosen,
                         _now_ms() if at_ms is None else at_ms)


class AsyncFeatureClient(_Reader):
    """Async reader; build with :meth:`connect` to load feature definitions from Redis."""

    def __init__(self, client: aioredis.Redis, specs: Sequence[FeatureSpec], namespace: str = "ep"):
        super().__init__(specs, namespace)
        self.client = client

    @classmethod
    async def connect(cls, url: str, namespace: str = "ep") -> AsyncFeatureClient:
        client = aioredis.Redis.from_url(url)
        return cls(client, cls._specs(await client.hgetall(registry_key(namespace))), namespace)

    async def get(self, entity: str, entity_id: str, names: Sequence[str] | None = None,
                  at_ms: int | None = None) -> dict[str, FeatureValue]:
        return (await self.get_many(entity, [entity_id], names, at_ms))[entity_id]

    async def get_many(self, entity: str, ids: Sequence[str], names: Sequence[str] | None = None,
                       at_ms: int | None = None) -> dict[str, dict[str, FeatureValue]]:
        plan = self._plan(entity, ids, names, at_ms)
        commands = plan.commands()
        pool = self.client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            # one write, then the replies: a pipeline without redis-py's per-command overhead
            await conn.send_packed_command(_packed(commands))
            replies = [await conn.read_response() for _ in commands]
        except BaseException:
            await conn.disconnect()  # never hand back a connection with unread replies
            raise
        finally:
            await pool.release(conn)
        return plan.decode(replies)

    async def aclose(self) -> None:
        await self.client.aclose()


class FeatureClient(_Reader):
    """Blocking reader for code without an event loop (most model servers)."""

    def __init__(self, client: redis.Redis, specs: Sequence[FeatureSpec], namespace: str = "ep"):
        super().__init__(specs, namespace)
        self.client = client

    @classmethod
    def connect(cls, url: str, namespace: str = "ep") -> FeatureClient:
        client = redis.Redis.from_url(url)
        raw: dict[Any, Any] = client.hgetall(registry_key(namespace))
        return cls(client, cls._specs(raw), namespace)

    def get(self, entity: str, entity_id: str, names: Sequence[str] | None = None,
            at_ms: int | None = None) -> dict[str, FeatureValue]:
        return self.get_many(entity, [entity_id], names, at_ms)[entity_id]

    def get_many(self, entity: str, ids: Sequence[str], names: Sequence[str] | None = None,
                 at_ms: int | None = None) -> dict[str, dict[str, FeatureValue]]:
        plan = self._plan(entity, ids, names, at_ms)
        commands = plan.commands()
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(_packed(commands))  # type: ignore[no-untyped-call]
            replies = [conn.read_response() for _ in commands]
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            pool.release(conn)
        return plan.decode(replies)

    def close(self) -> None:
        self.client.close()
