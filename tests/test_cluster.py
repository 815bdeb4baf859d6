"""eventpulse on a real Redis Cluster (3 primaries, one replica each): the same write path and
reads as on one Redis, every script within one slot, reads that follow a resharding."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import RedisError, ResponseError

from eventpulse import connections
from eventpulse.addresses import redis_client_address
from eventpulse.agents.app import ensure_topics
from eventpulse.alerts.outbox import AlertKeys, AlertStore, encode_changes
from eventpulse.config import parse_config
from eventpulse.connections import ConnectionCheckError
from eventpulse.local.servers import LocalRedis, LocalRedisCluster, TansuBroker, free_port
from eventpulse.redisconn import RedisModeError, check_mode, connect, connect_async
from eventpulse.redisretry import is_transient
from eventpulse.settings import SettingsError, load_settings
from eventpulse.streams.decode import DecodeLimits, RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables import clusterread, relayout
from eventpulse.tables.batch import BatchCombiner
from eventpulse.tables.client import AppliedReads, AsyncFeatureClient, FeatureClient
from eventpulse.tables.keys import (
    entity_key,
    features_key,
    features_keys,
    fence_key,
    meta_key,
    shard_of,
)
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
        served: list[tuple[str, list[str], int]] = []
        blocking.on_read = lambda entity, ids, at_ms, _: served.append((entity, ids, at_ms))
        many = blocking.get_many("item", items, ["n", "users"], at_ms=at)
        assert served == [("item", items, at)]  # the served-read log sees cluster reads too
        # the read log's positions: each sampled entity's fence, read with it on its node
        logged: list[Any] = []
        blocking.on_read = lambda *args, **kw: logged.append(kw["applied"])
        blocking.applied_reads = AppliedReads("g", lambda i: i in ("i1", "i5"))
        assert blocking.get_many("item", items, ["n", "users"], at_ms=at) == many
        fences = {i: {tp.decode(): int(v.split(b":")[0]) for tp, v in (await acluster.hgetall(
            fence_key("ep", "g", shard_of("item", i, 16), 16))).items()} for i in ("i1", "i5")}
        assert fences["i1"] and logged == [
            {i: {tp: (o, o) for tp, o in fence.items()} for i, fence in fences.items()}]
        for item in items:
            assert many[item]["n"].value == oracle.value(feature_specs[0], item,
                                                         _end(feature_specs[0], T_END))
    finally:
        blocking.close()
    # the command line, with the cluster URL in its usual setting
    out = subprocess.run(
        [sys.executable, "-m", "eventpulse", "features", "get", "item", *items, "--names", "n",
         "--at", str(at)], capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "EVENTPULSE_REDIS_URL": redis_cluster.url})
    printed = json.loads(out.stdout)
    assert {i: printed[i]["n"]["value"] for i in items} == {
        i: many[i]["n"].value for i in items}


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
    # log lines name the node given, not redis-py's default localhost:6379
    given = f"127.0.0.1:{redis_cluster.ports[0]}"
    assert redis_client_address(connect_async(f"redis+cluster://{given}")) == f"cluster {given}"
    # the worker's start-up check and the commands: one line with the fix, no traceback
    for url, fix in ((f"redis+cluster://127.0.0.1:{port}", "use redis://"),
                     (f"redis://127.0.0.1:{redis_cluster.ports[0]}/0", "use redis+cluster://")):
        with pytest.raises(ConnectionCheckError, match=re.escape(fix)):
            await connections.check_redis(load_settings(redis_url=url))
        out = subprocess.run([sys.executable, "-m", "eventpulse", "features", "get", "user", "u1"],
                             env={**os.environ, "EVENTPULSE_REDIS_URL": url},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and fix in out.stderr, out.stderr
        assert "please report" not in out.stderr and "Traceback" not in out.stderr, out.stderr


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


@pytest.mark.slow
async def test_reads_follow_a_resharding() -> None:
    """``redis-cli --cluster reshard`` moves slots (keys among them) while a reader reads:
    no error, the same values every time. A cluster of its own: resharding reshapes it."""
    with LocalRedisCluster(primaries=3, replicas=0) as redis_cluster:
        acluster = connect_async(redis_cluster.url)
        try:
            await _reads_follow_a_resharding(redis_cluster, acluster)
        finally:
            await acluster.aclose()


async def _reads_follow_a_resharding(redis_cluster: LocalRedisCluster,
                                     acluster: aioredis.Redis) -> None:
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
    # every slot of the node holding i1 moves away (i1's keys among them; the emptied primary
    # then turns replica), then some of them on to the third primary
    source = acluster.get_node_from_key(features_key("ep", "item", "i1", 64)).port
    target, third = (port for port in sorted(ids) if port != source)
    owned = sum(int(r.split("-")[-1]) - int(r.split("-")[0]) + 1
                for line in redis_cluster.cli(source, "cluster", "nodes").splitlines()
                if "myself" in line for r in line.split()[8:] if not r.startswith("["))
    done = threading.Event()
    failure: list[BaseException] = []

    def reshard() -> None:
        try:
            for src, dst, count in ((source, target, owned), (target, third, 3000)):
                redis_cluster.wait_agreed()
                moved = subprocess.run(
                    ["redis-cli", "--cluster", "reshard", f"127.0.0.1:{src}", "--cluster-from",
                     ids[src], "--cluster-to", ids[dst], "--cluster-slots", str(count),
                     "--cluster-yes", "--cluster-pipeline", "10"],
                    capture_output=True, text=True, timeout=120)
                if moved.returncode:
                    raise RuntimeError(moved.stdout[-1500:] + moved.stderr[-500:])
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    rerouted_before = clusterread.Stats.rerouted
    thread = threading.Thread(target=reshard)
    thread.start()
    blocking = FeatureClient.connect(redis_cluster.url)
    reads = 0
    try:
        while not done.is_set():
            assert await reader.get_many("item", items, at_ms=at) == expected
            assert blocking.get_many("item", items, at_ms=at) == expected
            reads += 1
            await asyncio.sleep(0)
    finally:
        thread.join()
        await reader.aclose()
    assert not failure, failure
    assert reads > 10
    assert clusterread.Stats.rerouted > rerouted_before  # MOVED/ASK met, and followed
    # once the slot map is learnt again, reads go straight to the nodes, not rerouted
    assert blocking.get_many("item", items, at_ms=at) == expected
    settled = clusterread.Stats.rerouted
    assert blocking.get_many("item", items, at_ms=at) == expected
    assert clusterread.Stats.rerouted == settled
    blocking.close()


async def test_read_slots_are_the_clusters_own(acluster: aioredis.Redis) -> None:
    """Reads work out slots from remembered hash tags: Redis itself (``CLUSTER KEYSLOT``)
    agrees, for eventpulse's keys and for the corners of the hash-tag rule; an MGET cut per
    slot goes back together in its keys' order."""
    keys = [*features_keys("ep", "user", [f"u{i}" for i in range(300)], 64), meta_key("ep"),
            "plain", "{}", "{}x{a}", "a{b}{c}", "a{", "}a{b}", "{{x}}", "x{}{y}", "x{é}",
            "ünï{cøde}:f", "{s:1}", "s:1"]
    for key in keys + keys:  # the second time from the remembered tags
        slot = await acluster.execute_command("CLUSTER KEYSLOT", key)  # type: ignore[no-untyped-call]
        assert clusterread.slot_of(key) == clusterread.slot_of(key.encode()) == slot, key
    route = clusterread.Route([("HGET", meta_key("ep"), "x"), ("MGET", *keys),
                               ("PFCOUNT", "a{b}1", "a{b}2")])
    mgets = [slot for slot, cmd in route.parts if cmd[0] == "MGET"]
    assert len(set(mgets)) == len(mgets) > 60  # one MGET per slot
    for slot, cmd in route.parts:
        assert {clusterread.slot_of(k) for k in cmd[1:2 if cmd[0] == "HGET" else None]} == {slot}
    # each part answered with its own keys: the MGET's reply comes back as the keys in order
    replies = route.replies([list(cmd[1:]) if cmd[0] == "MGET" else cmd[0]
                             for _, cmd in route.parts])
    assert replies == ["HGET", keys, "PFCOUNT"]


async def test_an_error_reply_mid_read_leaves_the_clients_whole(
        redis_cluster: LocalRedisCluster, acluster: aioredis.Redis) -> None:
    """A reply that is an error (here WRONGTYPE: the meta hash overwritten by a string) fails
    the read with Redis' error, while the other replies of that node are still unread; the
    connections are not handed back with them, so the next reads are whole."""
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(acluster, "ep", "g", shards=16)
    await store.prepare_layout()
    await store.publish(feature_specs)
    events = make_events(600)
    await apply_all(store, features, events, batch=600)
    at = max(e[2]["timestamp"] for e in events)
    items = [f"i{i}" for i in range(1, 9)]
    reader = await AsyncFeatureClient.connect(redis_cluster.url)
    blocking = FeatureClient.connect(redis_cluster.url)
    try:
        expected = await reader.get_many("item", items, at_ms=at)
        assert blocking.get_many("item", items, at_ms=at) == expected
        # replies are taken from hiredis's buffer (not one read_response each): the fast path
        pool = cast(Any, blocking.client).get_redis_connection(
            cast(Any, blocking.client).get_default_node()).connection_pool
        conn = pool.get_connection()
        assert clusterread._reader(conn) is not None
        pool.release(conn)
        node = cast(Any, reader.client).get_default_node()
        aconn = node.acquire_connection()
        await aconn.connect()
        assert clusterread._reader(aconn) is not None
        node.release(aconn)
        meta = await acluster.hgetall(meta_key("ep"))
        await acluster.delete(meta_key("ep"))
        await acluster.set(meta_key("ep"), "not a hash")
        rerouted = clusterread.Stats.rerouted
        for _ in range(2):
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await reader.get_many("item", items, at_ms=at)
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                blocking.get_many("item", items, at_ms=at)
        assert clusterread.Stats.rerouted == rerouted  # Redis' answer, not a routing problem
        await acluster.delete(meta_key("ep"))
        await acluster.hset(meta_key("ep"), mapping=meta)
        for _ in range(3):
            assert await reader.get_many("item", items, at_ms=at) == expected
            assert blocking.get_many("item", items, at_ms=at) == expected
        # an error about one key (a sketch bucket made a string) is that value's, not the read's
        prefix = entity_key("ep", "item", "i1", store.shards)
        buckets = await acluster.keys(f"{prefix}:sk:watch_p95:*",
                                      target_nodes=acluster.get_node_from_key(prefix))
        assert buckets
        for bucket in buckets:
            await acluster.delete(bucket)
            await acluster.set(bucket, "not a hash")
        for got in (await reader.get_many("item", items, at_ms=at),
                    blocking.get_many("item", items, at_ms=at)):
            assert got["i1"]["watch_p95"].status == "missing"
            got["i1"]["watch_p95"] = expected["i1"]["watch_p95"]
            assert got == expected
    finally:
        await reader.aclose()
        blocking.close()


@pytest.mark.slow
async def test_reads_survive_a_primary_failover() -> None:
    """A primary killed under the readers: each read returns the same values or raises
    redis-py's error (never other values, never a hang); once its replica took over, every
    read returns them again, straight from the nodes."""
    with LocalRedisCluster(primaries=3, replicas=1) as redis_cluster:
        acluster = connect_async(redis_cluster.url)
        try:
            await _reads_survive_a_primary_failover(redis_cluster, acluster)
        finally:
            await acluster.aclose()


async def _reads_survive_a_primary_failover(redis_cluster: LocalRedisCluster,
                                            acluster: aioredis.Redis) -> None:
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    store = FeatureStore(acluster, "ep", "g", shards=64, wait_replicas=1, wait_timeout_ms=5000)
    await store.prepare_layout()
    await store.publish(feature_specs)
    events = make_events(1500)
    await apply_all(store, features, events, batch=1500)  # on a replica before it returns
    at = max(e[2]["timestamp"] for e in events)
    items = [f"i{i}" for i in range(1, 9)]
    reader = await AsyncFeatureClient.connect(redis_cluster.url)
    blocking = FeatureClient.connect(redis_cluster.url)
    try:
        expected = await reader.get_many("item", items, at_ms=at)
        assert any(v["n"].value for v in expected.values())
        assert blocking.get_many("item", items, at_ms=at) == expected
        victim = acluster.get_node_from_key(features_key("ep", "item", "i1", 64)).port
        redis_cluster.kill_node(victim)
        errors: list[RedisError] = []
        for _ in range(3):  # while no replica has taken over yet
            try:
                assert await reader.get_many("item", items, at_ms=at) == expected
            except RedisError as exc:
                errors.append(exc)
            try:
                assert blocking.get_many("item", items, at_ms=at) == expected
            except RedisError as exc:
                errors.append(exc)
        assert all(isinstance(exc, clusterread.REROUTE) and str(exc) for exc in errors), errors
        redis_cluster.wait_failover(victim)
        assert await reader.get_many("item", items, at_ms=at) == expected
        assert blocking.get_many("item", items, at_ms=at) == expected
        settled = clusterread.Stats.rerouted
        assert await reader.get_many("item", items, at_ms=at) == expected
        assert blocking.get_many("item", items, at_ms=at) == expected
        assert clusterread.Stats.rerouted == settled  # the new slot map is in use
    finally:
        await reader.aclose()
        blocking.close()


@pytest.mark.slow
async def test_three_workers_on_a_cluster_equal_the_oracle_after_kills_and_a_failover(
        kafka: TansuBroker, redis_cluster: LocalRedisCluster, acluster: aioredis.Redis,
        make_worker: Callable[..., WorkerProcess]) -> None:
    """The unchanged worker with a ``redis+cluster://`` URL: 200k events on a 12-partition
    topic, three workers, five SIGKILLs at random moments, and the primary holding the control
    fence killed mid-stream and replaced by its replica; every feature equals the oracle."""
    topic, group = unique("cl"), unique("cluster")
    config = {**exactly_once.job(topic), "partitions": 12}
    per_partition = exactly_once.generate(partitions=12)
    total = sum(len(r) for r in per_partition)
    assert total >= 200_000

    started: list[WorkerProcess] = []

    def worker() -> WorkerProcess:
        started.append(make_worker(config, group, EVENTPULSE_REDIS_URL=redis_cluster.url,
                                   EVENTPULSE_BATCH_MAX_RECORDS="5000",
                                   EVENTPULSE_REDIS_WAIT_REPLICAS="1"))
        return started[-1]

    async def progress(count: int) -> None:
        await wait_until(lambda: _at_least(applied, count), timeout=180,
                         message=f"{count} records applied")

    async def applied() -> int:
        for _ in range(150):
            try:
                held = await FeatureStore(acluster, "ep", group).all_positions()
                return sum(p.offset + 1 for p in held.values() if p is not None)
            except (RedisError, OSError):
                await asyncio.sleep(0.2)
        raise AssertionError("the cluster did not come back")

    rng = random.Random(7)
    kills = 0

    async def kill_one(workers: list[WorkerProcess]) -> None:
        nonlocal kills
        await progress(await applied() + 3000)
        await asyncio.sleep(rng.uniform(0, 0.5))
        victim = rng.randrange(len(workers))
        workers[victim].kill()
        kills += 1
        workers[victim] = worker().start()

    await ensure_topics([kafka.bootstrap], parse_config(config))  # 12 partitions, before any
    await exactly_once.produce_chunk(kafka.bootstrap, topic, per_partition, 0)
    workers = [worker().start() for _ in range(3)]
    await kill_one(workers)
    await exactly_once.produce_chunk(kafka.bootstrap, topic, per_partition, 1)
    await kill_one(workers)
    await exactly_once.produce_chunk(kafka.bootstrap, topic, per_partition, 2)
    # the primary of the control fence dies mid-stream; its replica takes over, and the old
    # primary comes back as the new one's replica (the workers wait for one: WAIT_REPLICAS=1)
    await progress(await applied() + 1000)
    produced = sum(min(len(r), 3 * (len(r) // exactly_once.CHUNKS + 1)) for r in per_partition)
    assert await applied() < produced - 10_000  # mid-stream: the workers are writing
    control = acluster.get_node_from_key("ep:{s:ctl}:meta").port
    redis_cluster.kill_node(control)
    redis_cluster.wait_failover(control)
    redis_cluster.restart_node(control)
    redis_cluster.wait_ok()
    await kill_one(workers)
    await exactly_once.produce_chunk(kafka.bootstrap, topic, per_partition, 3)
    await kill_one(workers)
    await exactly_once.produce_chunk(kafka.bootstrap, topic, per_partition, 4)
    await kill_one(workers)
    await progress(total)
    assert kills >= 5
    assert all(w.process is not None and w.process.poll() is None for w in workers)
    # the failover (and MOVED after it) was waited out everywhere, never given up on
    assert not [w.log_path.name for w in started if "will not heal" in w.log()]

    job_config = parse_config(config)
    oracle = Oracle(job_config.features)
    oracle.feed(topic, ((p, o, r) for p, records in enumerate(per_partition)
                        for o, r in enumerate(records)))
    reader = await AsyncFeatureClient.connect(redis_cluster.url)
    checked, mismatches = 0, 0
    try:
        for spec in job_config.features:
            for entity in sorted(oracle.entities(spec))[:300]:
                for end in oracle.live_windows(spec, entity):
                    got = (await reader.get(spec.entity, entity, [spec.name], at_ms=end))
                    checked += 1
                    mismatches += not close_enough(spec, oracle.value(spec, entity, end),
                                                   got[spec.name].value)
    finally:
        await reader.aclose()
    assert checked > 4000 and mismatches == 0


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


def test_cluster_urls_are_valid_settings_and_others_name_the_schemes() -> None:
    assert load_settings(redis_url="redis+cluster://node:6379").redis_url.startswith("redis+")
    assert load_settings(redis_url="rediss+cluster://node:6379").redis_url
    with pytest.raises(SettingsError, match=r"EVENTPULSE_REDIS_URL.*redis\+cluster://") as info:
        load_settings(redis_url="http://user:hunter2@node:6379")
    assert "hunter2" not in str(info.value)


def test_moved_and_ask_are_waited_out() -> None:
    """A MULTI/EXEC that meets a slot's new owner after a failover is retried, not fatal."""
    from redis.exceptions import AskError, MovedError

    assert is_transient(MovedError("7322 127.0.0.1:7001"))
    assert is_transient(AskError("7322 127.0.0.1:7001"))


def test_every_script_and_read_key_of_a_batch_shares_its_slice_slot() -> None:
    """The cluster-safety rule itself: each slice's KEYS (fence, meta or fence, entity maps)
    hash to one slot, the sketch keys Lua derives from a map too; the read's keys built in one
    pass are the documented ones."""
    feature_specs = specs()
    features = [CompiledFeature(s, i) for i, s in enumerate(feature_specs)]
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False))
    combiner = BatchCombiner("ep", features, {"events:0": None, "events:1": None}, shards=16)
    for partition, offset, record in make_events(2000):
        combiner.add(f"events:{partition}", "events", offset,
                     decoder.decode(json.dumps(record).encode()))
    plan = combiner.plan()
    for op in encode_changes(AlertKeys("ep"), {}, []):
        plan.add_write(*op)

    class Keys(FeatureStore):
        def __init__(self) -> None:
            super().__init__(cast(aioredis.Redis, _NoRedis()), "ep", "g", shards=16)

    store = Keys()
    assert len(plan.all_slices) > 16
    for piece in plan.all_slices:
        keys = store._keys(piece)
        sketch_keys = [k[:-2] + ":hll:users:0" for k in keys[2:]]
        assert len({key_slot(k.encode()) for k in keys + sketch_keys}) == 1, keys
    ids = ["i1", "é-ü", "x" * 300, "a|b", "{odd}"]
    assert features_keys("ep", "item", ids, 16) == [features_key("ep", "item", i, 16)
                                                    for i in ids]
    alert = AlertKeys("ep")
    assert len({key_slot(k.encode()) for k in (alert.state, alert.outbox, alert.attempts,
                                                alert.silences, alert.lease, meta_key("ep"),
                                                alert.sent_prefix + "k")}) == 1


class _NoRedis:
    """Stands for a client where only key names are computed (no command is sent)."""

    def register_script(self, script: str) -> object:
        return object()


async def test_readiness_pings_every_primary_of_a_cluster() -> None:
    """Found by an outside test: with one primary frozen (its slots' writes stall), a PING to
    whichever node redis-py picked said "reachable" two times out of three, so /readyz never
    reached its outage bound. Every primary must answer."""
    from eventpulse.health import RedisWatch
    from eventpulse.redisconn import ping

    with LocalRedisCluster(primaries=3, replicas=0) as cluster:
        client = connect_async(cluster.url, socket_timeout=0.5)
        watch = RedisWatch(lambda: ping(client), outage_s=1.0, interval_s=0.1, timeout_s=0.5)
        try:
            assert await watch.check_once()
            frozen = cluster.processes[cluster.ports[1]]
            frozen.send_signal(signal.SIGSTOP)
            try:
                assert [await watch.check_once() for _ in range(6)] == [False] * 6
                reason = watch.reason(time.monotonic() + 2)
                assert reason is not None and "redis unreachable" in reason
            finally:
                frozen.send_signal(signal.SIGCONT)
            for _ in range(20):  # the frozen node's connections were dropped: new ones now
                if await watch.check_once():
                    break
                await asyncio.sleep(0.2)
            assert watch.reason(time.monotonic() + 60) is None
        finally:
            await client.aclose()


async def test_a_cluster_that_cannot_be_reached_is_waited_for_not_a_crash() -> None:
    """Found by an outside test: redis-py wraps a cluster client's failed start in one
    RedisClusterException (not even a RedisError), so a worker started before its cluster
    stopped with "unexpected RedisClusterException", where a single Redis is waited for.
    The start's own cause is what eventpulse sees: a connection error, which the retry
    policy waits out; refused credentials, which the preflight names."""
    from redis.exceptions import AuthenticationError
    from redis.exceptions import ConnectionError as RedisConnectionError

    from eventpulse.connections import check_redis
    from eventpulse.redisretry import RedisRetry

    port = free_port()
    client = connect_async(f"redis+cluster://127.0.0.1:{port}")
    with pytest.raises(RedisConnectionError):
        await check_mode(client)
    with pytest.raises(RedisConnectionError):
        connect(f"redis+cluster://127.0.0.1:{port}")
    attempts = 0

    async def start_later() -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 3:
            raise AssertionError("retried: the layout check would now run")
        await check_mode(client)

    with pytest.raises(AssertionError, match="retried"):
        await RedisRetry(base_s=0.01, cap_s=0.02).call(start_later, "redis layout check")
    await client.aclose()
    with LocalRedisCluster(primaries=3, replicas=0) as cluster:
        bad = cluster.url.replace("redis+cluster://", "redis+cluster://bob:Hunter2x@")
        with pytest.raises(AuthenticationError):
            connect(bad)
        with pytest.raises(ConnectionCheckError, match="refused the credentials") as refused:
            await check_redis(load_settings(redis_url=bad))
        assert "Hunter2x" not in str(refused.value)
