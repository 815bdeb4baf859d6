"""Read features: many features of many entities in one round trip.

Each value comes with its contract: which window it covers, when the newest event in it happened,
how old that is, and whether it can be trusted (``present``), is ``stale`` (no event for longer
than the feature's ``max_age``), ``partial`` (the window reaches back before eventpulse started
observing, so it is an under-count) or ``missing`` (no event for this entity within its TTL).

"Started observing" is ``observed_since`` in the meta hash: the earliest event time eventpulse
applied from a partition it joined mid-stream (its first record past offset 0). A partition read
from its first offset missed nothing, so a worker that has read every topic from the start
(a new deployment, the demo) has no partial values at all; a ``last`` value is never partial.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import redis
import redis.asyncio as aioredis

from eventpulse.durations import MAX_EPOCH_MS, MIN_EPOCH_MS, wall_ms
from eventpulse.redisconn import check_mode, check_mode_sync, connect, connect_async, is_cluster
from eventpulse.tables import clusterread, kinds, ring, ringread, sketch, wire
from eventpulse.tables.batch import PartitionPosition
from eventpulse.tables.keys import (
    entity_key,
    features_keys,
    fence_key,
    hll_key,
    meta_key,
    shard_of,
    sketch_key,
)
from eventpulse.tables.replies import read_reply
from eventpulse.tables.spec import PERCENTILES, FeatureSpec
from eventpulse.tables.wire import packed
from eventpulse.tables.writebounds import DEFAULT_SHARDS

Status = Literal["present", "stale", "partial", "missing"]
#: Aggregations whose value is whole as soon as the window holds one event eventpulse saw: the
#: newest event of a window is never among those before eventpulse started observing.
WHOLE_WHEN_SEEN = frozenset({"last"})
#: Called after every read with (entity, ids, at_ms, values), and ``applied=`` where the read
#: fetched applied positions (:class:`AppliedReads`): the served-read log hooks in here.
ReadHook = Callable[..., None]
#: per entity id, per ``topic:partition``: the offset the worker had applied to the entity's
#: fence shard when the read began and when it ended (equal unless a write came in between)
Applied = dict[str, dict[str, tuple[int, int]]]
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
    """What a read needs to know of one feature (``ringread.RingRead``), for reads at any time
    within one step: its window then is the same, so reads within a step share it."""

    __slots__ = ("agg", "buckets", "code", "end", "key", "kind", "missing", "name", "signature",
                 "spec", "stale_after", "start", "step", "unknown", "width")

    def __init__(self, spec: FeatureSpec, at_ms: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.key = spec.name.encode()
        self.agg = spec.aggregation
        self.kind = kind = ring.KINDS[spec.aggregation]
        self.signature = ring.signature(spec.window, kind)
        self.code = ringread.CODES.get(kind, -1)
        self.width = 8 * ring.STRIDES[kind]
        self.step = spec.window.step_ms
        self.end = end = spec.window.current_end(at_ms)
        self.start = start = end - spec.window.size
        #: sketches are kept per step: the buckets the window merges
        self.buckets = range(start, end, self.step)
        self.stale_after = spec.max_age if spec.max_age is not None else 2**62
        #: no usable entry: never seen, or not within its TTL (counts and sums read 0)
        self.missing = FeatureValue(_EMPTY.get(kind), start, end, None, None, "missing",
                                    _EMPTY_COUNT.get(kind))
        #: a window older than the entry keeps: nothing is known of it
        self.unknown = FeatureValue(None, start, end, None, None, "missing", None)


_NO_FENCES: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class AppliedReads:
    """Which entities a read also fetches the applied positions of (the served-read log's
    sample), and whose: the fence hashes of a consumer group (docs/redis-layout.md).

    A fence shard's fence and its entities' keys change together, in one write script, so
    the fence read with an entity says exactly which records its values hold. It is read
    before the entity's keys and again after them: a write in between shows as two
    positions (``Applied``). The consistency report recomputes a differing read with those
    positions (docs/archive.md)."""

    #: the worker's consumer group (``EVENTPULSE_CONSUMER_GROUP``)
    group: str
    wants: Callable[[str], bool]


class ReadPlan:
    """The commands of one read and how to turn their replies into values; I/O-free.

    Commands: the meta HGET, one MGET of every entity's feature map, then the sketch reads.
    This is the per-request path of every recommender (and of the training set's replay, which
    sends them with its writes on one connection: :meth:`AsyncFeatureClient.read_plan`).
    With ``fenced`` ids (:class:`AppliedReads`), their shards' fences are read before the MGET
    and again after the sketch reads; :attr:`applied` holds them once decoded.
    """

    def __init__(self, namespace: str, entity: str, ids: Sequence[str],
                 features: list[_Feature], at_ms: int, shards: int,
                 fenced: Sequence[str] = (), group: str = "") -> None:
        self.namespace = namespace
        self.shards = shards
        self.entity = entity
        self.ids = list(ids)
        self.features = features
        self.at_ms = at_ms
        #: per id of ``fenced``, its fence shard's key; the distinct keys, read in this order
        self.fences = {i: fence_key(namespace, group, shard_of(entity, i, shards), shards)
                       for i in fenced} if fenced else _NO_FENCES
        self.fence_keys = list(dict.fromkeys(self.fences.values())) if fenced else []
        #: the fences read, per id of ``fenced`` whose fence exists (None: none asked for)
        self.applied: Applied | None = None

    def commands(self) -> list[tuple[Any, ...]]:
        namespace, entity = self.namespace, self.entity
        fences = [("HGETALL", key) for key in self.fence_keys]
        cmds: list[tuple[Any, ...]] = [
            ("HGET", meta_key(namespace), "observed_since"), *fences,
            ("MGET", *features_keys(namespace, entity, self.ids, self.shards))]
        sketched = [f for f in self.features if ring.STRIDES[f.kind] == 0]
        prefixes = [entity_key(namespace, entity, i, self.shards)
                    for i in self.ids] if sketched else []
        # in the order decode reads them: feature by feature, entity by entity
        for f in sketched:
            for prefix in prefixes:
                # sketches are stored per step and merged here: PFCOUNT of several HyperLogLogs
                # is their union; DDSketch bins add up
                if f.kind == _HLL:
                    cmds.append(("PFCOUNT", *(hll_key(prefix, f.name, b) for b in f.buckets)))
                else:
                    cmds.extend(("HGETALL", sketch_key(prefix, f.name, b)) for b in f.buckets)
        cmds.extend(fences)
        return cmds

    def decode(self, replies: list[Any]) -> dict[str, dict[str, FeatureValue]]:
        """Turn the replies into values: per entity one msgpack map of binary entries, per
        feature one ring slot read straight out of its entry. Feature by feature, then entity
        by entity, so that the per-value loop (``ringread``, compiled) runs a whole column."""
        if isinstance(replies[0], Exception):
            raise replies[0]  # the namespace's meta hash is not a hash: no value can be trusted
        observed = None if replies[0] is None else int(replies[0])
        if self.fence_keys:
            fenced = len(self.fence_keys)
            self.applied = _applied(self.fences, dict(zip(
                self.fence_keys, map(_offsets, replies[1:1 + fenced]), strict=True)), dict(zip(
                self.fence_keys, map(_offsets, replies[-fenced:]), strict=True)))
            # the meta reply (read above) and the fences out: the MGET is at 1 again
            replies = replies[fenced:len(replies) - fenced]
        extras = iter(replies[2:])
        entries = ringread.EntityEntries(replies[1], [f.key for f in self.features])
        template = dict.fromkeys(f.name for f in self.features)  # rows sized once, not grown
        rows: list[dict[str, Any]] = [template.copy() for _ in self.ids]
        for k, f in enumerate(self.features):
            fresh: Status = ("partial" if observed is not None and f.start < observed
                             and f.agg not in WHOLE_WHEN_SEEN else "present")
            if f.code >= 0:
                ringread.read_column(FeatureValue, f, entries, k, rows, self.at_ms, fresh)
            else:
                _read_sketch(f, entries, k, rows, self.at_ms, fresh, extras)
        return dict(zip(self.ids, rows, strict=True))


def _applied(fences: dict[str, str], first: dict[str, dict[str, int]],
             last: dict[str, dict[str, int]]) -> Applied:
    """Per entity id, per partition, the offsets of its fence (``fences``: id -> key) when the
    read began (``first``: key -> its offsets) and ended (``last``). An id whose fence does
    not exist (yet), or is not a fence, is left out: its positions are not known."""
    out: Applied = {}
    for entity_id, key in fences.items():
        start, end = first[key], last[key]
        if start and end:
            out[entity_id] = {tp: (start.get(tp, -1), offset) for tp, offset in end.items()}
    return out


def _offsets(reply: Any) -> dict[str, int]:
    """A fence's ``topic:partition`` -> offset (:class:`PartitionPosition` values); {} for a
    reply that is not such a hash."""
    if isinstance(reply, list):
        reply = dict(zip(reply[::2], reply[1::2], strict=True))
    if not isinstance(reply, dict):
        return {}
    try:
        return {tp.decode() if isinstance(tp, bytes) else str(tp):
                PartitionPosition.decode(position).offset for tp, position in reply.items()}
    except (ValueError, AttributeError, UnicodeDecodeError):
        return {}


def _read_sketch(f: _Feature, entries: ringread.Entries, k: int, rows: list[dict[str, Any]],
                 at: int, fresh: Status, extras: Any) -> None:
    """Sketches: the entry gives the newest event; the value is merged from the sketch replies."""
    for i, values in enumerate(rows):
        times = ringread.entry_times(entries.entry(i, k), f.signature)
        if times is None:
            _skip_sketch(f, extras)
            values[f.name] = f.missing
            continue
        newest, _ = times
        try:
            value = _sketch_value(f, extras)
        except (ValueError, OverflowError, TypeError):
            # a bin that is not a number, or one whose value overflows a float (written before
            # numbers were bounded, or by something else): that value reads as missing, like a
            # corrupt entry, and the other entities and features of the read are unaffected
            values[f.name] = f.missing
            continue
        age = max(0, at - newest)
        values[f.name] = FeatureValue(value, f.start, f.end, newest, age,
                                      "stale" if age > f.stale_after else fresh)


#: the entry kind of the HyperLogLog sketch (distinct); the other sketch is percentile bins
_HLL = kinds.KINDS["distinct"].entry
#: What an empty window reads as: counts and sums are 0, everything else has no value.
_EMPTY: dict[str, Any] = {e: k.empty for e, k in kinds.BY_ENTRY.items() if k.empty is not None}
_EMPTY_COUNT: dict[str, int | None] = {e: k.empty_count for e, k in kinds.BY_ENTRY.items()
                                       if k.empty_count is not None}
def _sketch_value(f: _Feature, extras: Any) -> Any:
    if f.kind == _HLL:
        return int(_data(next(extras)))
    # every bucket's reply taken before any is judged: one that is an error (a key of another
    # type) must not leave the rest for the next entity to read as its own
    replies = [next(extras) for _ in f.buckets]
    found = ringread.quantile_bin([_data(reply) for reply in replies], PERCENTILES[f.agg])
    return None if found is None else sketch.bin_value(*found)


def _data(reply: Any) -> Any:
    """A sketch reply, or ValueError for a key's error reply (a bucket key of another type:
    the value reads as missing, :mod:`eventpulse.tables.replies`)."""
    if isinstance(reply, Exception):
        raise ValueError(str(reply))
    return reply


def _skip_sketch(f: _Feature, extras: Any) -> None:
    """Consume the sketch replies of a feature that has no usable entry."""
    for _ in range(1 if f.kind == _HLL else len(f.buckets)):
        next(extras)


#: the RESP version ``connect`` asks for unless told otherwise: in RESP2 a bucket hash of a
#: percentile feature comes back as a flat array, which hiredis builds in a fraction of the
#: time of the RESP3 map (a read of 100 entities x 5 buckets of ~230 bins: 11 ms against 18,
#: docs/performance.md); both are read alike
READ_PROTOCOL = 2


class _Reader:
    """What both clients share: the feature definitions and how a read is planned."""

    def __init__(self, specs: Sequence[FeatureSpec], namespace: str, shards: int) -> None:
        self.namespace = namespace
        #: the fence shard count the writers use (``shards`` in the meta hash): keys carry it
        self.shards = shards
        self.specs = {spec.name: spec for spec in specs}
        #: by name, the feature as the latest read saw it (valid for reads within its step)
        self._features: dict[str, _Feature] = {}
        self.on_read: ReadHook | None = None
        #: the entities a read also fetches applied positions of (the served-read log's)
        self.applied_reads: AppliedReads | None = None

    def _served(self, plan: ReadPlan, values: dict[str, dict[str, FeatureValue]],
                ) -> dict[str, dict[str, FeatureValue]]:
        if self.on_read is not None:
            if plan.applied is None:
                self.on_read(plan.entity, plan.ids, plan.at_ms, values)
            else:
                self.on_read(plan.entity, plan.ids, plan.at_ms, values, applied=plan.applied)
        return values

    @staticmethod
    def _specs(raw: dict[Any, Any]) -> list[FeatureSpec]:
        return [FeatureSpec.model_validate_json(v) for v in raw.values()]

    def read_plan(self, entity: str, ids: Sequence[str], names: Sequence[str] | None = None,
                  at_ms: int | None = None) -> ReadPlan:
        """What :meth:`get_many` sends and how it decodes the replies, without sending: for a
        caller that orders reads among other commands on one connection."""
        return self._plan(entity, ids, names, at_ms)

    def _plan(self, entity: str, ids: Sequence[str], names: Sequence[str] | None,
              at_ms: int | None) -> ReadPlan:
        at = wall_ms() if at_ms is None else _moment(at_ms)
        if isinstance(ids, str | bytes):
            raise TypeError(f"ids is a list of entity ids, not one {type(ids).__name__}: "
                            f"get_many({entity!r}, [{ids!r}]) or get({entity!r}, {ids!r})")
        for entity_id in ids:
            if not isinstance(entity_id, str):
                raise TypeError(f"entity ids are str, got {type(entity_id).__name__} "
                                f"{entity_id!r:.60}")
        if isinstance(names, str | bytes):
            raise TypeError(f"names is a list of feature names, not one "
                            f"{type(names).__name__}: [{names!r}]")
        chosen = names if names is not None else [
            s.name for s in self.specs.values() if s.entity == entity]
        if not chosen:
            entities = sorted({spec.entity for spec in self.specs.values()})
            raise UnknownFeature(
                f"unknown entity {entity!r}; known entities: {', '.join(entities)}" if entities
                else f"no features are known in namespace {self.namespace!r} (has a worker "
                     "started? is EVENTPULSE_REDIS_NAMESPACE the worker's?)")
        wanted = self.applied_reads
        fenced = [i for i in ids if wanted.wants(i)] if wanted is not None else ()
        return ReadPlan(self.namespace, entity, ids,
                        [self._feature(name, entity, at) for name in chosen], at, self.shards,
                        fenced, wanted.group if wanted is not None else "")

    def _feature(self, name: str, entity: str, at: int) -> _Feature:
        spec = self.specs.get(name)
        f = self._features.get(name)
        if f is None or f.spec is not spec or not f.end <= at < f.end + f.step:
            if spec is None:
                raise UnknownFeature(f"no feature named {name!r}; known: {sorted(self.specs)}")
            f = self._features[name] = _Feature(spec, at)
        if f.spec.entity != entity:
            raise UnknownFeature(
                f"feature {name!r} is keyed by {f.spec.entity!r}, not {entity!r}")
        return f


def _moment(at_ms: Any) -> int:
    """``at_ms`` as epoch milliseconds (an int, or a numpy integer), refused beyond what any
    stored time can be compared with."""
    try:
        at = operator.index(at_ms)
    except TypeError:
        raise TypeError(f"at_ms is epoch milliseconds (an int), got {type(at_ms).__name__} "
                        f"{at_ms!r:.40}") from None
    if at_ms.__class__ is bool or not MIN_EPOCH_MS <= at <= MAX_EPOCH_MS:
        raise ValueError(f"at_ms is epoch milliseconds from {MIN_EPOCH_MS} (1970) to "
                         f"{MAX_EPOCH_MS} (year 9999), the range records are taken in, "
                         f"got {at_ms!r:.40}")
    return at


class AsyncFeatureClient(_Reader):
    """Async reader; build with :meth:`connect` to load feature definitions from Redis."""

    def __init__(self, client: aioredis.Redis, specs: Sequence[FeatureSpec], namespace: str = "ep",
                 shards: int = DEFAULT_SHARDS):
        super().__init__(specs, namespace, shards)
        self.client = client

    @classmethod
    async def connect(cls, url: str, namespace: str = "ep", **options: Any) -> AsyncFeatureClient:
        """``url``: ``redis://`` for one Redis, ``redis+cluster://`` for a Redis Cluster;
        ``options`` go to redis-py (``username``, ``password``, ``ssl_ca_certs``,
        ``ssl_certfile``, ``ssl_keyfile``...); a read-only ACL user suffices (docs/security.md)."""
        client = connect_async(url, **{"protocol": READ_PROTOCOL, **options})
        await check_mode(client)
        raw: dict[Any, Any] = await client.hgetall(registry_key(namespace))
        shards = await client.hget(meta_key(namespace), "shards")
        return cls(client, cls._specs(raw), namespace, int(shards or DEFAULT_SHARDS))

    async def get(self, entity: str, entity_id: str, names: Sequence[str] | None = None,
                  at_ms: int | None = None) -> dict[str, FeatureValue]:
        return (await self.get_many(entity, [entity_id], names, at_ms))[entity_id]

    async def get_many(self, entity: str, ids: Sequence[str], names: Sequence[str] | None = None,
                       at_ms: int | None = None) -> dict[str, dict[str, FeatureValue]]:
        return await self.fetch(self._plan(entity, ids, names, at_ms))

    async def fetch(self, plan: ReadPlan) -> dict[str, dict[str, FeatureValue]]:
        """The values of a :meth:`read_plan`, read now (what :meth:`get_many` does)."""
        commands = plan.commands()
        if is_cluster(self.client):  # one round trip per node, all nodes at once
            replies = await clusterread.read_async(self.client, commands, packed)
        else:  # one write, then the replies: a pipeline without redis-py's per-command overhead
            replies = await wire.round_trip(self.client, commands)
        return self._served(plan, plan.decode(replies))

    async def aclose(self) -> None:
        await self.client.aclose()


class FeatureClient(_Reader):
    """Blocking reader for code without an event loop (most model servers)."""

    def __init__(self, client: redis.Redis, specs: Sequence[FeatureSpec], namespace: str = "ep",
                 shards: int = DEFAULT_SHARDS):
        super().__init__(specs, namespace, shards)
        self.client = client

    @classmethod
    def connect(cls, url: str, namespace: str = "ep", **options: Any) -> FeatureClient:
        """``url``: ``redis://`` for one Redis, ``redis+cluster://`` for a Redis Cluster;
        ``options`` go to redis-py (``username``, ``password``, ``ssl_ca_certs``,
        ``ssl_certfile``, ``ssl_keyfile``...); a read-only ACL user suffices (docs/security.md)."""
        client = connect(url, **{"protocol": READ_PROTOCOL, **options})
        check_mode_sync(client)
        raw: dict[Any, Any] = client.hgetall(registry_key(namespace))
        shards: Any = client.hget(meta_key(namespace), "shards")
        return cls(client, cls._specs(raw), namespace, int(shards or DEFAULT_SHARDS))

    def get(self, entity: str, entity_id: str, names: Sequence[str] | None = None,
            at_ms: int | None = None) -> dict[str, FeatureValue]:
        return self.get_many(entity, [entity_id], names, at_ms)[entity_id]

    def get_many(self, entity: str, ids: Sequence[str], names: Sequence[str] | None = None,
                 at_ms: int | None = None) -> dict[str, dict[str, FeatureValue]]:
        plan = self._plan(entity, ids, names, at_ms)
        commands = plan.commands()
        if is_cluster(self.client):  # one round trip per node, all nodes at once
            return self._served(
                plan, plan.decode(clusterread.read_sync(self.client, commands, packed)))
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(packed(commands))  # type: ignore[no-untyped-call]
            replies = [read_reply(conn) for _ in commands]
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            pool.release(conn)
        return self._served(plan, plan.decode(replies))

    def close(self) -> None:
        self.client.close()
