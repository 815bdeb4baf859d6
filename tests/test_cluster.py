"""eventpulse on a real Redis Cluster (3 primaries, one replica each): the same write path and
reads as on one Redis, every script within one slot, reads that follow a resharding."""

from __future__ import annotations

import asyncio
import random
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from eventpulse.alerts.outbox import AlertStore
from eventpulse.config import parse_config
from eventpulse.local.servers import LocalRedis, LocalRedisCluster, TansuBroker
from eventpulse.redisconn import RedisModeError, check_mode, connect, connect_async
from eventpulse.redisretry import is_transient
from eventpulse.tables import relayout
from eventpulse.tables.client import AsyncFeatureClient, FeatureClient
from eventpulse.tables.keys import features_key, meta_key
from eventpulse.tables.spec import CompiledFeature
from eventpulse.tables.store import FeatureStore, LayoutError, ReplicaLag
from tests import test_exactly_once as exactly_once
from tests.conftest import WorkerProcess, unique, wait_until
from tests.oracle import Oracle, close_enough
from tests.test_feature_store import apply_all, compare_with_oracle, make_events, specs


async def test_the_write_path_on_a_cluster_equals_the_oracle(
        redis_cluster: LocalRedisCluster, acluster: aioredis.Redis) -> None:
    """Every aggregation, written in small slices over 16 shards spread on 3 primaries, reads
    back equal to the oracle, with the async and the blocking client."""
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(acluster, "ep", "g", shards=16)
    await store.prepare_layout()
    await store.publish(feature_specs)
    events = make_events(3000)
    await apply_all(store, features, events, batch=500, max_cost=40)
    # the shards' keys really are spread over every primary
    primaries = {acluster.get_node_from_key(features_key("ep", "item", f"i{i}", 16)).port
                 for i in range(1, 9)}
    assert len(primaries) > 1
    oracle = Oracle(feature_specs)
    oracle.feed("events", sorted(events, key=lambda e: (e[0], e[1])))
    reader = await AsyncFeatureClient.connect(redis_cluster.url)
    assert reader.shards == 16
    try:
        assert await compare_with_oracle(reader, feature_specs, oracle) > 300
    finally:
        await reader.aclose()
    blocking = FeatureClient.connect(redis_cluster.url)
    try:
        items = [f"i{i}" for i in range(1, 9)]
        at = T_END = max(e[2]["timestamp"] for e in events)
        many = blocking.get_many("item", items, ["n", "users"], at_ms=at)
        for item in items:
            assert many[item]["n"].value == oracle.value(feature_specs[0], item,
                                                         _end(feature_specs[0], T_END))
    finally:
        blocking.close()


def _end(spec: object, at: int) -> int:
    return int(spec.window.current_end(at))  # type: ignore[attr-defined]


async def test_alert_state_outbox_silences_and_lease_work_on_a_cluster(
        acluster: aioredis.Redis) -> None:
    store = AlertStore(acluster, "ep")
    assert await store.hold_lease()
    assert not await AlertStore(acluster, "ep").hold_lease()  # another worker's: refused
    await store.save({}, [])
    assert await store.outbox() == []
    await store.watch({"user": {"u1", "u2"}}, at_ms=1000)
    assert sorted(await store.watched("user", since_ms=0)) == ["u1", "u2"]
    assert await store.sent_keys(["a", "b"]) == {}
    # all of them in the control slot: one node
    slots = {acluster.keyslot(k) for k in (store.keys.state, store.keys.outbox,
                                           store.keys.lease, store.keys.silences)}
    assert len(slots) == 1


async def test_a_cluster_url_on_one_redis_and_the_reverse_stop_with_the_fix(
        redis_server: LocalRedis, redis_cluster: LocalRedisCluster) -> None:
    port = redis_server.port
    with pytest.raises(RedisModeError, match="use redis:// "):
        await check_mode(connect_async(f"redis+cluster://127.0.0.1:{port}"))
    with pytest.raises(RedisModeError, match="use redis:// "):
        connect(f"redis+cluster://127.0.0.1:{port}")
    with pytest.raises(RedisModeError, match="only database 0"):
        connect_async(f"redis+cluster://127.0.0.1:{port}/3")
    node = aioredis.Redis.from_url(f"redis://127.0.0.1:{redis_cluster.ports[0]}")
    with pytest.raises(LayoutError, match="EVENTPULSE_REDIS_URL points at a Redis Cluster node"):
        await FeatureStore(node, "ep", "g").prepare_layout()
    await node.aclose()
    with pytest.raises(RedisModeError, match="redis\\+cluster://"):
        FeatureClient.connect(f"redis://127.0.0.1:{redis_cluster.ports[0]}")


async def test_layout_3_keys_move_under_their_shard_tags(aredis: aioredis.Redis) -> None:
    """A layout-3 Redis: entity maps, sketches, meta and alert keys are renamed (TTL kept); the
    fences, the registry and layout 1's hashes stay."""
    await aredis.set("ep:{user:u1}:f", b"map", px=60_000)
    await aredis.pfadd("ep:{user:u1}:hll:d:1000", "x")
    await aredis.hset("ep:meta", mapping={"observed_since": 5})
    await aredis.rpush("ep:alerts:outbox", "e")
    await aredis.hset("ep:silences", "s1", "{}")
    await aredis.hset("ep:{user:u2}", "old", 1)  # layout 1
    await aredis.hset("ep:features", "n", "{}")
    store = FeatureStore(aredis, "ep", "g", shards=64)
    await store.prepare_layout()
    assert await aredis.get("ep:{s:56}:user:u1:f") == b"map"
    assert 0 < await aredis.pttl("ep:{s:56}:user:u1:f") <= 60_000
    assert await aredis.pfcount("ep:{s:56}:user:u1:hll:d:1000") == 1
    assert await aredis.hget(meta_key("ep"), "observed_since") == b"5"
    assert await aredis.hget(meta_key("ep"), "layout") == b"4"
    assert await aredis.lrange("ep:{s:ctl}:alerts:outbox", 0, -1) == [b"e"]
    assert await aredis.hget("ep:{s:ctl}:silences", "s1") == b"{}"
    assert await aredis.exists("ep:{user:u2}", "ep:features") == 2
    assert not await aredis.exists("ep:{user:u1}:f", "ep:meta", "ep:alerts:outbox")
    assert await relayout.from_layout3(aredis, "ep", 64) == 0  # done once


async def test_reads_follow_a_resharding(redis_cluster: LocalRedisCluster,
                                         acluster: aioredis.Redis) -> None:
    """``redis-cli --cluster reshard`` moves slots (keys among them) while a reader reads:
    no error, the same values every time."""
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(acluster, "ep", "g", shards=64)
    await store.prepare_layout()
    await store.publish(feature_specs)
    events = make_events(1500)
    await apply_all(store, features, events, batch=1500)
    at = max(e[2]["timestamp"] for e in events)
    items = [f"i{i}" for i in range(1, 9)]
    reader = await AsyncFeatureClient.connect(redis_cluster.url)
    expected = await reader.get_many("item", items, at_ms=at)
    assert any(v["n"].value for v in expected.values())
    nodes = redis_cluster.nodes()
    ids = {int(n["port"]): n["id"] for n in nodes if n["role"] == "master"}
    source, target = sorted(ids)[:2]
    done = threading.Event()
    failure: list[BaseException] = []

    def reshard() -> None:
        try:
            for src, dst in ((source, target), (target, source)):
                subprocess.run(
                    ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{src}", "--cluster-from",
                     ids[src], "--cluster-to", ids[dst], "--cluster-slots", "3000",
                     "--cluster-yes", "--cluster-pipeline", "10"],
                    check=True, capture_output=True, timeout=120)
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=reshard)
    thread.start()
    reads = 0
    try:
        while not done.is_set():
            assert await reader.get_many("item", items, at_ms=at) == expected
            reads += 1
            await asyncio.sleep(0)
    finally:
        thread.join()
        await reader.aclose()
    assert not failure, failure
    assert reads > 10
    blocking = FeatureClient.connect(redis_cluster.url)
    assert blocking.get_many("item", items, at_ms=at) == expected
    blocking.close()


@pytest.mark.slow
async def test_three_workers_on_a_cluster_equal_the_oracle_after_a_kill(
        kafka: TansuBroker, redis_cluster: LocalRedisCluster, acluster: aioredis.Redis,
        make_worker: Callable[..., WorkerProcess]) -> None:
    """The unchanged worker with a ``redis+cluster://`` URL: three workers share a 12-partition
    topic, one is SIGKILLed mid-stream and replaced; every feature equals the oracle."""
    topic, group = unique("cl"), unique("cluster")
    config = {**exactly_once.job(topic), "partitions": 12}
    rng = random.Random(3)
    base = int(time.time() * 1000) - 20 * 60_000
    per_partition: list[list[dict[str, Any]]] = [[] for _ in range(12)]
    for i in range(24_000):
        user = f"u{rng.randint(1, 2000)}"
        record = {"timestamp": base + i * 40 + rng.randint(0, 30), "user_id": user,
                  "item_id": f"i{rng.randint(1, 200)}", "device": rng.choice(["ios", "web"]),
                  "action": rng.choice(["click", "view", "watch"])}
        if record["action"] == "watch":
            record["watch"] = round(rng.lognormvariate(4, 1), 2)
        per_partition[int(user[1:]) % 12].append(record)
    total = sum(len(r) for r in per_partition)

    def worker() -> WorkerProcess:
        return make_worker(config, group, EVENTPULSE_REDIS_URL=redis_cluster.url,
                           EVENTPULSE_BATCH_MAX_RECORDS="2000", EVENTPULSE_REDIS_SHARDS="16")

    async def applied() -> int:
        held = await FeatureStore(acluster, "ep", group, shards=16).all_positions()
        return sum(p.offset + 1 for p in held.values() if p is not None)

    workers = [worker().start() for _ in range(3)]
    half = exactly_once.CHUNKS // 2
    for chunk in range(half):
        await exactly_once.produce_chunk(kafka.bootstrap, topic, per_partition, chunk)
    await wait_until(lambda: _at_least(applied, 3000), timeout=120, message="progress")
    workers[0].kill()
    workers[0] = worker().start()
    for chunk in range(half, exactly_once.CHUNKS):
        await exactly_once.produce_chunk(kafka.bootstrap, topic, per_partition, chunk)
    await wait_until(lambda: _at_least(applied, total), timeout=180, message="all applied")
    assert all(w.process is not None and w.process.poll() is None for w in workers)

    job_config = parse_config(config)
    oracle = Oracle(job_config.features)
    oracle.feed(topic, ((p, o, r) for p, records in enumerate(per_partition)
                        for o, r in enumerate(records)))
    reader = await AsyncFeatureClient.connect(redis_cluster.url)
    checked, mismatches = 0, 0
    try:
        for spec in job_config.features:
            for entity in sorted(oracle.entities(spec))[:150]:
                for end in oracle.live_windows(spec, entity):
                    got = (await reader.get(spec.entity, entity, [spec.name], at_ms=end))
                    checked += 1
                    mismatches += not close_enough(spec, oracle.value(spec, entity, end),
                                                   got[spec.name].value)
    finally:
        await reader.aclose()
    assert checked > 2000 and mismatches == 0


async def _at_least(applied: Callable[[], Awaitable[int]], count: int) -> bool:
    return await applied() >= count


async def test_a_batch_waits_for_a_replica_of_every_primary_it_wrote(
        acluster: aioredis.Redis) -> None:
    """WAIT behind a write of each primary's own: one replica each acknowledges; asking for
    two (there is one) fails as a transient ReplicaLag, so the Kafka commit waits."""
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(acluster, "ep", "g", shards=16, wait_replicas=1, wait_timeout_ms=2000)
    await store.prepare_layout()
    await apply_all(store, features, make_events(400), batch=400)
    store.wait_replicas, store.wait_timeout_ms = 2, 50
    with pytest.raises(ReplicaLag, match="1 of 2 replicas"):
        await apply_all(store, features, make_events(800)[400:], batch=400)
    assert is_transient(ReplicaLag("x"))
