# cython: annotation_typing=True, language_level=3
"""The combiner's per-record fold (``BatchCombiner.add``): the hot path of every event; and
the write plan's per-op loop (``group_by_entity``), which runs once per (feature, entity) of
every batch.

It lives in its own module so that it can be compiled: where ``pip install`` finds a C compiler,
setup.py has Cython compile this very file (same source, same semantics, no twin to keep in
step) and the import below picks the extension up; without one, or when the extension is older
than this file (an edit not yet rebuilt: run ./scripts/bootstrap.sh), the source runs.
``eventpulse.tables.batch.COMPILED_FOLD`` says which. Compiled, the fold costs about a third
of what the source does per event (bench/ingest_cost.py, docs/performance.md).

The local variables' annotations are what Cython types them as (``annotation_typing``): a
``dict``/``list`` annotation makes ``.get`` and indexing direct C calls, ``cython.Py_ssize_t``
a C integer. Python never evaluates a local's annotation, so the source runs without Cython
installed; tests/test_fold.py holds the compiled build to the source on random batches.

Plain dicts and lists, no attribute-heavy objects: see BatchCombiner for the op layout.
"""

from __future__ import annotations

from collections import defaultdict
from math import isfinite
from typing import TYPE_CHECKING, Any
from zlib import crc32

from eventpulse.streams.entitykey import key_text
from eventpulse.tables.keys import shard_features_key
from eventpulse.tables.ring import last_stored
from eventpulse.tables.sketch import bin_of

if TYPE_CHECKING:
    from collections.abc import Sequence

    import cython  # the C types of the annotations below (only Cython reads them)

    from eventpulse.tables.batch import BatchCombiner
    from eventpulse.tables.spec import CompiledFeature

#: cost of one (feature, entity) op is one unit plus its ring's share (batch.op_costs); an extra
#: bucket and a sketch item cost less
COST_BUCKET = 0.25
COST_SKETCH_ITEM = 0.05
#: a percentile bin a bucket did not have yet: one HINCRBY more in apply.lua
COST_SKETCH_BIN = 0.15

#: what :func:`add` returns: the record was applied by an earlier run; only its offset moved
#: (no feature took it); some feature took it
SKIPPED, ADVANCED, FOLDED = 0, 1, 2


class HotFeature:
    """What the fold reads of a feature for every record, ready to use. Compiled, this is an
    extension type whose fields are C members (fold.pxd declares them): reading one is a load,
    not a dict lookup or a tuple unpacking with its reference counts."""

    def __init__(self, feature: CompiledFeature, width: int, empty: tuple[Any, ...],
                 op_cost: float, bucket_cost: float) -> None:
        self.findex = feature.index
        self.lua_index = feature.index + 1
        self.code = feature.agg_code
        self.is_match = feature.is_match
        self.is_numerator = feature.is_numerator
        # the common filter (one field equal to a value) is tested inline: no call per record
        self.match_field: str | None = None
        self.match_value: Any = None
        if feature.match_equals is not None:
            self.match_field, self.match_value = feature.match_equals
        self.numerator_field: str | None = None
        self.numerator_value: Any = None
        if feature.numerator_equals is not None:
            self.numerator_field, self.numerator_value = feature.numerator_equals
        self.value_field = feature.value_field
        self.value_of = feature.value_of
        #: numbers per bucket in the op (the bucket start and its partials) and its partials
        self.width = width
        self.empty = empty
        self.op_cost = op_cost
        self.bucket_cost = bucket_cost
        self.step = feature.step


def add(self: BatchCombiner, tp: str, topic: str, offset: int, record: Any | None) -> int:
    """Fold one record in: a decoded record, or an archived one (its view, a dict); ``None``:
    a refused record that only advances the offset.

    Returns :data:`SKIPPED` (0) when an earlier run already applied the record, :data:`FOLDED`
    when some feature took it (its entity's key is written with the batch), else
    :data:`ADVANCED` (filtered out, too late, about no entity: only the offset moved).
    This is the per-event hot path: plain dicts and lists, no attribute-heavy objects.
    """
    at: cython.Py_ssize_t
    width: cython.Py_ssize_t
    code: cython.int
    shards_of: dict[str, int]
    hot: list[HotFeature]
    h: HotFeature
    all_ops: list[dict[str, list[Any]]]
    shard: cython.Py_ssize_t
    positions: dict[str, Any]
    replay_upto: dict[str, int]
    joined_midstream: set[str]
    costs: list[float]
    opened: list[list[dict[str, list[Any]]] | None]
    marks: list[int]
    hot_groups: dict[str, list[Any]]
    # one attribute read instead of ten: they cost about a tenth of this function's time
    (positions, replay_upto, joined_midstream, costs, opened, features, marks, shards, max_cost,
     hot_groups) = self.fold_state
    position = positions[tp]
    before = position.offset
    if offset <= before:  # applied by an earlier run (a replay after a crash)
        self.stats.skipped_replayed += 1
        return 0  # SKIPPED
    if position.offset < 0 < offset:  # the partition's first record, not its log's first
        joined_midstream.add(tp)
    position.offset = offset
    if record is None:
        return 1  # ADVANCED
    # some shards already hold this record (a replay after a crash between slices), or a
    # fence below it says the watermark was higher than the lowest fence's (_lift)
    ahead = None
    if replay_upto:
        upto = replay_upto.get(tp)
        if upto is not None:
            if offset > self.lift_at[tp]:
                self._lift(tp, offset)
            if offset <= upto:
                ahead = self.ahead[tp]
    # spec.record_view, inline (a call per record costs more than the lines): one dict over
    # the record's typed fields (the timestamp among them) and its extra fields; an archived
    # record is that dict already (eventpulse.archive.read)
    view: dict[str, Any]
    if type(record) is dict:
        view = record
    else:
        view = record.__dict__
        extra = record.__pydantic_extra__
        if extra:
            view = {**view, **extra}
    # C integers (timestamps are validated to 1970-9999): comparisons and bucket arithmetic
    # without allocating; ``stamp`` is the same value as the object stored in ops
    stamp = view["timestamp"]
    ts: cython.longlong = stamp
    watermark: cython.longlong = position.watermark
    if ts > watermark:
        position.watermark = stamp
    if joined_midstream and tp in joined_midstream and (
            self.observed_since is None or stamp < self.observed_since):
        self.observed_since = stamp
    self.seq = seq = self.seq + 1
    least_lateness: cython.longlong
    step: cython.longlong
    bucket_step: cython.longlong
    bucket: cython.longlong
    newest: cython.longlong
    have: cython.longlong
    folded: cython.bint = False
    for (group, key_field, key_of, least_lateness, shards_of, seed, hot
         ) in hot_groups.get(topic, ()):
        entity_id = view.get(key_field) if key_field is not None else key_of(view)
        if entity_id is None or entity_id == "":
            continue  # the record is not about an entity of this kind
        if ts < watermark - least_lateness:  # too late for the windows of some features
            hot = self._not_late(group, view, watermark - ts, tp, offset)
            if not hot:
                continue
        if type(entity_id) is not str:
            entity_id = key_text(entity_id)
        known = shards_of.get(entity_id)
        if known is None:
            known = shards_of[entity_id] = crc32(entity_id.encode(), seed) % shards
        shard = known
        if ahead is not None and offset <= ahead.get(shard, -1):
            continue
        if costs[shard] >= max_cost and marks[shard] != seq:
            self._seal(shard, tp, before, watermark)
        marks[shard] = seq
        all_ops = opened[shard]
        if all_ops is None:  # the shard's first record in this slice
            all_ops = opened[shard] = [{} for _ in features]
        bucket_step = 0
        for h in hot:
            if h.is_match is not None:
                if h.match_field is not None:
                    if view.get(h.match_field) != h.match_value:
                        continue
                elif not h.is_match(view):
                    continue
            code = h.code
            if code >= 2:  # these need a value: skip the event for this feature without one
                value: Any = (view.get(h.value_field) if h.value_field is not None
                              else h.value_of(view))  # type: ignore[misc]
                if code != 6 and code != 7:  # a finite number (CompiledFeature.number)
                    kind = type(value)  # Py_TYPE compiled; x.__class__ is an attribute lookup
                    if kind is int:
                        value = float(value)
                    elif kind is not float or not isfinite(value):
                        continue
                elif value is None:  # last, distinct: any value
                    continue
                elif code == 6:  # stored as Lua keeps it (ring.last_stored): most are strings,
                    # kept as they are, told apart in C by their first character, which is
                    # ring.LAST_ESCAPE's (tests/test_fold.py holds the two together)
                    if type(value) is str:
                        text: str = value
                        if len(text) and text[0] == "\x00":
                            value = last_stored(value)
                    else:
                        value = last_stored(value)
            step = h.step
            if step != bucket_step:  # the group's features come sorted by step
                bucket_step = step
                bucket = ts - ts % step
                bucket_start = bucket  # the object stored in ops, made once per step
            width = h.width
            folded = True
            ops: dict[str, list[Any]] = all_ops[h.findex]
            op: list[Any] | None = ops.get(entity_id)
            if op is None:
                op = ops[entity_id] = [h.lua_index, stamp, bucket_start, *h.empty]
                at = 3
                costs[shard] += h.op_cost
            else:
                newest = op[1]
                if ts > newest:
                    op[1] = stamp
                at = len(op) - width + 1  # the last bucket first: events mostly come in order
                have = op[at - 1]
                while have != bucket:
                    at -= width
                    if at < 3:
                        op += (bucket_start, *h.empty)
                        at = len(op) - width + 1
                        costs[shard] += h.bucket_cost
                        break
                    have = op[at - 1]
            if code == 0:  # count
                op[at] += 1
            elif code == 1:  # ratio: numerator, events
                op[at + 1] += 1
                if h.is_numerator is None or (
                        view.get(h.numerator_field) == h.numerator_value
                        if h.numerator_field is not None else h.is_numerator(view)):
                    op[at] += 1
            elif code == 2:  # sum
                op[at] += value
            elif code == 3:  # mean: sum, events
                op[at] += value
                op[at + 1] += 1
            elif code == 4:  # min: events, minimum
                if not op[at] or value < op[at + 1]:
                    op[at + 1] = value
                op[at] += 1
            elif code == 5:  # max: events, maximum
                if not op[at] or value > op[at + 1]:
                    op[at + 1] = value
                op[at] += 1
            elif code == 6:  # last: event time, value (ties: the later record wins)
                newest = op[at]
                if not newest or ts >= newest:
                    op[at] = stamp
                    op[at + 1] = value
            elif code == 7:  # distinct: the values seen, as strings
                costs[shard] += COST_SKETCH_ITEM
                members: set[str] | None = op[at]
                if members is None:
                    members = op[at] = set()
                members.add(value if type(value) is str else str(value))
            else:  # percentile sketch bins
                costs[shard] += COST_SKETCH_ITEM
                bins = op[at]
                if bins is None:
                    bins = op[at] = defaultdict(int)
                bin_name = bin_of(value)
                if bin_name not in bins:
                    costs[shard] += COST_SKETCH_BIN
                bins[bin_name] += 1
    return 2 if folded else 1  # FOLDED, ADVANCED


def add_each(self: BatchCombiner, tp: str, feeds: Any, records: Any, watermarks: Any,
             reaches: Any, rows: Any, start: int, end: int, offset: int, low: int, high: int,
             ) -> tuple[int, int, int]:
    """Fold the records of ``rows[start:end]`` in, in order, under offsets from ``offset`` on,
    each under its feed and judged late against the watermark given with it (the training
    set's replay: one entity's records from many partitions under one made-up partition, each
    compared with its own partition's watermark before it, eventpulse/offline/training.py).
    ``feeds``, ``records``, ``watermarks`` and ``reaches`` hold one value per row. Returns the
    next offset, and ``low``/``high`` widened to the least and greatest of ``reaches`` (the
    time the broker had each record by) of the records some feature took, which make the
    worker write the entity's key (eventpulse/offline/expiry.py; -1: none yet; ``reaches``
    None: not tracked). Compiled, the loop costs a fraction of the same loop in Python."""
    i: cython.Py_ssize_t
    row: cython.Py_ssize_t
    reach: cython.longlong
    least: cython.longlong = low
    most: cython.longlong = high
    position = self.positions[tp]
    for i in range(start, end):
        row = rows[i]
        position.watermark = watermarks[row]
        if add(self, tp, feeds[row], offset, records[row]) == 2 and reaches is not None:
            reach = reaches[row]  # FOLDED
            if least < 0 or reach < least:
                least = reach
            if reach > most:
                most = reach
        offset += 1
    return offset, least, most


def group_by_entity(features: Sequence[CompiledFeature], ops: Sequence[dict[str, list[Any]]],
                    namespace: str, shard: int, keys: list[str], touched: dict[str, set[str]],
                    newest: dict[str, int]) -> list[list[Any]]:
    """The write plan's per-op loop (``BatchCombiner.plan``): one slice's ops, kept per feature
    and entity id, regrouped per entity as apply.lua takes them (``[KEYS index, op, op, ...]``;
    each entity's key is appended to ``keys``, after KEYS[1] and [2], the fence and the meta
    hash), sketches flattened for msgpack. Notes the entity ids each feature touched and its
    newest event time. Compiled with the fold: in Python this loop cost a fifth of what the
    fold does per event."""
    findex: cython.Py_ssize_t
    code: cython.int
    top: cython.longlong
    stamp: cython.longlong
    by_entity: dict[str, list[Any]]
    by_id: dict[str, list[Any]]
    groups: dict[str, dict[str, list[Any]]] = {}
    for findex in range(len(ops)):
        by_entity = ops[findex]
        if not by_entity:
            continue
        feature = features[findex]
        name = feature.name
        entity = feature.entity
        seen = touched.get(name)
        if seen is None:
            seen = touched[name] = set()
        seen.update(by_entity)
        by_id = groups.get(entity)  # type: ignore[assignment]
        if by_id is None:
            by_id = groups[entity] = {}
        code = feature.agg_code
        top = -1
        for entity_id, op in by_entity.items():
            stamp = op[1]
            if stamp > top:
                top = stamp
            if code >= 7:
                _flatten_sketches(code, op)
            group = by_id.get(entity_id)
            if group is None:
                keys.append(shard_features_key(namespace, shard, entity, entity_id))
                group = by_id[entity_id] = [len(keys) + 2]
            group.append(op)
        known = newest.get(name)
        if known is None or top > known:
            newest[name] = top
    return [group for by_id in groups.values() for group in by_id.values()]


def _flatten_sketches(code: int, op: list[Any]) -> None:
    """Distinct sets become lists, percentile bins flat [bin, count, ...] lists, for msgpack."""
    at: cython.Py_ssize_t
    flat: list[Any]
    for at in range(3, len(op), 2):
        if code == 7:
            op[at] = list(op[at])
        else:
            flat = []
            for bin_name, count in op[at].items():
                flat += [bin_name, count]
            op[at] = flat
