"""Feature reads: 100 entities x 10 features in one call, against a local redis-server, side by
side with reading the same values key by key (one round trip per value) in the same run, with
what the machine itself allows (a PING, and the same MGET without decoding), and with the Python
twin of the compiled read loop (what an install without a C compiler runs).

    .venv/bin/python bench/read_latency.py [--calls 2000] [--shared-cpus] [--redis cluster]

``--redis cluster`` also reads the same data from a local 3-primary Redis Cluster (no replicas:
reads go to primaries) in the same run: one MGET per slot the entities fall in, one round trip
per node, all nodes at once; with the blocking and the asyncio client, and the cluster's own
floor (a PING written to every primary at once) interleaved with the blocking reads. The script
uses only the public client API: run with another checkout's interpreter
(``/tmp/rd-base/.venv/bin/python <this checkout>/bench/read_latency.py``), it measures that
version's code with this same bench.

By default redis-server gets a CPU of its own (see ``pin_apart``); ``--shared-cpus`` measures
the two sharing the machine's CPUs.

The worker fills Redis first (real batches through the real write path), so the layout read is
the one production has.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import time
from collections.abc import Iterator

import redis

from eventpulse.config import parse_config
from eventpulse.local.servers import LocalRedis, LocalRedisCluster
from eventpulse.streams.decode import DecodeLimits, RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables import ringread
from eventpulse.tables.batch import BatchCombiner
from eventpulse.tables.client import AsyncFeatureClient, FeatureClient, FeatureValue
from eventpulse.tables.keys import features_key
from eventpulse.tables.spec import CompiledFeature

ENTITIES = 100
STEP = {"type": "hopping", "size": "5m", "step": "1m", "lateness": "30s"}


def job() -> dict[str, object]:
    def f(name: str, aggregation: str, **extra: object) -> dict[str, object]:
        return {"name": name, "topic": "events", "entity": "user", "key": "user_id",
                "aggregation": aggregation, "window": STEP, **extra}
    return {"topics": {"events": "behaviour"}, "features": [
        f("events_5m", "count"), f("clicks_5m", "count", where={"action": "click"}),
        f("views_5m", "count", where={"action": "view"}), f("watch_sum_5m", "sum", value="watch"),
        f("watch_mean_5m", "mean", value="watch"), f("watch_min_5m", "min", value="watch"),
        f("watch_max_5m", "max", value="watch"), f("last_device", "last", value="device"),
        f("click_rate_5m", "ratio", numerator={"action": "click"}),
        f("sessions_5m", "count", where={"action": "swipe"}),
    ]}


async def fill(url: str, now: int) -> None:
    from eventpulse.redisconn import connect_async
    from eventpulse.tables.store import FeatureStore

    config = parse_config(job())
    features = [CompiledFeature(s, i) for i, s in enumerate(config.features)]
    client = connect_async(url)
    store = FeatureStore(client, "ep", "bench")
    await store.publish(config.features)
    combiner = BatchCombiner("ep", features)
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False))
    rng = random.Random(1)
    combiner.reset(await store.positions(["events:0"]))
    for offset in range(20_000):
        record = {"timestamp": now - 240_000 + offset * 9, "user_id": f"u{offset % 1000}",
                  "action": rng.choice(["click", "view", "swipe"]), "device": "ios",
                  "watch": rng.uniform(1, 100)}
        combiner.add("events:0", "events", offset, decoder.decode(json.dumps(record).encode()))
    assert await store.apply(combiner.plan()) is None
    await client.aclose()


@contextlib.contextmanager
def python_read_loop() -> Iterator[None]:
    """Reads through ringread's Python twins, as where the compiled loop was not built."""
    saved = ringread.EntityEntries, ringread.read_column
    ringread.EntityEntries, ringread.read_column = (
        ringread.EntityEntriesPython, ringread.read_column_python)
    try:
        yield
    finally:
        ringread.EntityEntries, ringread.read_column = saved


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def pin_apart(server_pid: int) -> str:
    """Give redis-server a CPU of its own and this process the others, as where Redis runs on
    its own host or cores (Redis' own advice: ``server_cpulist``). With both sharing two
    cores, the scheduler's hand-offs between them make the tail, for a bare PING too."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "not pinned (one CPU)"
    os.sched_setaffinity(server_pid, {cpus[-1]})
    os.sched_setaffinity(0, set(cpus[:-1]))
    return f"redis-server pinned to CPU {cpus[-1]}, this client to CPU {cpus[:-1]}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--shared-cpus", action="store_true",
                        help="leave redis-server and the client on the same CPUs (not pinned)")
    parser.add_argument("--redis", choices=["single", "cluster"], default="single",
                        help="cluster: also read from a local 3-primary Redis Cluster")
    args = parser.parse_args()
    cluster = cluster_reads(args.calls, args.shared_cpus) if args.redis == "cluster" else None
    now = int(time.time() * 1000)
    with LocalRedis() as server:
        assert server.process is not None
        placement = "not pinned (--shared-cpus)" if args.shared_cpus else pin_apart(
            server.process.pid)
        asyncio.run(fill(server.url, now))
        client = FeatureClient.connect(server.url)
        ids = [f"u{i}" for i in range(ENTITIES)]
        names = [s for s in client.specs]
        result = client.get_many("user", ids, names, now)
        assert all(result[i]["events_5m"].value for i in ids), "bench data missing"
        # floors measured alongside, interleaved call by call so that all three see the same
        # machine: a PING round trip, and the same MGET without decoding anything
        raw = redis.Redis.from_url(server.url)
        keys = [features_key("ep", "user", i, client.shards) for i in ids]
        one_call, ping, bare_mget = [], [], []
        for _ in range(args.calls):
            started = time.perf_counter()
            raw.ping()
            ping.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            raw.mget(keys)
            bare_mget.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            client.get_many("user", ids, names, now)
            one_call.append((time.perf_counter() - started) * 1000)
        raw.close()
        # the same read where no C compiler built the compiled loop: its Python twin
        python_twin = []
        with python_read_loop():
            for _ in range(max(200, args.calls // 5)):
                started = time.perf_counter()
                client.get_many("user", ids, names, now)
                python_twin.append((time.perf_counter() - started) * 1000)
        # baselines: the same values through the same client, one round trip per (entity,
        # feature) value, and one per entity
        key_by_key, per_entity = [], []
        for _ in range(max(20, args.calls // 50)):
            started = time.perf_counter()
            for entity_id in ids:
                for name in names:
                    client.get("user", entity_id, [name], now)
            key_by_key.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            for entity_id in ids:
                client.get("user", entity_id, names, now)
            per_entity.append((time.perf_counter() - started) * 1000)
        client.close()
    p50, p99 = statistics.median(one_call), percentile(one_call, 0.99)
    base, entity_base = statistics.median(key_by_key), statistics.median(per_entity)
    print(f"get_many 100 entities x 10 features: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
          f"({args.calls} calls; {placement})")
    print(f"floors on this machine, same run: PING p50 {statistics.median(ping):.2f} ms, "
          f"p99 {percentile(ping, 0.99):.2f} ms; the same MGET, not decoded: "
          f"p50 {statistics.median(bare_mget):.2f} ms, p99 {percentile(bare_mget, 0.99):.2f} ms")
    print(f"the same read with the Python twin of the compiled loop (installs without a C "
          f"compiler): p50 {statistics.median(python_twin):.2f} ms, "
          f"p99 {percentile(python_twin, 0.99):.2f} ms")
    print(f"key by key (1000 round trips, one per value): p50 {base:.1f} ms; "
          f"entity by entity (100 round trips): p50 {entity_base:.1f} ms")
    if cluster is None:
        print(f"read_p50_ms={p50:.2f} read_p99_ms={p99:.2f} speedup_vs_key_by_key={base / p50:.0f}")
        return
    c50, c99 = statistics.median(cluster["sync"]), percentile(cluster["sync"], 0.99)
    print(f"the same get_many on a 3-primary Redis Cluster: p50 {c50:.2f} ms, p99 {c99:.2f} ms "
          f"({args.calls} calls); AsyncFeatureClient: p50 {statistics.median(cluster['async']):.2f}"
          f" ms, p99 {percentile(cluster['async'], 0.99):.2f} ms")
    print(f"floor on the cluster, same run: a PING to every primary at once, "
          f"p50 {statistics.median(cluster['ping']):.2f} ms, "
          f"p99 {percentile(cluster['ping'], 0.99):.2f} ms; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"read_p50_ms={p50:.2f} read_p99_ms={p99:.2f} speedup_vs_key_by_key={base / p50:.0f} "
          f"cluster_read_p50_ms={c50:.2f} cluster_read_p99_ms={c99:.2f}")


def cluster_reads(calls: int, shared_cpus: bool) -> dict[str, list[float]]:
    """Latencies (ms) of the same read on a local 3-primary Redis Cluster, its nodes pinned to
    one CPU as ``pin_apart`` pins the single Redis: ``sync`` (``FeatureClient.get_many``),
    ``ping`` (the floor: a PING written to every primary at once, then the three replies,
    interleaved call by call with the reads) and ``async`` (``AsyncFeatureClient``)."""
    now = int(time.time() * 1000)
    mine = os.sched_getaffinity(0)
    with LocalRedisCluster(primaries=3, replicas=0) as cluster:
        cpus = sorted(mine)
        if not shared_cpus and len(cpus) >= 2:
            for process in cluster.processes.values():
                os.sched_setaffinity(process.pid, {cpus[-1]})
            os.sched_setaffinity(0, set(cpus[:-1]))
        asyncio.run(fill(cluster.url, now))
        client = FeatureClient.connect(cluster.url)
        ids = [f"u{i}" for i in range(ENTITIES)]
        names = list(client.specs)
        result = client.get_many("user", ids, names, now)
        assert all(result[i]["events_5m"].value for i in ids), "bench data missing"
        nodes = [socket.create_connection(("127.0.0.1", port)) for port in cluster.ports]
        for node in nodes:
            node.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        out: dict[str, list[float]] = {"sync": [], "ping": [], "async": []}
        for _ in range(calls):
            started = time.perf_counter()
            for node in nodes:
                node.sendall(b"*1\r\n$4\r\nPING\r\n")
            for node in nodes:
                assert node.recv(64) == b"+PONG\r\n"
            out["ping"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            client.get_many("user", ids, names, now)
            out["sync"].append((time.perf_counter() - started) * 1000)
        for node in nodes:
            node.close()
        client.close()
        out["async"] = asyncio.run(async_reads(cluster.url, ids, names, now, calls, result))
    os.sched_setaffinity(0, mine)
    return out


async def async_reads(url: str, ids: list[str], names: list[str], now: int, calls: int,
                      expected: dict[str, dict[str, FeatureValue]]) -> list[float]:
    client = await AsyncFeatureClient.connect(url)
    assert await client.get_many("user", ids, names, now) == expected, "async read differs"
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.get_many("user", ids, names, now)
        out.append((time.perf_counter() - started) * 1000)
    await client.aclose()
    return out


if __name__ == "__main__":
    main()
