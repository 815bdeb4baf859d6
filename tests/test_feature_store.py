"""The feature engine against a real redis-server: every aggregation equals the offline oracle,
replays are not applied twice, a stale writer is fenced off, old windows are pruned."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import msgpack
import pytest
import redis.asyncio as aioredis
from redis.exceptions import BusyLoadingError, ResponseError

from eventpulse.streams.decode import DecodeLimits, RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables import wire
from eventpulse.tables.batch import (
    COST_SKETCH_BIN,
    COST_SKETCH_ITEM,
    UNBOUNDED,
    BatchCombiner,
    PartitionPosition,
    WritePlan,
    op_costs,
    shard_of,
)
from eventpulse.tables.client import AsyncFeatureClient, FeatureClient
from eventpulse.tables.keys import features_key, meta_key
from eventpulse.tables.spec import CompiledFeature, FeatureSpec
from eventpulse.tables.store import FeatureStore, LayoutError
from eventpulse.tables.writebounds import DEFAULT_SHARDS
from tests.oracle import Oracle, close_enough

T0 = 1_790_000_000_000
#: item i1's feature map (layout 4: under its fence shard's hash tag, of the default shards)
I1_KEY = features_key("ep", "item", "i1", DEFAULT_SHARDS)
WINDOW = {"type": "hopping", "size": "2m", "step": "30s", "lateness": "20s"}


def specs() -> list[FeatureSpec]:
    def f(name: str, aggregation: str, **extra: Any) -> FeatureSpec:
        return FeatureSpec.model_validate({"name": name, "topic": "events", "entity": "item",
                                           "key": "item_id", "aggregation": aggregation,
                                           "window": WINDOW, **extra})
    return [
        f("n", "count"), f("clicks", "count", where={"action": "click"}),
        f("watch_sum", "sum", value="watch"), f("watch_mean", "mean", value="watch"),
        f("watch_min", "min", value="watch"), f("watch_max", "max", value="watch"),
        f("last_device", "last", value="device"), f("users", "distinct", value="user_id"),
        f("watch_p50", "p50", value="watch"), f("watch_p95", "p95", value="watch"),
        f("watch_p99", "p99", value="watch"),
        f("click_rate", "ratio", numerator={"action": {"in": ["click"]}}),
        FeatureSpec.model_validate({"name": "per_user_device", "topic": "events",
                                    "entity": "user_device", "key": ["user_id", "device"],
                                    "aggregation": "count", "window": {"size": "1m"}}),
    ]


def make_events(count: int, seed: int = 1) -> list[tuple[int, int, dict[str, Any]]]:
    """(partition, offset, record): mostly in order, some disorder within lateness, some late."""
    rng = random.Random(seed)
    out = []
    offsets = {0: 0, 1: 0}
    for i in range(count):
        partition = rng.randint(0, 1)
        ts = T0 + i * 20 + rng.randint(0, 7)
        roll = rng.random()
        if roll < 0.1:
            ts -= rng.randint(1, 15_000)  # out of order, within the 20 s lateness
        elif roll < 0.13:
            ts -= rng.randint(40_000, 90_000)  # too late
        record: dict[str, Any] = {
            "timestamp": ts, "user_id": f"u{rng.randint(1, 60)}", "item_id": f"i{rng.randint(1, 8)}",
            "action": rng.choice(["click", "view", "view"]), "device": rng.choice(["ios", "web"])}
        if rng.random() < 0.8:
            record["watch"] = round(rng.lognormvariate(3, 1), 3)
        out.append((partition, offsets[partition], record))
        offsets[partition] += 1
    return out


async def apply_all(store: FeatureStore, features: list[CompiledFeature],
                    events: list[tuple[int, int, dict[str, Any]]], batch: int,
                    max_cost: float = UNBOUNDED, crash_after: int | None = None,
                    lease_ms: int = 0) -> tuple[BatchCombiner, WritePlan]:
    """Apply ``events`` in batches; ``crash_after``: the last batch stops after that many of
    its scripts, as a worker killed between two slices would."""
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False))
    combiner = BatchCombiner("ep", features, shards=store.shards, max_cost=max_cost,
                             lease_ms=lease_ms)
    for start in range(0, len(events), batch):
        chunk = events[start:start + batch]
        tps = sorted({f"events:{p}" for p, _, _ in chunk})
        combiner.reset(await store.fences(tps))
        for partition, offset, record in chunk:
            combiner.add(f"events:{partition}", "events", offset,
                         decoder.decode(json.dumps(record).encode()))
        plan = combiner.plan()
        if crash_after is not None and start + batch >= len(events):
            plan.slices = plan.all_slices[:crash_after][1 + len(plan.advances):]
            plan.advances = plan.advances[:max(0, crash_after - 1)]
        assert await store.apply(plan) is None
    return combiner, plan


async def compare_with_oracle(client: AsyncFeatureClient, feature_specs: list[FeatureSpec],
                              oracle: Oracle) -> int:
    checked = 0
    for spec in feature_specs:
        for entity in sorted(oracle.entities(spec)):
            for end in oracle.live_windows(spec, entity):
                got = (await client.get(spec.entity, entity, [spec.name], at_ms=end))[spec.name]
                expected = oracle.value(spec, entity, end)
                assert close_enough(spec, expected, got.value), (spec.name, entity, end, expected,
                                                                 got.value)
                checked += 1
    return checked


async def test_every_aggregation_equals_the_oracle(aredis: aioredis.Redis) -> None:
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g")
    events = make_events(6000)
    combiner, _ = await apply_all(store, features, events, batch=700)
    oracle = Oracle(feature_specs)
    oracle.feed("events", sorted(events, key=lambda e: (e[0], e[1])))
    assert oracle.late > 0 and sum(combiner.stats.late.values()) >= 0
    client = AsyncFeatureClient(aredis, feature_specs, "ep")
    checked = await compare_with_oracle(client, feature_specs, oracle)
    assert checked > 500


async def test_features_of_one_key_keep_their_own_steps_and_lateness(
        aredis: aioredis.Redis) -> None:
    """Features keyed alike are combined as one group (the entity, its shard and its slice
    worked out once per record), yet each keeps its own window step and lateness: a record too
    late for one feature still counts for the others, and every value equals the oracle."""
    def f(name: str, aggregation: str, window: dict[str, str], **extra: Any) -> FeatureSpec:
        return FeatureSpec.model_validate({"name": name, "topic": "events", "entity": "item",
                                           "key": "item_id", "aggregation": aggregation,
                                           "window": window, **extra})
    tumble = {"size": "1m", "lateness": "0s"}
    long = {"type": "hopping", "size": "10m", "step": "1m", "lateness": "2m"}
    feature_specs = [f("n_tumble", "count", tumble), f("n_hop", "count", WINDOW),
                     f("n_long", "count", long), f("sum_tumble", "sum", tumble, value="watch"),
                     f("max_long", "max", long, value="watch"),
                     f("clicks_hop", "count", WINDOW, where={"action": "click"})]
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g")
    events = make_events(4000, seed=5)
    combiner, _ = await apply_all(store, features, events, batch=4000)
    late = combiner.stats.late
    # disorder within 15 s is late only without lateness; 40-90 s late only within 20 s
    assert late["n_tumble"] > late["n_hop"] > 0 and late.get("n_long", 0) == 0, late
    assert 0 < late["clicks_hop"] < late["n_hop"]
    oracle = Oracle(feature_specs)
    oracle.feed("events", sorted(events, key=lambda e: (e[0], e[1])))
    client = AsyncFeatureClient(aredis, feature_specs, "ep")
    assert await compare_with_oracle(client, feature_specs, oracle) > 300


@pytest.mark.parametrize(("shards", "crash_after"), [(1, 4), (1, 5), (2, 5), (8, 30)])
async def test_a_crash_between_slices_replays_only_the_shards_behind(
        aredis: aioredis.Redis, shards: int, crash_after: int) -> None:
    """Batches cut into many small slices; the worker dies between two slices of a batch; the
    replay, in other batch sizes, re-applies exactly the shards whose fence is behind: every
    value equals the oracle. (Records update an item and a user-device pair, often of the same
    shard: a slice cut inside a record would count half of it twice.)"""
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g", shards=shards)
    events = make_events(3000, seed=3)
    await apply_all(store, features, events[:1000], batch=1000, max_cost=15)
    _, plan = await apply_all(store, features, events[1000:2000], batch=1000, max_cost=15,
                              crash_after=crash_after)
    assert plan.applied == crash_after
    # a slice is sealed before the record that would overflow it: at most one record over
    one_record = sum(max(op_costs(f)) + COST_SKETCH_ITEM + COST_SKETCH_BIN for f in features)
    assert max(p.cost for p in plan.slices) <= 15 + one_record
    fences = await store.fences(["events:0", "events:1"])
    assert len({p.offset if p else -1 for p in fences["events:0"]}) > 1  # shards disagree
    combiner, _ = await apply_all(store, features, events[1000:], batch=700, max_cost=40)
    assert combiner.stats.skipped_replayed == 0  # the lowest shard was behind all of them
    fences = await store.fences(["events:0", "events:1"])
    assert all(len({p.offset for p in each if p}) == 1 for each in fences.values())
    oracle = Oracle(feature_specs)
    oracle.feed("events", sorted(events, key=lambda e: (e[0], e[1])))
    client = AsyncFeatureClient(aredis, feature_specs, "ep", shards)
    assert await compare_with_oracle(client, feature_specs, oracle) > 500


async def test_a_replayed_batch_is_not_applied_twice(aredis: aioredis.Redis) -> None:
    feature_specs = specs()[:3]
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g")
    events = make_events(1000, seed=2)
    await apply_all(store, features, events, batch=300)
    before = await aredis.get(I1_KEY)
    # a crash before the Kafka commit: the same records come again, in other batch sizes
    combiner, _ = await apply_all(store, features, events[:800], batch=170)
    assert combiner.stats.skipped_replayed > 0
    assert await aredis.get(I1_KEY) == before


@pytest.mark.parametrize(("reply", "raised"), [
    ("BUSY Redis is busy running a script", ResponseError),  # read to the end, then raised
    ("LOADING Redis is loading the dataset in memory", BusyLoadingError),  # raised at once
])
async def test_a_redis_that_lost_the_script_gets_it_again_and_nothing_twice(
        aredis: aioredis.Redis, reply: str, raised: type[Exception]) -> None:
    """Writes go out as EVALSHA in one write per wave: a Redis restarted or flushed between two
    batches (SCRIPT FLUSH here) answers NOSCRIPT, and the wave is sent again with the script
    loaded; values stay the oracle's. A wave refused for another reason (BUSY, LOADING) raises,
    and its connection is not handed back with replies unread: the next batch reads its own
    replies."""
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g")
    events = make_events(3000, seed=4)
    await apply_all(store, features, events[:1000], batch=400)
    await aredis.script_flush()
    await apply_all(store, features, events[1000:2000], batch=400, max_cost=50)
    with pytest.raises(raised, match=r"busy running|loading the dataset"):
        await Refused(aredis, reply).apply(store, features, events[2000:2400])
    await apply_all(store, features, events[2000:], batch=400)
    oracle = Oracle(feature_specs)
    oracle.feed("events", sorted(events, key=lambda e: (e[0], e[1])))
    client = AsyncFeatureClient(aredis, feature_specs, "ep")
    assert await compare_with_oracle(client, feature_specs, oracle) > 500


async def test_scripts_lost_again_and_again_mid_batch_are_loaded_and_nothing_twice(
        aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """The waves of a batch stream on one connection: Redis losing the script between two of
    them (a restart, SCRIPT FLUSH here, before every third write, as a flush loop did to the
    worker in outside testing) answers NOSCRIPT to the rest, some waves may already be
    unanswered behind the refused one; the script is loaded and the batch resumes after the
    last acknowledged slice (what ran answers 'again'), as often as it takes while each load
    gets some waves through; values stay the oracle's."""
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g")
    events = make_events(3000, seed=5)
    await apply_all(store, features, events[:1000], batch=1000)
    sends = 0
    original = wire.send

    async def flushing_send(conn: Any, commands: list[tuple[Any, ...]]) -> None:
        nonlocal sends
        sends += 1
        if sends % 3 == 0:  # again and again, as a Redis flushed in a loop
            await aredis.script_flush()
        await original(conn, commands)

    monkeypatch.setattr(wire, "send", flushing_send)
    await apply_all(store, features, events[1000:], batch=2000, max_cost=30)
    assert sends > 10  # the batch went out in many waves, the flush in its middle
    oracle = Oracle(feature_specs)
    oracle.feed("events", sorted(events, key=lambda e: (e[0], e[1])))
    client = AsyncFeatureClient(aredis, feature_specs, "ep")
    assert await compare_with_oracle(client, feature_specs, oracle) > 500


class Refused:
    """A batch whose every script Redis answers with ``reply``: the write script swapped for
    one that says so."""

    def __init__(self, aredis: aioredis.Redis, reply: str) -> None:
        self.aredis = aredis
        self.reply = reply

    async def apply(self, store: FeatureStore, features: list[CompiledFeature],
                    events: list[tuple[int, int, dict[str, Any]]]) -> None:
        decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False))
        tps = sorted({f"events:{p}" for p, _, _ in events})
        combiner = BatchCombiner("ep", features, await store.fences(tps), shards=store.shards)
        for partition, offset, record in events:
            combiner.add(f"events:{partition}", "events", offset,
                         decoder.decode(json.dumps(record).encode()))
        real = store._apply
        store._apply = self.aredis.register_script(f"return redis.error_reply('{self.reply}')")
        await self.aredis.script_load(store._apply.script)  # the waves get the reply, not NOSCRIPT
        try:
            await store.apply(combiner.plan())
        finally:
            store._apply = real


async def test_a_stale_writer_is_fenced_off(aredis: aioredis.Redis) -> None:
    feature_specs = specs()[:1]
    features = [CompiledFeature(s, 0) for s in feature_specs]
    store = FeatureStore(aredis, "ep", "g")
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False))
    record = decoder.decode(json.dumps({"timestamp": T0, "user_id": "u", "item_id": "i1",
                                        "action": "view"}).encode())
    old_owner, new_owner = (BatchCombiner("ep", features) for _ in range(2))
    positions = await store.positions(["events:0"])
    old_owner.reset(positions)
    new_owner.reset(positions)
    for offset in range(5):
        new_owner.add("events:0", "events", offset, record)
        if offset < 3:  # the old owner's batch ended earlier
            old_owner.add("events:0", "events", offset, record)
    plan = new_owner.plan()
    assert await store.apply(plan) is None
    conflict = await store.apply(old_owner.plan())
    assert conflict is not None and conflict.tp == "events:0" and conflict.current.offset == 4
    # the same write again (its reply lost to a timeout, say): every slice already stands at
    # its new position, so nothing is written twice
    plan.applied = 0
    assert await store.apply(plan) is None
    client = AsyncFeatureClient(aredis, feature_specs, "ep")
    value = await client.get("item", "i1", ["n"], at_ms=T0 + 60_000)
    assert value["n"].value == 5


async def views_of_one_item(aredis: aioredis.Redis, start: int, every_ms: int, count: int,
                            batch: int) -> tuple[list[FeatureSpec], FeatureStore,
                                                 list[tuple[int, int, dict[str, Any]]]]:
    """``count`` views of item i1, ``every_ms`` apart from ``start``, applied for the count
    feature ``n`` alone in batches of ``batch``."""
    feature_specs = specs()[:1]
    store = FeatureStore(aredis, "ep", "g")
    events = [(0, i, {"timestamp": start + i * every_ms, "user_id": "u", "item_id": "i1",
                      "action": "view"}) for i in range(count)]
    await apply_all(store, [CompiledFeature(feature_specs[0], 0)], events, batch=batch)
    return feature_specs, store, events


async def test_old_windows_are_pruned_and_keys_expire(aredis: aioredis.Redis) -> None:
    await views_of_one_item(aredis, T0, 60_000, 60, batch=1)
    entry = msgpack.unpackb(await aredis.get(I1_KEY), raw=True)[b"n"]
    step, kind, newest, head, _ttl = struct.unpack_from("<qcqqq", entry)
    ring = list(struct.unpack_from(f"<{(len(entry) - 33) // 8}d", entry, 33))
    # 2 min window at a 30 s step (4 windows per event), 20 s lateness (one more step back), and
    # the window a reader sees while the newest event's step is open: 6 slots, whatever the history
    assert (newest, step, kind, len(ring)) == (T0 + 59 * 60_000, 30_000, b"I", 6)
    assert head == newest - newest % step + 120_000
    # one event a minute: the two windows ending after the newest event's step hold only it,
    # every older 2-minute window holds two
    assert ring == [1, 1, 2, 2, 2, 2]
    ttl_ms = await aredis.pttl(I1_KEY)
    assert 0 < ttl_ms <= 3_600_000


@pytest.mark.parametrize("lease_ms", [0, 86_400_000])
async def test_keys_live_their_ttl_or_the_writers_lease(aredis: aioredis.Redis,
                                                        lease_ms: int) -> None:
    """The worker's keys (features and sketch buckets) carry their TTL; a training set's replay
    writes at a far faster pace than the archive's time and models the expiry itself
    (eventpulse/offline/expiry.py), so its keys live a lease that outlasts the build."""
    feature_specs = specs()
    store = FeatureStore(aredis, "ep", "g")
    await apply_all(store, [CompiledFeature(s, i) for i, s in enumerate(feature_specs)],
                    make_events(400), batch=100, lease_ms=lease_ms)
    entity_keys = [key async for key in aredis.scan_iter("ep:{*}:*")]
    sketches = [key for key in entity_keys if b":hll:" in key or b":sk:" in key]
    features = [key for key in entity_keys if key.endswith(b":f")]
    assert sketches and len(features) >= 8  # eight items, item-device pairs
    ttls = {key: await aredis.pttl(key) for key in sketches + features}
    if lease_ms:  # every spec's TTL is the default, an hour
        assert all(3_600_000 < ttl <= lease_ms for ttl in ttls.values()), ttls
    else:
        assert all(0 < ttl <= 3_600_000 for ttl in ttls.values()), ttls


async def test_rings_as_large_as_a_feature_may_declare_are_written_and_read(
        aredis: aioredis.Redis) -> None:
    """``spec.MAX_RING_NUMBERS`` bounds a feature's ring (windows kept x numbers per window):
    Redis' Lua refuses to unpack much more in one call, which failed every write of a feature
    with a day of lateness over 10 s steps (found by outside testing). At the bound, for a kind
    of each stride, apply.lua writes and the values read back; one window more is refused when
    the job is read."""
    from eventpulse.tables.spec import MAX_RING_NUMBERS

    def f(name: str, aggregation: str, windows: int, **extra: Any) -> FeatureSpec:
        return FeatureSpec.model_validate({
            "name": name, "topic": "events", "entity": "item", "key": "item_id",
            "aggregation": aggregation, **extra,
            "window": {"size": "1s", "lateness": f"{windows - 2}s"}})

    feature_specs = [f("n", "count", MAX_RING_NUMBERS), f("watch_mean", "mean",
                                                          MAX_RING_NUMBERS // 2, value="watch"),
                     f("last_device", "last", MAX_RING_NUMBERS // 2, value="device")]
    for spec in feature_specs:
        with pytest.raises(ValueError, match=r"use a larger window\.step or a smaller"):
            f(spec.name, spec.aggregation, spec.window.ring_slots + 1, value=spec.value)
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g")
    newest = T0 + 2_999_500
    # the newest record, then one as late as the lateness allows, then more in the newest second
    events = [(0, 0, {"timestamp": newest, "user_id": "u", "item_id": "i1", "action": "view",
                      "watch": 1.0, "device": "ios"}),
              (0, 1, {"timestamp": T0 + 1_500, "user_id": "u", "item_id": "i1",
                      "action": "view", "watch": 5.0, "device": "web"}),
              (0, 2, {"timestamp": newest + 100, "user_id": "u", "item_id": "i1",
                      "action": "view", "watch": 3.0, "device": "tv"})]
    await apply_all(store, features, events, batch=3)
    client = AsyncFeatureClient(aredis, feature_specs, "ep")
    names = [s.name for s in feature_specs]
    now = await client.get("item", "i1", names, at_ms=newest - newest % 1_000 + 1_000)
    assert (now["n"].value, now["watch_mean"].value, now["last_device"].value) == (2, 2.0, "tv")
    early = await client.get("item", "i1", ["n"], at_ms=T0 + 2_000)
    assert early["n"].value == 1


@pytest.mark.parametrize("t0", [100_000_000_000, 253_402_300_799_999 - 3_600_000])
async def test_records_at_the_ends_of_the_accepted_range_are_read_back_at_their_moment(
        aredis: aioredis.Redis, redis_url: str, t0: int) -> None:
    """Records are taken from 1970 (the first epoch milliseconds not read as seconds) to the
    end of year 9999, and reads at their moments answer with them (records before 1970 were
    stored where no read reached them and are now refused, tests/test_decode.py)."""
    feature_specs, store, events = await views_of_one_item(aredis, t0, 10_000, 12, batch=5)
    newest = t0 + 11 * 10_000
    at = newest - newest % 30_000 + 30_000  # the newest event's step closed: 2 min of events
    await store.publish(feature_specs)  # what FeatureClient.connect reads the features from
    reader = AsyncFeatureClient(aredis, feature_specs, "ep")
    sync = FeatureClient.connect(redis_url)
    try:
        for read in (reader.get, sync.get):
            result = read("item", "i1", ["n"], at_ms=at)
            value = (await result if not isinstance(result, dict) else result)["n"]
            assert value.value == sum(1 for _, _, r in events
                                      if at - 120_000 <= r["timestamp"] < at), t0
            assert value.window_end_ms == at and value.status == "present"
    finally:
        sync.close()


async def test_statuses_and_the_sync_client(aredis: aioredis.Redis, redis_url: str) -> None:
    feature_specs = [FeatureSpec.model_validate(
        {"name": "n", "topic": "events", "entity": "item", "key": "item_id", "aggregation": "count",
         "window": {"size": "1m", "step": "10s", "type": "hopping"}, "max_age": "5m"})]
    features = [CompiledFeature(feature_specs[0], 0)]
    store = FeatureStore(aredis, "ep", "g")
    await store.publish(feature_specs)
    # joined mid-stream: offsets from 1000, so events before T0 may exist that nobody saw
    events = [(0, 1000 + i, {"timestamp": T0 + i * 1000, "user_id": "u", "item_id": "i1",
                             "action": "view"}) for i in range(120)]
    client = FeatureClient.connect(redis_url)
    try:
        await apply_all(store, features, events[:35], batch=50)
        early = client.get("item", "i1", at_ms=T0 + 30_000)["n"]
        assert early.status == "partial" and early.value == 30  # window reaches before T0
        await apply_all(store, features, events, batch=50)
        full = client.get("item", "i1", at_ms=T0 + 120_000)["n"]
        assert full.status == "present" and full.value == 60
        assert full.window_start_ms == T0 + 60_000 and full.newest_event_ms == T0 + 119_000
        # further back than the kept windows (the newest event's step, less lateness) is unknown
        history = client.get("item", "i1", at_ms=T0 + 100_000)["n"]
        assert history.status == "missing" and history.value is None
        quiet = client.get("item", "i1", at_ms=T0 + 20 * 60_000)["n"]
        assert quiet.status == "stale" and quiet.value == 0  # the count decayed
        many = client.get_many("item", ["i1", "nobody"], at_ms=T0 + 120_000)
        assert many["nobody"]["n"].status == "missing"
    finally:
        client.close()


async def test_nothing_is_partial_when_every_partition_was_read_from_its_start(
        aredis: aioredis.Redis) -> None:
    """The demo's case: topics created empty and read from offset 0 miss nothing, so a window
    reaching back before the first event is whole; ``last`` is never partial."""
    feature_specs = [_feature("n", {"size": "1m", "step": "10s", "type": "hopping"}),
                     _feature("device", {"size": "1m", "step": "10s", "type": "hopping"},
                              aggregation="last", value="device")]
    features = [CompiledFeature(spec, i) for i, spec in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g")
    await store.publish(feature_specs)
    client = AsyncFeatureClient(aredis, feature_specs, "ep")

    def view(partition: int, offset: int, ts: int) -> tuple[int, int, dict[str, Any]]:
        return (partition, offset, {"timestamp": ts, "user_id": "u", "item_id": "i1",
                                    "action": "view", "device": "ios"})

    await apply_all(store, features, [view(0, i, T0 + i * 1000) for i in range(20)], batch=8)
    early = await client.get("item", "i1", at_ms=T0 + 20_000)
    assert (early["n"].status, early["n"].value) == ("present", 20)
    assert (early["device"].status, early["device"].value) == ("present", "ios")
    # another partition joins mid-stream (its log starts at offset 500): windows reaching back
    # before its first event become partial, except last
    await apply_all(store, features, [view(1, 500 + i, T0 + 15_000 + i * 1000) for i in range(5)],
                    batch=8)
    later = await client.get("item", "i1", at_ms=T0 + 20_000)
    assert (later["n"].status, later["n"].value) == ("partial", 25)
    assert later["device"].status == "present"
    whole = await client.get("item", "i1", at_ms=T0 + 80_000)
    assert whole["n"].status == "present"  # the window starts after T0 + 15 s


def _feature(name: str, window: dict[str, str], **extra: Any) -> FeatureSpec:
    return FeatureSpec.model_validate({"name": name, "topic": "events", "entity": "item",
                                       "key": "item_id", "aggregation": "count",
                                       "window": window, **extra})


async def test_a_feature_redefined_with_another_window_starts_afresh(
        aredis: aioredis.Redis) -> None:
    store = FeatureStore(aredis, "ep", "g")
    old = _feature("n", {"size": "1m"})
    events = [(0, i, {"timestamp": T0 + i * 1000, "user_id": "u", "item_id": "i1",
                      "action": "view"}) for i in range(30)]
    await apply_all(store, [CompiledFeature(old, 0)], events, batch=10)
    reader_of_old = AsyncFeatureClient(aredis, [old], "ep")
    assert (await reader_of_old.get("item", "i1", at_ms=T0 + 60_000))["n"].value == 30
    # the same name, now a 2-minute window sliding by 30 s: the old ring must not be read as it
    new = _feature("n", {"type": "hopping", "size": "2m", "step": "30s"})
    later = [(0, 30 + i, {"timestamp": T0 + 60_000 + i * 1000, "user_id": "u", "item_id": "i1",
                          "action": "view"}) for i in range(5)]
    await apply_all(store, [CompiledFeature(new, 0)], later, batch=10)
    reader_of_new = AsyncFeatureClient(aredis, [new], "ep")
    fresh = (await reader_of_new.get("item", "i1", at_ms=T0 + 90_000))["n"]
    assert fresh.value == 5 and fresh.newest_event_ms == T0 + 64_000
    # a reader still holding the old definition sees no entry it can trust
    stale_view = (await reader_of_old.get("item", "i1", at_ms=T0 + 120_000))["n"]
    assert stale_view.status == "missing" and stale_view.newest_event_ms is None


async def test_a_feature_nobody_updates_leaves_the_entity_after_its_ttl(
        aredis: aioredis.Redis) -> None:
    store = FeatureStore(aredis, "ep", "g")
    short = _feature("short", {"size": "1m"}, where={"action": "click"}, ttl="2m")
    long = _feature("long", {"size": "1m"}, ttl="2h")
    features = [CompiledFeature(short, 0), CompiledFeature(long, 1)]
    clicks = [(0, 0, {"timestamp": T0, "user_id": "u", "item_id": "i1", "action": "click"})]
    views = [(0, 1 + i, {"timestamp": T0 + (1 + i) * 60_000, "user_id": "u", "item_id": "i1",
                         "action": "view"}) for i in range(5)]
    await apply_all(store, features, clicks + views, batch=1)
    entity = msgpack.unpackb(await aredis.get(I1_KEY), raw=True)
    # the click is more than 2 minutes older than the entity's newest event: its entry is gone,
    # and the key lives as long as the longest TTL left
    assert set(entity) == {b"long"}
    assert 2 * 3_600_000 - 60_000 < await aredis.pttl(I1_KEY) <= 2 * 3_600_000
    reader = AsyncFeatureClient(aredis, [short, long], "ep")
    values = await reader.get("item", "i1", at_ms=T0 + 6 * 60_000)
    assert values["short"].status == "missing" and values["long"].value == 1


def test_entities_land_in_the_shard_the_layout_documents() -> None:
    """The combiner's inline shard (a CRC-32 continued from the entity type's) is shard_of's,
    and the example in docs/redis-layout.md holds."""
    features = [CompiledFeature(s, i) for i, s in enumerate(specs())]
    combiner = BatchCombiner("ep", features, {"events:0": None}, shards=64)
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False))
    for offset, item in enumerate(["i1", "i2", "é-ü", "x" * 300]):
        record = {"timestamp": T0, "user_id": "u1", "item_id": item, "action": "view"}
        combiner.add("events:0", "events", offset, decoder.decode(json.dumps(record).encode()))
        assert item in combiner.open[shard_of("item", item, 64)][0]
    assert shard_of("user", "u1", 64) == 56


async def test_layout_2_offsets_migrate_into_every_fence(aredis: aioredis.Redis) -> None:
    """A layout-2 Redis: its offsets hash becomes every shard's fence, then goes; another shard
    count is refused with the setting to use."""
    await aredis.hset("ep:offsets:g", mapping={"events:0": "41:1790000000000", "events:1": "7:5"})
    store = FeatureStore(aredis, "ep", "g", shards=4)
    assert await store.prepare_layout() == 2
    assert not await aredis.exists("ep:offsets:g")
    fences = await store.fences(["events:0", "events:1"])
    assert all(p == PartitionPosition(41, 1790000000000) for p in fences["events:0"])
    assert len(fences["events:0"]) == 5 and await store.positions(["events:1"]) == {
        "events:1": PartitionPosition(7, 5)}
    assert await store.prepare_layout() == 0  # idempotent
    assert await aredis.hget(meta_key("ep"), "layout") == b"4"
    with pytest.raises(LayoutError, match="EVENTPULSE_REDIS_SHARDS=4"):
        await FeatureStore(aredis, "ep", "g", shards=8).prepare_layout()


async def test_a_sketch_value_that_cannot_be_read_is_missing_not_a_failed_read(
        aredis: aioredis.Redis, redis_url: str) -> None:
    """F5 of the outside test of issue 10: a p95 over 1.797e308 (stored before numbers were
    bounded, or by another writer) overflows when read back; it reads as missing, and every
    other entity and feature of the same get_many reads as usual."""
    from eventpulse.streams.schemas import InferenceLog

    feature_specs = [FeatureSpec.model_validate(
        {"name": name, "topic": "inf", "entity": "m", "key": "model", "aggregation": agg,
         "value": "v", "window": {"size": "1m"}}) for name, agg in [("p", "p95"), ("s", "sum")]]
    features = [CompiledFeature(spec, i) for i, spec in enumerate(feature_specs)]
    store = FeatureStore(aredis, "ep", "g")
    await store.publish(feature_specs)
    combiner = BatchCombiner("ep", features, {"inf:0": None})
    for offset, (model, v) in enumerate([("bad", 1.7976931348623157e308), ("good", 12.0)]):
        record = InferenceLog.model_validate({"timestamp": T0 + offset, "model": model,
                                              "latency_ms": 1, "status": 200, "v": v})
        combiner.add("inf:0", "inf", offset, record)
    assert await store.apply(combiner.plan()) is None
    at = T0 + 60_000
    for read in (AsyncFeatureClient(aredis, feature_specs, "ep").get_many, None):
        if read is None:
            sync = FeatureClient.connect(redis_url)
            try:
                got = sync.get_many("m", ["bad", "good"], at_ms=at)
            finally:
                sync.close()
        else:
            got = await read("m", ["bad", "good"], at_ms=at)
        assert got["bad"]["p"].status == "missing" and got["bad"]["p"].value is None
        assert got["bad"]["s"].value == 1.7976931348623157e308  # its other feature reads
        assert got["good"]["p"].status == "present"
        assert abs(got["good"]["p"].value - 12.0) <= 0.12 and got["good"]["s"].value == 12.0


async def _model_latencies(aredis: aioredis.Redis, features: list[tuple[str, str]],
                           models: list[str]) -> list[FeatureSpec]:
    """Features (name, aggregation) of value ``v`` per model over 1-minute windows, published,
    and one inference log of ``v`` 12.0 per model written (at ``T0`` on)."""
    from eventpulse.streams.schemas import InferenceLog

    feature_specs = [FeatureSpec.model_validate(
        {"name": name, "topic": "inf", "entity": "m", "key": "model", "aggregation": agg,
         "value": "v", "window": {"size": "1m"}}) for name, agg in features]
    store = FeatureStore(aredis, "ep", "g")
    await store.publish(feature_specs)
    combiner = BatchCombiner("ep", [CompiledFeature(s, i) for i, s in enumerate(feature_specs)],
                             {"inf:0": None})
    for offset, model in enumerate(models):
        combiner.add("inf:0", "inf", offset, InferenceLog.model_validate(
            {"timestamp": T0 + offset, "model": model, "latency_ms": 1, "status": 200,
             "v": 12.0}))
    assert await store.apply(combiner.plan()) is None
    return feature_specs


@pytest.mark.parametrize(("field", "count"), [
    (" 100", "5"), ("+100", "5"), ("0100", "5"), ("1_00", "5"), ("\u0661\u0660\u0660", "5"),
    ("n0100", "5"), ("-0", "5"), ("100", " 5"), ("100", "+5"), ("100", "100_000"),
    ("100", "-150"), ("100", "2.5"), ("notanumber", "5")])
async def test_a_sketch_bin_eventpulse_never_writes_reads_as_missing(
        aredis: aioredis.Redis, redis_url: str, field: str, count: str) -> None:
    """Found by an outside test: bins and counts Python's int() accepts (" 100", "+100",
    "1_00", other scripts' digits) or HINCRBY never leaves (negative counts) were read as
    numbers and moved the percentile; they mark a hash written by something else, so the value
    reads as missing, the other entities' as usual, over RESP2 and RESP3 alike."""
    from eventpulse.tables.keys import entity_key, sketch_key

    feature_specs = await _model_latencies(aredis, [("p", "p95")], ["bad", "good"])
    store = FeatureStore(aredis, "ep", "g")
    bucket = T0 - T0 % 60_000
    await aredis.hset(sketch_key(entity_key("ep", "m", "bad", store.shards), "p", bucket),
                      field, count)
    at = T0 + 60_000
    sync = FeatureClient.connect(redis_url)
    try:
        for got in (sync.get_many("m", ["bad", "good"], at_ms=at),
                    await AsyncFeatureClient(aredis, feature_specs, "ep").get_many(
                        "m", ["bad", "good"], at_ms=at)):
            assert got["bad"]["p"].status == "missing", got["bad"]["p"]
            assert got["good"]["p"].status == "present"
            assert abs(got["good"]["p"].value - 12.0) <= 0.12
    finally:
        sync.close()


async def test_a_sketch_key_of_another_type_reads_as_missing_and_the_read_stands(
        aredis: aioredis.Redis, redis_url: str) -> None:
    """A bucket key some other program made another type (Redis answers that command alone
    with WRONGTYPE) cost the whole get_many before: now the value it was for reads as missing,
    like junk bins, and the other entities and features of the read as usual; a meta hash
    that is not a hash still fails the read (no value of the namespace can be trusted)."""
    from eventpulse.tables.keys import entity_key, hll_key, sketch_key

    feature_specs = await _model_latencies(
        aredis, [("p", "p95"), ("d", "distinct"), ("s", "sum")], ["hashless", "hllless", "good"])
    store = FeatureStore(aredis, "ep", "g")
    bucket = T0 - T0 % 60_000
    await aredis.set(sketch_key(entity_key("ep", "m", "hashless", store.shards), "p", bucket),
                     "not a hash")
    hll = hll_key(entity_key("ep", "m", "hllless", store.shards), "d", bucket)
    await aredis.delete(hll)
    await aredis.hset(hll, "not", "a hyperloglog")
    at = T0 + 60_000
    ids = ["hashless", "hllless", "good"]
    sync = FeatureClient.connect(redis_url)
    reader = AsyncFeatureClient(aredis, feature_specs, "ep")
    try:
        for _ in range(2):  # the connections stay in step for the next read
            for got in (sync.get_many("m", ids, at_ms=at), await reader.get_many("m", ids, at_ms=at)):
                assert got["hashless"]["p"].status == "missing"
                assert got["hllless"]["d"].status == "missing"
                assert got["hashless"]["d"].value == 1 and got["hllless"]["p"].value is not None
                assert got["hashless"]["s"].value == got["hllless"]["s"].value == 12.0
                assert got["good"]["d"].value == 1 and abs(got["good"]["p"].value - 12.0) <= 0.12
        assert not await aredis.exists(meta_key("ep"))  # no worker prepared this namespace
        await aredis.set(meta_key("ep"), "not a hash")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            sync.get_many("m", ids, at_ms=at)
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await reader.get_many("m", ids, at_ms=at)
        await aredis.delete(meta_key("ep"))
        assert sync.get_many("m", ["good"], at_ms=at)["good"]["d"].value == 1
    finally:
        sync.close()


async def test_a_bad_bucket_mid_window_leaves_the_other_entities_their_own_values(
        aredis: aioredis.Redis, redis_url: str) -> None:
    """Found by an outside test: a percentile window has a bucket key per step; one made
    another type in the middle of the window stopped the read of that entity's buckets there,
    and the entities after it read the buckets left over, each the one before's value, as
    present. Now only that entity's value is missing."""
    from eventpulse.streams.schemas import InferenceLog
    from eventpulse.tables.keys import entity_key, sketch_key

    feature_specs = [FeatureSpec.model_validate(
        {"name": "p", "topic": "inf", "entity": "m", "key": "model", "aggregation": "p95",
         "value": "v", "window": {"type": "hopping", "size": "5m", "step": "1m"}})]
    store = FeatureStore(aredis, "ep", "g")
    await store.publish(feature_specs)
    models = {"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0}
    combiner = BatchCombiner("ep", [CompiledFeature(feature_specs[0], 0)], {"inf:0": None})
    offset = 0
    for minute in range(4):  # four buckets per model
        for model, v in models.items():
            combiner.add("inf:0", "inf", offset, InferenceLog.model_validate(
                {"timestamp": T0 + minute * 60_000, "model": model, "latency_ms": 1,
                 "status": 200, "v": v}))
            offset += 1
    assert await store.apply(combiner.plan()) is None
    at = T0 + 4 * 60_000
    start = T0 - T0 % 60_000
    reader = AsyncFeatureClient(aredis, feature_specs, "ep")
    sync = FeatureClient.connect(redis_url)
    try:
        for bucket in (start + 60_000, start):  # a middle bucket, then the first
            await aredis.set(sketch_key(entity_key("ep", "m", "b", store.shards), "p", bucket),
                             "not a hash")
            for got in (await reader.get_many("m", list(models), at_ms=at),
                        sync.get_many("m", list(models), at_ms=at)):
                assert got["b"]["p"].status == "missing"
                for model in "acd":
                    value = got[model]["p"]
                    assert value.status == "present", (model, value)
                    assert abs(value.value - models[model]) <= 0.01 * models[model], (model, value)
    finally:
        sync.close()


async def test_reads_refuse_what_is_not_an_id_a_name_or_a_moment(
        aredis: aioredis.Redis, redis_url: str) -> None:
    """Found by an outside test: an int id raised AttributeError from deep in the read, a
    moment past 64 bits an OverflowError, and a name given as a str read as its letters."""
    feature_specs = await _model_latencies(aredis, [("s", "sum")], ["m1"])
    sync = FeatureClient.connect(redis_url)
    reader = AsyncFeatureClient(aredis, feature_specs, "ep")
    at = T0 + 60_000
    try:
        for get_many in (sync.get_many, reader.get_many):
            async def read(*args: Any, **kwargs: Any) -> Any:
                result = get_many(*args, **kwargs)  # noqa: B023 (called at once)
                return await result if not isinstance(result, dict) else result

            for ids, kind in [([123], "entity ids are str, got int 123"),
                              ([None], "entity ids are str, got NoneType"),
                              ([b"m1"], "entity ids are str, got bytes"),
                              ("m1", "ids is a list of entity ids, not one str")]:
                with pytest.raises(TypeError, match=kind):
                    await read("m", ids, at_ms=at)
            with pytest.raises(TypeError, match="names is a list of feature names"):
                await read("m", ["m1"], "s", at_ms=at)
            for moment in (10**20, -1, True):
                with pytest.raises(ValueError, match=r"at_ms is epoch milliseconds from 0 \(1970\)"):
                    await read("m", ["m1"], at_ms=moment)
            with pytest.raises(TypeError, match="at_ms is epoch milliseconds"):
                await read("m", ["m1"], at_ms=1.7e12)
            assert (await read("m", ["m1"], ["s"], at_ms=at))["m1"]["s"].value == 12.0
    finally:
        sync.close()


async def test_the_cost_model_learns_under_a_small_budget(aredis: aioredis.Redis) -> None:
    """A 1 ms budget allows slices far below 100 units: the model must still learn from the
    scripts' own run times (a fixed 100-unit floor left it at its starting guess, so slices
    stayed about 5 times smaller than the budget allowed), and ignore a shard's small remainder
    at a batch's end."""
    features = [CompiledFeature(s, i) for i, s in enumerate(specs())]
    store = FeatureStore(aredis, "ep", "g", shards=2)
    guess = store.cost.ms_per_unit
    assert store.cost.max_cost(1.0) < 100
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False))
    events = make_events(3000)
    for start in range(0, len(events), 500):
        combiner = BatchCombiner("ep", features, shards=store.shards,
                                 max_cost=store.cost.max_cost(1.0))
        combiner.reset(await store.fences(["events:0", "events:1"]))
        for partition, offset, record in events[start:start + 500]:
            combiner.add(f"events:{partition}", "events", offset,
                         decoder.decode(json.dumps(record).encode()))
        assert await store.apply(combiner.plan()) is None
    assert len(store.cost.recent) >= 20
    assert store.cost.ms_per_unit != guess
    store.cost.max_cost(1.0)
    learnt = list(store.cost.recent)
    store.cost.observe(1, 0.01)  # a 1-unit remainder that took 10 ms: not a unit's cost
    assert list(store.cost.recent) == learnt


#: values a `last` feature must give back as they came, through Lua (whose numbers are doubles
#: and whose tables have no holes, nor an empty object apart from an empty array)
AWKWARD_LAST_VALUES: list[Any] = [
    [1, None, 2], {}, {"a": None}, [False, None], {"k2": None, "k1": True}, [], [[], {}],
    1.0, -0.0, 2.0**60, 2**60, -(2**63), 2**53, 2**53 + 1, 0.1, True, False, 0, "plain", "",
    "\x00not json", "\x00[1,2]", "\x00ep-json:[1,2]", "\x00ep-json:", "é\u2028",
    {"n": 3, "v": [1, None, 2.5e-7]}]


@pytest.mark.parametrize("compiled", [True, False])
async def test_a_last_value_reads_back_as_it_came(aredis: aioredis.Redis,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  compiled: bool) -> None:
    """Found by an outside test: ``[1, null, 2]`` was accepted and read as missing, ``{}`` as
    ``[]``, ``1.0`` as ``1``. Every value, through the compiled and the Python read loop."""
    from eventpulse.tables import ringread
    assert ringread.ACCELERATED  # the install builds it (test_kinds); else no comparison
    if not compiled:
        monkeypatch.setattr(ringread, "read_column", ringread.read_column_python)
        monkeypatch.setattr(ringread, "EntityEntries", ringread.EntityEntriesPython)
    spec = _feature("blob_last", {"size": "1m"}, aggregation="last", value="blob")
    store = FeatureStore(aredis, "ep", "g")
    events = [(0, k, {"timestamp": T0 + k, "user_id": "u", "item_id": f"i{k}", "action": "view",
                      "blob": value}) for k, value in enumerate(AWKWARD_LAST_VALUES)]
    await apply_all(store, [CompiledFeature(spec, 0)], events, batch=7)
    client = AsyncFeatureClient(aredis, [spec], "ep")
    ids = [f"i{k}" for k in range(len(AWKWARD_LAST_VALUES))]
    read = await client.get_many("item", ids, at_ms=T0 + 60_000)
    for k, value in enumerate(AWKWARD_LAST_VALUES):
        got = read[f"i{k}"]["blob_last"]
        assert got.status == "present", (value, got)
        # equal, and of the same JSON types (1.0 is not 1, -0.0 keeps its sign)
        assert json.dumps(got.value) == json.dumps(value), (value, got.value)


@pytest.mark.parametrize("compiled", [True, False])
async def test_a_last_string_written_before_the_escape_reads_as_it_was(
        aredis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """Entries written before values were escaped held strings as they came: one beginning with
    U+0000 must still read as itself, never fail the read (outside tests: an old ``"\\x00"``
    raised in ``get_many``, and with it the alert tick; ``"\\x00[1,2]"`` read as a list; then
    text after the prefix nested 100k deep raised, ``NaN`` read as a float)."""
    from eventpulse.tables import kinds, ringread
    from eventpulse.tables.keys import features_key

    if not compiled:
        monkeypatch.setattr(ringread, "read_column", ringread.read_column_python)
        monkeypatch.setattr(ringread, "EntityEntries", ringread.EntityEntriesPython)
    spec = _feature("blob_last", {"size": "1m"}, aggregation="last", value="blob")
    store = FeatureStore(aredis, "ep", "g")
    prefix = "\x00ep-json:"  # text after it no writer makes: read as the string, never raise
    old = ["\x00", "\x00abc", "\x00[1,2]", prefix + "not json", prefix + "NaN",
           prefix + "-Infinity", prefix + "1e999", prefix + "[" * 100_000 + "]" * 100_000,
           prefix + "[" * 5_000]
    events = [(0, k, {"timestamp": T0 + k, "user_id": "u", "item_id": f"old{k}",
                      "action": "view", "blob": "plain"}) for k in range(len(old))]
    await apply_all(store, [CompiledFeature(spec, 0)], events, batch=10)
    for k, text in enumerate(old):  # the ring as the previous release wrote it
        key = features_key("ep", "item", f"old{k}", DEFAULT_SHARDS)
        entity = msgpack.unpackb(await aredis.get(key), raw=True)  # as Lua packs: raw strings
        entry = entity[b"blob_last"]
        ring = msgpack.unpackb(entry[kinds.HEADER_SIZE:])
        ring = [text if j % 2 and ring[j - 1] else v for j, v in enumerate(ring)]
        entity[b"blob_last"] = entry[:kinds.HEADER_SIZE] + msgpack.packb(ring)
        await aredis.set(key, msgpack.packb(entity, use_bin_type=False), keepttl=True)
    client = AsyncFeatureClient(aredis, [spec], "ep")
    read = await client.get_many("item", [f"old{k}" for k in range(len(old))],
                                 at_ms=T0 + 60_000)
    got = [read[f"old{k}"]["blob_last"].value for k in range(len(old))]
    assert got == old
