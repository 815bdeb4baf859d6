"""Combine a batch of records into per-(feature, entity, bucket) partials, then into fenced slices.

Why combine first: a batch of 50k events touches far fewer (entity, bucket) pairs than it has
events, and each entity costs Redis one read and one write inside its shard's Lua call. The
combiner also carries each partition's applied offset and watermark, so that a replayed record
(offset already applied) is skipped and a too-late record is refused the same way on every run.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from zlib import crc32

import msgpack

from eventpulse.tables import fold as _fold
from eventpulse.tables import kinds, ring
from eventpulse.tables.keys import shard_features_key, shard_of  # noqa: F401 (re-exported)
from eventpulse.tables.spec import CompiledFeature, View
from eventpulse.tables.writebounds import DEFAULT_SHARDS

if TYPE_CHECKING:
    from eventpulse.tables.fold import HotFeature

#: how much newer than its build fold.py must be to count as edited since (seconds)
_STALE_AFTER_S = 2.0


def _current_fold() -> ModuleType:
    """The compiled fold, unless its source was edited after it was built (then the source,
    and a warning: a stale build must never run in place of the code that is read)."""
    built = Path(_fold.__file__ or "")
    if built.suffix == ".py":
        return _fold
    source = built.parent / "fold.py"
    # an install writes the files within moments; an edit comes well after the build (fold.pxd
    # types what fold.py holds: an edit of either makes the build stale)
    edited = max((f.stat().st_mtime for f in (source, built.parent / "fold.pxd") if f.exists()),
                 default=0.0)
    if edited > built.stat().st_mtime + _STALE_AFTER_S:
        logging.getLogger(__name__).warning(
            "%s is older than fold.py or fold.pxd: running the source (rebuild: "
            "./scripts/bootstrap.sh)",
            built.name)
        spec = importlib.util.spec_from_file_location("eventpulse.tables.fold", source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return _fold


fold = _current_fold()
#: True when the per-record fold runs compiled (Cython, built at install)
COMPILED_FOLD = Path(fold.__file__ or "").suffix != ".py"

NO_WATERMARK = -(2**62)
#: cost units of one slice when no budget is given (tests, replay): unbounded
UNBOUNDED = float("inf")
#: an offset no record reaches
_NEVER = 2**63
#: cost of one (feature, entity) op, the unit; an extra bucket and a sketch item cost less
COST_BUCKET: float = fold.COST_BUCKET
COST_SKETCH_ITEM: float = fold.COST_SKETCH_ITEM
COST_SKETCH_BIN: float = fold.COST_SKETCH_BIN
#: ring numbers (slots x stride) that cost apply.lua about as much as one op's fixed part
RING_VALUES_PER_UNIT = 32.0


def op_costs(feature: CompiledFeature) -> tuple[float, float]:
    """Cost units of a feature's first op on an entity in a slice, and of each further bucket.

    apply.lua unpacks, shifts and packs the entity's whole ring for an op (slots x stride
    numbers) and folds a bucket into every window it belongs to (size / step of them). With a
    flat unit per op, a feature of 6-minute windows stepping by the second (360 slots) cost 50
    times what its units said, and a hot entity's slice ran for 12-22 ms under a 5 ms budget
    (found by outside testing)."""
    stride = ring.STRIDES[ring.KINDS[feature.aggregation]]
    if stride == 0:  # a sketch: per-step keys, no ring (its values count as they come)
        return 1.0, COST_BUCKET
    values = ring.slots(feature.window) * stride
    windows = feature.window.size // feature.step
    return (1.0 + values / RING_VALUES_PER_UNIT,
            COST_BUCKET + windows / RING_VALUES_PER_UNIT)


@dataclass(slots=True)
class PartitionPosition:
    """Where a partition stands in Redis: last applied offset and its event-time watermark."""

    offset: int = -1
    watermark: int = NO_WATERMARK

    def encode(self) -> str:
        return f"{self.offset}:{self.watermark}"

    @classmethod
    def decode(cls, raw: str | bytes | None) -> PartitionPosition:
        if raw is None:
            return cls()
        text = raw.decode() if isinstance(raw, bytes) else raw
        offset, _, watermark = text.partition(":")
        return cls(int(offset), int(watermark))


#: where a partition stands, for every shard alike or per shard (``shards + 1`` entries, the
#: last the control fence)
Fence = PartitionPosition | None | list[PartitionPosition | None]


@dataclass
class BatchStats:
    skipped_replayed: int = 0
    late: dict[str, int] = field(default_factory=lambda: defaultdict(int))


#: the packed parts of apply.lua's document (Slice.argv): a map of four entries and its keys
_DOC_G = b"\x84" + msgpack.packb("g")
_DOC_F = msgpack.packb("f")
_DOC_W = msgpack.packb("w")
_DOC_LEASE = msgpack.packb("l")
_EMPTY_LIST = msgpack.packb([])


@dataclass
class Slice:
    """One fenced script: some of one shard's entities (or the control fence's ride-along
    writes) and the positions that shard moves from (``expected``) and to (``new``)."""

    #: shard index; ``shards`` (one past the last) is the control fence
    shard: int
    #: (tp, expected encoded or "", new encoded) for every partition this slice moves on
    moves: list[tuple[str, str, str]]
    keys: list[str] = field(default_factory=list)
    #: per entity key: [KEYS index, op, ...] (see apply.lua)
    groups: list[list[Any]] = field(default_factory=list)
    writes: list[list[Any]] = field(default_factory=list)
    observed_since: int | None = None
    cost: float = 0.0

    def argv(self, packed_features: bytes, lease_ms: int = 0) -> list[Any]:
        """apply.lua's arguments; ``packed_features``: the plan's feature table, packed once
        (:attr:`WritePlan.packed_features`); ``lease_ms``: see :attr:`WritePlan.lease_ms`."""
        header: list[Any] = [len(self.moves)]
        for move in self.moves:
            header += move
        header.append("" if self.observed_since is None else self.observed_since)
        # one msgpack argument: packing hundreds of thousands of separate arguments costs more
        # than applying them, and Lua's cmsgpack decodes faster than its cjson. The document is
        # the map {"g": groups, "f": features, "w": writes, "l": lease}, assembled from its
        # packed parts: packing the feature table for each of a batch's thousand slices was a
        # third of the packing
        doc = b"".join((_DOC_G, msgpack.packb(self.groups),
                        _DOC_F, packed_features if self.groups else _EMPTY_LIST,
                        _DOC_W, msgpack.packb(self.writes), _DOC_LEASE, msgpack.packb(lease_ms)))
        return [*header, doc]

    @property
    def is_empty(self) -> bool:
        return not (self.moves or self.groups or self.writes)


@dataclass
class WritePlan:
    """A batch's write: the control slice and every shard's slices, in the order to apply."""

    #: alert states, outbox entries, observed_since; fenced by the control fence
    control: Slice
    #: shards the batch moves on without touching any of their entities (fence only)
    advances: list[Slice]
    #: shards with entities to write, each at most one budget's cost, in order per shard
    slices: list[Slice]
    positions: dict[str, PartitionPosition]
    touched: dict[str, set[str]]  # feature name -> entity ids updated
    #: the features the ops refer to (1-based in Lua): [name, size, step, slots, stride, kind, ttl]
    features: list[list[Any]] = field(default_factory=list)
    #: the shard count the slices were cut for
    shards: int = DEFAULT_SHARDS
    #: the cost one slice was allowed (slices written together stay within it)
    max_cost: float = UNBOUNDED
    #: slices already acknowledged by Redis (a retried apply resumes after them)
    applied: int = 0
    #: feature name -> newest event time (epoch ms) of the batch's events for it
    newest: dict[str, int] = field(default_factory=dict)
    #: > 0: every key written lives this long (ms), whatever its entries' TTL; 0: as long as
    #: their longest TTL (the worker's). A training set's replay runs hours of the archive's
    #: time in seconds and models the expiry itself (eventpulse/offline/expiry.py): its keys
    #: must outlive the build, however slow, and still go away if it dies before its cleanup
    lease_ms: int = 0

    @cached_property
    def packed_features(self) -> bytes:
        """:attr:`features` packed for apply.lua, once for all the plan's slices."""
        return msgpack.packb(self.features)  # type: ignore[no-any-return]

    @property
    def is_empty(self) -> bool:
        return self.control.is_empty and not self.advances and not self.slices

    @property
    def all_slices(self) -> list[Slice]:
        return [self.control, *self.advances, *self.slices]

    def fences_after(self, before: Mapping[str, Fence]) -> dict[str, list[PartitionPosition | None]]:
        """Where every shard (the control fence last) of each partition stands once the plan is
        applied, from where they stood (``before``): shards the plan does not move stay."""
        after: dict[str, list[PartitionPosition | None]] = {
            tp: list(fence) if isinstance(fence, list) else [fence] * (self.shards + 1)
            for tp, fence in before.items()}
        for piece in self.all_slices:
            for tp, _, new in piece.moves:
                after[tp][piece.shard] = PartitionPosition.decode(new)
        return after

    def add_write(self, op: str, key: str, field: str, value: str) -> None:
        """Ride along with the batch: ``S`` = HSET key field value, ``R`` = RPUSH key value.

        The alerting uses this so that alert states and outbox entries commit with the control
        fence, which also decides which metric samples a replay feeds the alert engine again.
        """
        if op not in ("S", "R"):
            raise ValueError(f"unknown write op {op!r}")
        keys = self.control.keys
        try:
            index = keys.index(key) + 3
        except ValueError:
            keys.append(key)
            index = len(keys) + 2
        self.control.writes.append([op, index, field, value])


class _KeyGroup:
    """Features of one feed keyed by the same fields: the entity id, its shard and its slice
    are worked out once per record for all of them (each feature then has its own bucket)."""

    __slots__ = ("features", "hot", "key_field", "key_of", "least_lateness", "seed", "shard_of")

    def __init__(self, features: list[CompiledFeature]) -> None:
        first = features[0]
        # sorted by step, so that features of one step share the bucket worked out for the first
        self.features = sorted(features, key=lambda f: f.step)
        #: per feature, what the combiner reads of it for every event (fold.HotFeature)
        self.hot: list[HotFeature] = [
            fold.HotFeature(f, _WIDTHS[f.agg_code], _EMPTY_PARTIALS[f.agg_code], *op_costs(f))
            for f in self.features]
        #: a record less late than this is too late for none of the group's features
        self.least_lateness = min(f.lateness for f in self.features)
        #: entity id -> its shard, for this batch (shared by the groups of one entity type;
        #: set by ``BatchCombiner.reset``): a hot entity's CRC is worked out once per batch
        self.shard_of: dict[str, int] = {}
        #: CRC-32 of "<entity>:", continued over the id's bytes: :func:`shard_of` in one call
        self.seed = crc32(f"{first.entity}:".encode())
        self.key_field = first.key_field
        self.key_of = first.key_of

    @classmethod
    def of(cls, features: Sequence[CompiledFeature]) -> list[_KeyGroup]:
        grouped: dict[tuple[Any, ...], list[CompiledFeature]] = {}
        for feature in features:
            identity = (feature.entity, tuple(feature.spec.key))
            grouped.setdefault(identity, []).append(feature)
        return [cls(members) for members in grouped.values()]

    def header(self) -> tuple[Any, ...]:
        """What the fold reads of the group once per record, as one tuple (see ``hot``)."""
        return (self, self.key_field, self.key_of, self.least_lateness, self.shard_of,
                self.seed, self.hot)


class BatchCombiner:
    """Accumulates one write's worth of records. Not thread-safe; one per consumer loop.

    Entities are spread over ``shards`` fence shards (:func:`shard_of`); each shard holds its
    own applied position per partition, so a shard's write can be its own script. Per shard,
    per feature, a dict from entity id to the op apply.lua will run for it, built in place:
    ``[feature, newest event time, bucket, partial..., bucket, partial..., ...]``. When a
    shard's open slice reaches ``max_cost`` it is sealed at the position before the record at
    hand and a new one starts, so that no script runs longer than the budget.
    """

    def __init__(self, namespace: str, features: Sequence[CompiledFeature],
                 positions: Mapping[str, Fence] | None = None, *, shards: int = DEFAULT_SHARDS,
                 max_cost: float = UNBOUNDED,
                 feed_of: Callable[[CompiledFeature], str] | None = None,
                 fed: Mapping[str, PartitionPosition] | None = None,
                 lease_ms: int = 0) -> None:
        """``features``: every feature of the job, each at its ``index``. ``fed``: see
        :meth:`reset`. ``lease_ms``: see :attr:`WritePlan.lease_ms`. ``feed_of``: the name
        records for a feature are fed under (``add``'s ``topic``); by default its topic. The
        training set feeds each entity family under a name of its own, so that a record fed
        for one entity updates that entity only (eventpulse/offline/entityindex.py)."""
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self.namespace = namespace
        self.features = features
        self.shards = shards
        self.max_cost = max_cost
        self.lease_ms = lease_ms
        by_topic: dict[str, list[CompiledFeature]] = {}
        for feature in features:
            feed = feature.spec.topic if feed_of is None else feed_of(feature)
            by_topic.setdefault(feed, []).append(feature)
        self.groups_by_topic = {topic: _KeyGroup.of(members) for topic, members in by_topic.items()}
        self.reset(positions or {}, fed)

    def reset(self, positions: Mapping[str, Fence],
              fed: Mapping[str, PartitionPosition] | None = None) -> None:
        """Start a batch from the positions Redis holds: per partition, one position for every
        shard and the control fence alike, or a list of ``shards + 1`` (``None``: never
        applied). Records at or below the lowest are skipped; between the lowest and a
        shard's own, only that shard skips them (a replay after a crash between slices).

        ``fed``: per partition, where the previous batch of this worker left off (its last
        offset and the watermark there), when this batch continues it."""
        n = self.shards + 1
        self.expected: dict[str, list[PartitionPosition | None]] = {}
        self.positions: dict[str, PartitionPosition] = {}
        #: per partition, the shards (and control, index ``shards``) ahead of the lowest
        self.ahead: dict[str, dict[int, int]] = {}
        #: per partition, the highest offset some shard already holds or a lift point names
        #: (only when there is one: the fold checks these partitions' records)
        self.replay_upto: dict[str, int] = {}
        #: per partition, (offset, watermark) points above the lowest fence, ascending: the
        #: watermark after ``offset`` was at least ``watermark`` (each fence's, and ``fed``)
        self.lifts: dict[str, list[tuple[int, int]]] = {}
        #: per partition in ``replay_upto``, the offset past which the next lift applies
        self.lift_at: dict[str, int] = {}
        for tp, fence in positions.items():
            each = list(fence) if isinstance(fence, list) else [fence] * n
            if len(each) != n:
                raise ValueError(f"{tp}: {len(each)} fences for {self.shards} shards")
            self.expected[tp] = each
            low = min(each, key=lambda p: -1 if p is None else p.offset)
            position = self.positions[tp] = (PartitionPosition(low.offset, low.watermark)
                                             if low else PartitionPosition())
            ahead = {s: p.offset for s, p in enumerate(each)
                     if p is not None and p.offset > position.offset}
            points = {(p.offset, p.watermark) for p in each if p is not None}
            previous = fed.get(tp) if fed else None
            if previous is not None:
                points.add((previous.offset, previous.watermark))
            # a point at or below the lowest fence holds for every record this batch applies
            position.watermark = max([position.watermark, *(w for o, w in points
                                                            if o <= position.offset)])
            above = sorted(point for point in points if point[0] > position.offset)
            if above:
                self.ahead[tp] = ahead
                self.lifts[tp] = above
                self.lift_at[tp] = above[0][0]
                self.replay_upto[tp] = above[-1][0]  # every fence ahead is a point too
        self.stats = BatchStats()
        caches: dict[int, dict[str, int]] = {}
        for groups in self.groups_by_topic.values():
            for group in groups:
                group.shard_of = caches.setdefault(group.seed, {})
        #: per feed, its groups' headers (with this batch's shard caches)
        self.hot_groups = {topic: [group.header() for group in groups]
                           for topic, groups in self.groups_by_topic.items()}
        #: shard -> feature index -> entity id -> op (the open slice of each shard; None until
        #: a record reaches the shard)
        self.open: list[list[dict[str, list[Any]]] | None] = [None] * self.shards
        self.cost = [0.0] * self.shards
        #: per shard, the number of the last record that added to its open slice: a slice is
        #: never sealed in the middle of a record (it would hold part of a record its fence
        #: says is not applied)
        self.marks = [0] * self.shards
        self.seq = 0
        #: slices sealed so far: (shard, ops, positions after them, cost)
        self.sealed: list[tuple[int, list[dict[str, list[Any]]] | None,
                                dict[str, PartitionPosition], float]] = []
        #: the earliest event time of this batch's records from partitions joined mid-stream
        self.observed_since: int | None = None
        #: partitions whose first applied record is in this batch at an offset past 0: what came
        #: before it (deleted by retention, or consumed by nobody) eventpulse never saw
        self.joined_midstream: set[str] = set()
        #: what the fold reads per record, as one attribute (fold.add); reset() is the only
        #: place that binds these names anew (the rest mutates them in place)
        self.fold_state = (self.positions, self.replay_upto, self.joined_midstream, self.cost,
                           self.open, self.features, self.marks, self.shards, self.max_cost,
                           self.hot_groups)

    def _lift(self, tp: str, offset: int) -> None:
        """A record of ``tp`` at ``offset``, past lift points: the watermark before it is at
        least theirs. The records between the lowest fence and such a point may not be fed
        again: a shard the worker moves on lazily lags behind the others, and a replay after a
        crash may take several batches, each starting from the fences the last one left,
        where the lowest is such a lagging shard. Lateness is judged against the partition's
        watermark; starting from the lowest shard's let records through that a batch cut
        elsewhere refuses (found by outside testing, then by the oracle test in CI). Where the
        records are fed again (a replay's first batch) the watermark is there already."""
        points = self.lifts[tp]
        position = self.positions[tp]
        while points and points[0][0] < offset:
            _, watermark = points.pop(0)
            if watermark > position.watermark:
                position.watermark = watermark
        self.lift_at[tp] = points[0][0] if points else _NEVER
        if not points and offset > self.replay_upto[tp]:
            del self.replay_upto[tp]  # no shard holds this record or any later one

    def control_holds(self, tp: str, offset: int) -> bool:
        """True when the control fence already holds ``offset`` (its metric sample fed the alert
        states an earlier run wrote): a replay must not feed it again."""
        ahead = self.ahead.get(tp)
        return ahead is not None and offset <= ahead.get(self.shards, -1)

    def _seal(self, shard: int, tp: str, offset: int, watermark: int) -> None:
        """Close ``shard``'s open slice at the positions before the record at hand (which is
        on ``tp``, now at ``offset``/``watermark`` without it)."""
        after = {t: PartitionPosition(p.offset, p.watermark) for t, p in self.positions.items()}
        after[tp] = PartitionPosition(offset, watermark)
        self.sealed.append((shard, self.open[shard], after, self.cost[shard]))
        self.open[shard] = None
        self.cost[shard] = 0.0

    #: Fold one record in (``None``: a refused record that only advances the offset): whether
    #: it was skipped (an earlier run applied it), only advanced the offset or was folded
    #: (fold.SKIPPED, ADVANCED, FOLDED). The hot path: eventpulse/tables/fold.py.
    add = fold.add
    #: Fold a run of records, each with the watermark to judge it by (the training set's
    #: replay): see fold.add_each.
    add_each = fold.add_each
    #: plan()'s per-op loop, compiled with the fold: see fold.group_by_entity
    group_by_entity = staticmethod(fold.group_by_entity)

    def _not_late(self, group: _KeyGroup, view: View, behind: int, tp: str,
                  offset: int) -> list[HotFeature]:
        """The group's features a record ``behind`` ms behind the watermark is not too late
        for; it counts as late for each of the others it would have counted for, unless an
        earlier run committed it (the control fence holds it: that run counted it, and a
        replay after a crash must not count it again)."""
        fresh = []
        counted = not self.control_holds(tp, offset)
        for feature, hot in zip(group.features, group.hot, strict=True):
            if behind <= feature.lateness:
                fresh.append(hot)
            elif counted and (feature.is_match is None or feature.is_match(view)):
                self.stats.late[feature.name] += 1
        return fresh

    def spans(self, only: Mapping[str, Collection[str]] | None = None,
              ) -> dict[str, dict[str, tuple[int, int]]]:
        """Per feature name, per entity id, the earliest and latest bucket (window step start)
        this batch writes: the windows its records can change (the training set's
        ``lag_sensitive`` marks, eventpulse/offline/settle.py). ``only``: of these entity ids
        per entity type alone (the others' are not looked at). Read it before :meth:`plan`,
        which hands the ops over."""
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for ops in [*(sealed for _, sealed, _, _ in self.sealed), *self.open]:
            for findex, by_entity in enumerate(ops or ()):
                if not by_entity:
                    continue
                feature = self.features[findex]
                found: Iterable[tuple[str, list[Any]]]
                if only is None:
                    found = by_entity.items()
                else:
                    ids = only.get(feature.entity)
                    if not ids:
                        continue
                    found = [(i, op) for i in ids if (op := by_entity.get(i)) is not None]
                width = _WIDTHS[feature.agg_code]
                mine = out.setdefault(feature.name, {})
                for entity_id, op in found:
                    # [feature, newest, bucket, partials..., bucket, partials...]
                    if len(op) == 2 + width:  # one bucket, the common case: no slice made
                        low = high = op[2]
                    else:
                        buckets = op[2::width]
                        low, high = min(buckets), max(buckets)
                    had = mine.get(entity_id)
                    mine[entity_id] = ((low, high) if had is None
                                       else (min(had[0], low), max(had[1], high)))
        return out

    def plan(self) -> WritePlan:
        """Encode the batch as slices for ``apply.lua``: per shard, its sealed slices then its
        open one, each moving the shard's positions on from where the previous left them; the
        last one (or a fence-only slice for a shard the batch did not touch) to the batch's
        final positions, so that after a whole batch every shard stands at the same place."""
        namespace, features = self.namespace, self.features
        touched: dict[str, set[str]] = {}
        newest: dict[str, int] = {}  # feature name -> newest event time (the freshness metric)
        #: per shard, where its positions stand as the plan's slices move it on
        current = [{tp: each[s] for tp, each in self.expected.items()}
                   for s in range(self.shards + 1)]

        def moves(shard: int, after: Mapping[str, PartitionPosition]) -> list[tuple[str, str, str]]:
            out = []
            here = current[shard]
            for tp, pos in after.items():
                old = here.get(tp)
                if old is None or pos.offset > old.offset:
                    out.append((tp, old.encode() if old else "", pos.encode()))
                    here[tp] = pos
            return out

        def build(shard: int, ops: Sequence[dict[str, list[Any]]] | None,
                  after: Mapping[str, PartitionPosition], cost: float) -> Slice:
            piece = Slice(shard, moves(shard, after), cost=cost)
            piece.groups = self.group_by_entity(features, ops or (), namespace, shard,
                                                piece.keys, touched, newest)
            return piece

        slices = [build(shard, ops, after, cost) for shard, ops, after, cost in self.sealed]
        sealed = {shard for shard, _, _, _ in self.sealed}
        advances: list[Slice] = []
        for shard, ops in enumerate(self.open):
            if ops is not None and any(ops):
                slices.append(build(shard, ops, self.positions, self.cost[shard]))
                continue
            advance = Slice(shard, moves(shard, self.positions))
            if advance.moves:  # after the shard's sealed slices, if any: it expects their end
                (slices if shard in sealed else advances).append(advance)
        for piece in slices:
            if piece.groups and not piece.moves:  # cannot happen: ops come from newer records
                raise RuntimeError(f"slice of shard {piece.shard} writes without a fence")
        control = Slice(self.shards, moves(self.shards, self.positions),
                        observed_since=self.observed_since)
        kinds = [ring.KINDS[f.aggregation] for f in features]
        table = [[f.name, f.window.size, f.step, ring.slots(f.window), ring.STRIDES[kind], kind,
                  f.spec.ttl or 0] for f, kind in zip(features, kinds, strict=True)]
        return WritePlan(control, advances, slices, self.positions, touched, table, self.shards,
                         self.max_cost, newest=newest, lease_ms=self.lease_ms)


#: numbers after the bucket in an op, per aggregation code (sketches: one collection)
_EMPTY_PARTIALS: list[tuple[Any, ...]] = [kind.partials for kind in kinds.BY_CODE]
#: bucket + partial
_WIDTHS = [1 + len(p) for p in _EMPTY_PARTIALS]
