"""The combiner's per-record fold runs compiled (setup.py has Cython compile
eventpulse/tables/fold.py as it is), and the compiled build combines exactly as the source does:
same ops, slices, positions and counts on random batches (late, replayed, refused records,
composite keys, every aggregation, slices sealed mid-batch)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any

import msgpack

from eventpulse.streams.schemas import BehaviourEvent
from eventpulse.tables import batch, ring
from eventpulse.tables.batch import BatchCombiner, Fence, PartitionPosition
from eventpulse.tables.spec import CompiledFeature, FeatureSpec

SOURCE = Path(batch.__file__).with_name("fold.py")


def source_fold() -> Any:
    spec = importlib.util.spec_from_file_location("fold_source_under_test", SOURCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SourceCombiner(BatchCombiner):
    add = source_fold().add
    group_by_entity = staticmethod(source_fold().group_by_entity)


def test_the_compiled_fold_is_the_one_that_runs() -> None:
    assert batch.COMPILED_FOLD, (
        "eventpulse/tables/fold.py is not compiled (or was edited after its build): the "
        "combiner runs as Python. Run ./scripts/bootstrap.sh (needs a C compiler).")
    assert BatchCombiner.add is batch.fold.add and SourceCombiner.add is not batch.fold.add
    assert BatchCombiner.group_by_entity is batch.fold.group_by_entity
    assert SourceCombiner.group_by_entity is not batch.fold.group_by_entity


def features() -> list[CompiledFeature]:
    hop = {"type": "hopping", "size": "3m", "step": "1m", "lateness": "30s"}
    tumble = {"size": "2m", "lateness": "0s"}

    def f(name: str, aggregation: str, key: Any = "user_id", window: Any = hop,
          **extra: Any) -> dict[str, Any]:
        return {"name": name, "topic": "t", "entity": "user" if key == "user_id" else "pair",
                "key": key, "aggregation": aggregation, "window": window, **extra}

    specs = [f("n", "count", where={"action": "click"}), f("r", "ratio", numerator={"action": "buy"}),
             f("s", "sum", value="v"), f("m", "mean", value="v", window=tumble),
             f("lo", "min", value="v"), f("hi", "max", value="v"), f("l", "last", value="tag"),
             f("d", "distinct", value="item_id"), f("p", "p90", value="v"),
             f("pair_n", "count", key=["user_id", "item_id"]),
             f("nested", "sum", value="x.y", window=tumble)]
    return [CompiledFeature(FeatureSpec.model_validate(s), i) for i, s in enumerate(specs)]


def records(rng: random.Random, n: int) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    ts = 1_700_000_000_000
    for offset in range(n):
        ts += rng.choice([0, 500, 2_000, 5_000, 10_000] * 30 + [-20_000, -40_000, -200_000])
        if rng.random() < 0.05:
            out.append((offset, None))  # refused by the decoder: only advances the offset
            continue
        fields: dict[str, Any] = {"timestamp": ts, "user_id": f"u{rng.randint(1, 30)}",
                                  "action": rng.choice(["click", "buy", "view"]),
                                  "tag": rng.choice([None, "ios", "web", 3, "", "\x00x", 1.0,
                                                     [1, None], {}, 2**60, 0.5])}
        if rng.random() < 0.8:
            fields["item_id"] = rng.choice(["i1", "i2", "é", "i" * 40])
        fields["v"] = rng.choice([1, 2.5, -3.0, "7", None, True, 10**12, float("inf")])
        if rng.random() < 0.3:
            fields["x"] = rng.choice([{"y": 4.0}, {"y": "no"}, 5])
        out.append((offset, BehaviourEvent.model_validate(fields)))
    return out


def combined(cls: type[BatchCombiner], compiled: list[CompiledFeature],
             batch_records: list[tuple[int, Any]], ahead: int, shards: int = 4,
             max_cost: float = 12.0) -> Any:
    fences: list[PartitionPosition | None] = [PartitionPosition(9, 0)] * (shards + 1)
    fences[-2] = PartitionPosition(9 + ahead, 0)  # one shard already holds some: a replay
    combiner = cls("ns", compiled, {"t:0": fences}, shards=shards, max_cost=max_cost)
    answers = [combiner.add("t:0", "t", offset + 10, record) for offset, record in batch_records]
    answers += [combiner.add("t:0", "t", 5, batch_records[0][1])]  # already applied
    plan = combiner.plan()
    return (answers, dict(combiner.stats.late), combiner.stats.skipped_replayed,
            [(s.shard, s.moves, s.keys, s.groups, s.cost) for s in plan.all_slices],
            {k: sorted(v) for k, v in plan.touched.items()}, plan.newest, plan.features)


def test_compiled_and_source_folds_combine_alike() -> None:
    compiled = features()
    for seed in range(12):
        rng = random.Random(seed)
        batch_records = records(rng, 400)
        ahead = rng.randint(0, 300)
        # many small slices over shards, and one slice of every entity (the plan's grouping)
        for shards, max_cost in ((4, 12.0), (1, float("inf"))):
            assert (combined(BatchCombiner, compiled, batch_records, ahead, shards, max_cost)
                    == combined(SourceCombiner, compiled, batch_records, ahead, shards,
                                max_cost)), (seed, shards)


def test_last_values_lua_cannot_carry_are_escaped_by_both_folds() -> None:
    """The fold tells strings to escape by their first character in C; it must be
    ``ring.LAST_ESCAPE``, and both folds store what ``ring.last_stored`` says."""
    spec = FeatureSpec.model_validate({"name": "l", "topic": "t", "entity": "user",
                                       "key": "user_id", "aggregation": "last", "value": "tag",
                                       "window": {"size": "1m"}})
    for tag in (ring.LAST_ESCAPE + "x", "\x00x", "ios", "", [1, None], 1.0, 7, {}):
        for cls in (BatchCombiner, SourceCombiner):
            combiner = cls("ns", [CompiledFeature(spec, 0)], {"t:0": None}, shards=1)
            record = BehaviourEvent.model_validate({"timestamp": 1_700_000_000_000,
                                                    "user_id": "u1", "action": "view",
                                                    "tag": tag})
            combiner.add("t:0", "t", 0, record)
            (piece,) = [p for p in combiner.plan().all_slices if p.groups]
            stored = piece.groups[0][1][4]  # [feature, newest, bucket, event time, value]
            assert stored == ring.last_stored(tag) and type(stored) is type(
                ring.last_stored(tag)), (cls, tag, stored)
            assert ring.last_read(stored) == tag


def test_the_one_field_equality_filter_matches_as_the_general_form() -> None:
    """``{action: click}`` takes a one-call shortcut; ``{action: {eq: click}}`` the general
    path: both must agree on every kind of value, missing and unhashable ones included."""
    from eventpulse.tables.spec import compile_filter

    for expected in ["click", 3, None, True, 2.5]:
        short, general = compile_filter({"a": expected}), compile_filter({"a": {"eq": expected}})
        assert short is not None and general is not None
        for view in [{}, {"a": "click"}, {"a": 3}, {"a": 3.0}, {"a": None}, {"a": True},
                     {"a": 1}, {"a": [3]}, {"a": {"b": 1}}, {"a": 2.5}, {"b": "click"}]:
            assert short(view) == general(view), (expected, view)


def test_the_compiled_fold_buckets_timestamps_at_the_ends_of_the_range_as_python_does() -> None:
    """Timestamps are C integers in the compiled fold: up to year 9999, and below 0 (refused by
    the decoder, yet the fold itself must not depend on it: the bucket is ``ts - ts % step``
    with Python's modulo, not C's), it must bucket as the source does."""
    from eventpulse.streams.schemas import MAX_EPOCH_MS, MIN_EPOCH_MS

    compiled = features()
    batch_records = [(o, r) for o, r in records(random.Random(3), 300) if r is not None]
    first = batch_records[0][1].timestamp
    for start in (MIN_EPOCH_MS + 3_600_000, -1_000_123, MAX_EPOCH_MS - 30_000_000):
        shifted = [(o, r.model_copy(update={"timestamp": start + r.timestamp - first}))
                   for o, r in batch_records]
        assert (combined(BatchCombiner, compiled, shifted, 0)
                == combined(SourceCombiner, compiled, shifted, 0)), start


def test_the_fold_tests_an_equality_filter_inline_as_its_predicate_does() -> None:
    """The fold tests ``{action: click}`` (a filter and a ratio's numerator) inline instead of
    calling the feature's predicate: on the same records, a combiner made to call the
    predicates instead combines exactly alike."""
    compiled = features()
    assert any(f.match_equals for f in compiled) and any(f.numerator_equals for f in compiled)
    for seed in range(6):
        rng = random.Random(100 + seed)
        batch_records = records(rng, 400)
        inline = combined(BatchCombiner, compiled, batch_records, 0)

        class Predicates(BatchCombiner):
            def reset(self, *args: Any, **kwargs: Any) -> None:
                super().reset(*args, **kwargs)
                for groups in self.groups_by_topic.values():
                    for group in groups:
                        for hot in group.hot:
                            hot.match_field = hot.numerator_field = None

        assert combined(Predicates, compiled, batch_records, 0) == inline, seed


def test_a_comparison_filter_compares_integers_beyond_2_53_exactly() -> None:
    """``{gt: 2**53}`` matches ``2**53 + 1``: numbers are compared as they are, not as floats,
    which would make the two equal (found by outside testing)."""
    from eventpulse.tables.spec import compile_filter

    big = 2**53
    above = compile_filter({"f": {"gt": big}})
    at_most = compile_filter({"f": {"lte": big}})
    assert above is not None and at_most is not None
    assert above({"f": big + 1}) and not above({"f": big}) and not above({"f": float(big)})
    assert not at_most({"f": big + 1}) and at_most({"f": big}) and at_most({"f": 2.5})
    assert not above({"f": True}) and not above({"f": str(big + 1)}) and not above({})
    assert compile_filter({"f": {"gte": 1.5}})({"f": 2})  # type: ignore[misc]


def late_rule_combiner() -> BatchCombiner:
    """Two fence shards, a count without lateness: a record behind the watermark is late."""
    spec = FeatureSpec.model_validate({"name": "n", "topic": "t", "entity": "user",
                                       "key": "user_id", "aggregation": "count",
                                       "window": {"size": "1m", "lateness": "0s"}})
    return BatchCombiner("ep", [CompiledFeature(spec, 0)], shards=2)


def counted(combiner: BatchCombiner) -> int:
    return sum(op[3] for ops in combiner.open if ops for by_id in ops for op in by_id.values())


def test_a_lagging_shard_fence_does_not_lower_the_watermark() -> None:
    """The worker moves the fences of shards a batch did not touch lazily, so one shard can
    stand behind the others while the worker reads on (the records in between are not fed
    again). Lateness is judged against the partition's watermark, the furthest shard's: a
    record 40 s behind it is late without lateness however the batches were cut (found by
    outside testing: a worker's early batches let such records through). A replay after a
    crash, which feeds those records again, judges them the same."""
    t0 = 1_700_000_040_000
    lagging = PartitionPosition(0, t0 + 5_000)
    furthest = PartitionPosition(1, t0 + 50_000)
    late, on_time = (BehaviourEvent(timestamp=t0 + ts, user_id="u", action="view")
                     for ts in (10_000, 55_000))
    reading_on = late_rule_combiner()
    reading_on.reset({"t:0": [lagging, furthest, furthest]})
    reading_on.add("t:0", "t", 2, late)
    reading_on.add("t:0", "t", 3, on_time)
    assert reading_on.stats.late == {"n": 1} and counted(reading_on) == 1
    assert reading_on.positions["t:0"].watermark == t0 + 55_000
    # the replay after a crash feeds offset 1 again (for the lagging shard only)
    replaying = late_rule_combiner()
    replaying.reset({"t:0": [lagging, furthest, furthest]})
    replaying.add("t:0", "t", 1, BehaviourEvent(timestamp=t0 + 50_000, user_id="w",
                                                action="view"))
    replaying.add("t:0", "t", 2, late)
    replaying.add("t:0", "t", 3, on_time)
    assert replaying.stats.late == {"n": 1}


def test_a_replay_cut_into_batches_keeps_the_watermark_it_reached() -> None:
    """After a crash the worker reads again from the lowest fence, a shard no batch touched
    for a while; the replay may take several batches. A batch combined from the fences the
    previous one left starts its watermark at the lowest fence's, far behind what the
    previous batch reached: a record late for that watermark was counted (the oracle test
    of a crash, a rebalance and a Redis outage caught one, in CI)."""
    from eventpulse.tables.keys import shard_of

    t0 = 1_700_000_040_000
    spec = FeatureSpec.model_validate({"name": "n", "topic": "t", "entity": "user",
                                       "key": "user_id", "aggregation": "count",
                                       "window": {"size": "1m", "lateness": "0s"}})
    users = {shard_of("user", f"u{i}", 3): f"u{i}" for i in range(40)}
    untouched = PartitionPosition(0, t0 + 5_000)  # a shard the last batches did not touch
    ahead = PartitionPosition(10, t0 + 60_000)  # a shard the crashed batch had written
    fences: Fence = [untouched, untouched, ahead, ahead]  # shards 0-2, control last
    first = BatchCombiner("ep", [CompiledFeature(spec, 0)], {"t:0": fences}, shards=3)
    first.add("t:0", "t", 1, BehaviourEvent(timestamp=t0 + 50_000, user_id=users[1],
                                            action="view"))
    plan = first.plan()
    plan.advances = []  # untouched shards move on lazily (Checkpoint.prepare)
    second = BatchCombiner("ep", [CompiledFeature(spec, 0)],
                           {"t:0": plan.fences_after({"t:0": fences})["t:0"]}, shards=3)
    second.add("t:0", "t", 2, BehaviourEvent(timestamp=t0 + 10_000, user_id=users[1],
                                             action="view"))
    # too late, so not applied; not counted late either: the control fence holds offset 2, so
    # the run that committed it counted it (test_a_replay_counts_late_records_once)
    assert counted(second) == 0 and second.stats.late == {}
    # a batch that touched no shard (its records all held by shards ahead) leaves no fence
    # where it ended: the worker hands its end on (Checkpoint: ``fed``)
    unmoved = BatchCombiner("ep", [CompiledFeature(spec, 0)], {"t:0": fences}, shards=3,
                            fed={"t:0": first.positions["t:0"]})
    unmoved.add("t:0", "t", 2, BehaviourEvent(timestamp=t0 + 10_000, user_id=users[1],
                                              action="view"))
    assert counted(unmoved) == 0 and unmoved.stats.late == {}


def test_a_replay_counts_late_records_once() -> None:
    """The late-events counter after a crash: a record the control fence holds was committed,
    and counted late, by the run before; the replay judges it the same way (not applied) but
    does not count it again. Records past the control fence are counted."""
    t0 = 1_700_000_040_000
    spec = FeatureSpec.model_validate({"name": "n", "topic": "t", "entity": "user",
                                       "key": "user_id", "aggregation": "count",
                                       "window": {"size": "1m", "lateness": "0s"}})
    lagging = PartitionPosition(0, t0 + 60_000)
    control = PartitionPosition(3, t0 + 60_000)
    replay = BatchCombiner("ep", [CompiledFeature(spec, 0)], {"t:0": [lagging, control]},
                           shards=1)
    for offset in range(1, 6):  # all 50 s behind the watermark
        replay.add("t:0", "t", offset, BehaviourEvent(timestamp=t0 + 10_000, user_id="u",
                                                      action="view"))
    assert counted(replay) == 0 and replay.stats.late == {"n": 2}  # offsets 4 and 5
    fresh = BatchCombiner("ep", [CompiledFeature(spec, 0)], {"t:0": lagging}, shards=1)
    for offset in range(1, 6):
        fresh.add("t:0", "t", offset, BehaviourEvent(timestamp=t0 + 10_000, user_id="u",
                                                     action="view"))
    assert counted(fresh) == 0 and fresh.stats.late == {"n": 5}


def test_fields_read_names_every_top_level_field_a_feature_reads() -> None:
    """What the training set keeps of archived records (eventpulse/offline/training.py)."""
    spec = FeatureSpec.model_validate({
        "name": "f", "topic": "t", "entity": "e", "key": ["user_id", "ctx.tenant"],
        "aggregation": "ratio", "numerator": {"meta.code": {"gte": 500}},
        "where": {"action": "click", "device": {"in": ["ios"]}},
        "window": {"size": "1m"}})
    assert spec.fields_read == {"user_id", "ctx", "meta", "action", "device"}
    summed = FeatureSpec.model_validate({
        "name": "g", "topic": "t", "entity": "e", "key": "item_id", "aggregation": "sum",
        "value": "payload.watch", "window": {"size": "1m"}})
    assert summed.fields_read == {"item_id", "payload"}


def test_a_slice_document_is_the_map_apply_lua_unpacks() -> None:
    """Slice.argv assembles apply.lua's document from packed parts (the feature table packed
    once per plan): byte for byte what packing the whole map gives."""
    combiner = BatchCombiner("ns", features(), {"t:0": None}, shards=4, max_cost=12.0)
    for offset, record in records(random.Random(3), 300):
        combiner.add("t:0", "t", offset, record)
    plan = combiner.plan()
    plan.control.writes = [["S", 3, "state", "firing"], ["R", 4, "", "event"]]
    assert any(piece.groups for piece in plan.all_slices)
    for piece in plan.all_slices:
        for lease_ms in (0, 86_400_000):
            document = piece.argv(plan.packed_features, lease_ms)[-1]
            assert document == msgpack.packb({
                "g": piece.groups, "f": plan.features if piece.groups else [],
                "w": piece.writes, "l": lease_ms})


def test_add_says_whether_a_feature_took_the_record() -> None:
    """What the training set's key expiry reads (eventpulse/offline/expiry.py): a record that
    no feature takes (filtered, about no entity, too late) leaves the entity's key unwritten."""
    spec = FeatureSpec.model_validate({
        "name": "clicks", "topic": "t", "entity": "item", "key": "item_id",
        "aggregation": "count", "where": {"action": "click"},
        "window": {"size": "1m", "lateness": "0s"}})
    t0 = 1_700_000_040_000
    for cls in (BatchCombiner, SourceCombiner):
        combiner = cls("ns", [CompiledFeature(spec, 0)], {"t:0": None}, shards=2)
        answers = [combiner.add("t:0", "t", offset, record) for offset, record in [
            (1, BehaviourEvent(timestamp=t0, user_id="u", item_id="i", action="click")),
            (2, BehaviourEvent(timestamp=t0, user_id="u", item_id="i", action="view")),  # filtered
            (3, BehaviourEvent(timestamp=t0, user_id="u", action="click")),  # about no item
            (4, BehaviourEvent(timestamp=t0 - 120_000, user_id="u", item_id="i",
                               action="click")),  # late
            (5, None),  # refused by the decoder
            (3, BehaviourEvent(timestamp=t0, user_id="u", item_id="i", action="click")),  # again
        ]]
        assert answers == [batch.fold.FOLDED, *[batch.fold.ADVANCED] * 4, batch.fold.SKIPPED]
        assert combiner.stats.late == {"clicks": 1}
