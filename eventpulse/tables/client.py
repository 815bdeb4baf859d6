"""Read features: many features of many entities in one round trip.

Each value comes with its contract: which window it covers, when the newest event in it happened,
how old that is, and whether it can be trusted (``present``), is ``stale`` (no event for longer
than the feature's ``max_age``), ``partial`` (the window reaches back before eventpulse started
observing, so it is an under-count) or ``missing`` (no event for this entity within its TTL).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import msgpack
import redis
import redis.asyncio as aioredis
from redis.connection import Connection

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    hiredis = None  # type: ignore[assignment]

from eventpulse.tables import ring, sketch
from eventpulse.tables.keys import entity_key, features_key, hll_key, meta_key, sketch_key
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
    #: Events in the window, where the aggregation keeps it (count, mean, min, max, ratio's
    #: denominator).
    event_count: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return self._asdict()


class UnknownFeature(KeyError):
    pass


def registry_key(namespace: str) -> str:
    return namespace + REGISTRY_SUFFIX


class _Feature:
    """What one read needs to know of one feature, computed once per read."""

    __slots__ = ("agg", "buckets", "end", "kind", "max_age", "name", "spec", "start", "step")

    def __init__(self, spec: FeatureSpec, at_ms: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.agg = spec.aggregation
        self.kind = ring.KINDS[spec.aggregation]
        self.step = spec.window.step_ms
        self.end = spec.window.current_end(at_ms)
        self.start = self.end - spec.window.size
        #: sketches are kept per step: the buckets the window merges
        self.buckets = range(self.start, self.end, self.step)
        self.max_age = spec.max_age


class _ReadPlan:
    """The commands of one read and how to turn their replies into values; I/O-free.

    Commands: the meta HGET, one MGET of every entity's feature map, then the sketch reads.
    Decoding is a flat loop; this is the per-request path of every recommender.
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

    def commands(self) -> list[tuple[Any, ...]]:
        namespace, entity = self.namespace, self.entity
        cmds: list[tuple[Any, ...]] = [
            ("HGET", meta_key(namespace), "observed_since"),
            ("MGET", *(features_key(namespace, entity, i) for i in self.ids))]
        sketched = [f for f in self.features if f.kind in ("H", "Q")]
        prefixes = [entity_key(namespace, entity, i) for i in self.ids] if sketched else []
        # in the order decode reads them: feature by feature, entity by entity
        for f in sketched:
            for prefix in prefixes:
                # sketches are stored per step and merged here: PFCOUNT of several HyperLogLogs
                # is their union; DDSketch bins add up
                if f.kind == "H":
                    cmds.append(("PFCOUNT", *(hll_key(prefix, f.name, b) for b in f.buckets)))
                else:
                    cmds.extend(("HGETALL", sketch_key(prefix, f.name, b)) for b in f.buckets)
        return cmds

    def decode(self, replies: list[Any]) -> dict[str, dict[str, FeatureValue]]:
        """Turn the replies into values: per entity one msgpack map of binary entries, per
        feature one ring slot read straight out of its entry. Feature by feature, then entity
        by entity, flat and inline on purpose: it runs for every value of every request."""
        observed = None if replies[0] is None else int(replies[0])
        extras = iter(replies[2:])
        unpack = msgpack.unpackb
        maps = [unpack(raw, raw=True) if raw is not None else _NONE for raw in replies[1]]
        rows: list[dict[str, FeatureValue]] = [{} for _ in maps]
        for f in self.features:
            _read_feature(f, maps, rows, self.at_ms, observed, extras)
        return dict(zip(self.ids, rows, strict=True))


def _read_feature(f: _Feature, maps: list[dict[bytes, bytes]], rows: list[dict[str, FeatureValue]],
                  at: int, observed: int | None, extras: Any) -> None:
    """One feature of every entity of a read."""
    make = tuple.__new__  # FeatureValue(...) without NamedTuple's Python-level __new__
    when = ring.WHEN.unpack_from
    slot1, slot2 = ring.SLOT1.unpack_from, ring.SLOT2.unpack_from
    name, key, kind, step, start, end = f.name, f.name.encode(), f.kind, f.step, f.start, f.end
    signature = ring.signature(f.spec.window, kind)
    code, width = _READ_CODES[kind], 8 * ring.STRIDES[kind]
    # ring position of the window: _RING_AT + width * (head - end) // step
    base = _RING_AT - width * (end // step)
    missing = make(FeatureValue, (_EMPTY.get(kind), start, end, None, None, "missing",
                                  _EMPTY_COUNT.get(kind)))
    unknown = make(FeatureValue, (None, start, end, None, None, "missing", None))
    fresh: Status = "partial" if observed is None or start < observed else "present"
    stale_after = f.max_age if f.max_age is not None else 2**62
    for entries, values in zip(maps, rows, strict=True):
        entry = entries.get(key)
        # no entry: never seen, or not within its TTL (counts are 0); another signature: written
        # for another window or aggregation
        if entry is None or not entry.startswith(signature):
            if code == 5:
                _skip_sketch(f, extras)
            values[name] = missing
            continue
        newest, head = when(entry, _WHEN_AT)
        count: int | None = None
        if code <= 3:  # a number or two per ring slot
            pos = base + width * (head // step)
            if pos + width > len(entry):  # older than the ring keeps: unknown
                values[name] = unknown
                continue
            if pos < _RING_AT:  # newer than every event: empty
                value: Any = missing.value
                count = missing.event_count
            elif code == 0:  # count
                value = count = int(slot1(entry, pos)[0])
            elif code == 1:  # sum
                value = slot1(entry, pos)[0]
            elif code == 2:  # mean, ratio: sum or numerator, events
                first, events = slot2(entry, pos)
                count = int(events)
                value = first / events if events else None
            else:  # min, max: events, extreme
                events, extreme = slot2(entry, pos)
                count = int(events)
                value = extreme if events else None
        elif code == 4:  # last: a msgpack ring of (event time, value)
            value = _last(entry, (head - end) // step)
            if value is _UNKNOWN:
                values[name] = unknown
                continue
        else:
            value = _sketch_value(f, extras)
        age = at - newest
        if age < 0:
            age = 0
        values[name] = make(FeatureValue, (value, start, end, newest, age,
                                           "stale" if age > stale_after else fresh, count))


_NONE: dict[bytes, bytes] = {}
_WHEN_AT = ring.WHEN_AT
_RING_AT = ring.HEADER.size
_READ_CODES = {"I": 0, "F": 1, "M": 2, "R": 2, "<": 3, ">": 3, "L": 4, "H": 5, "Q": 5}
#: What an empty window reads as: counts and sums are 0, everything else has no value.
_EMPTY: dict[str, Any] = {"I": 0, "F": 0.0, "H": 0}
_EMPTY_COUNT: dict[str, int | None] = {"I": 0, "M": 0, "R": 0, "<": 0, ">": 0}
_UNKNOWN = object()


def _last(entry: bytes, slot: int) -> Any:
    pairs = msgpack.unpackb(entry[_RING_AT:])
    j = 2 * slot
    if j >= len(pairs):
        return _UNKNOWN
    return pairs[j + 1] if j >= 0 and pairs[j] else None


def _sketch_value(f: _Feature, extras: Any) -> Any:
    if f.kind == "H":
        return int(next(extras))
    bins = _merge_bins([next(extras) for _ in f.buckets])
    return sketch.quantile(bins, PERCENTILES[f.agg])


def _skip_sketch(f: _Feature, extras: Any) -> None:
    """Consume the sketch replies of a feature that has no usable entry."""
    for _ in range(1 if f.kind == "H" else len(f.buckets)):
        next(extras)


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
