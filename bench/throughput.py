"""End-to-end throughput of the eventpulse worker, side by side with three baselines, in one run.

    .venv/bin/python bench/throughput.py [--events 300000] [--naive-events 5000] [--redis cluster]

Starts a local broker and Redis, preloads N behaviour events into a 4-partition topic, then
measures, one after the other on the same data:

- faust:   a Faust agent with default settings that decodes and counts (no Redis);
- naive:   a consumer doing one awaited Redis round trip per event per feature (the seed way),
           on a prefix of the data because it is slow;
- ceiling: a raw aiokafka consumer that only decodes (getmany + json.loads), right before the
           worker and again right after it (the ratio's baseline is their mean: measured
           beside the worker, on the machine's speed of that moment);
- eventpulse: the worker process with 10 features declared, until Redis holds all N.

``--redis cluster`` then runs the same worker on the same topic (another consumer group) against
a local 3-primary Redis Cluster (no replicas), and prints Redis CPU time per event (``INFO cpu``,
user + sys, over each worker run): the single Redis's, and each primary's on the cluster.

Rates are measured from the first record handled to the last, so process start-up and the
consumer-group join are not counted for anyone. The last line is the machine-readable summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from common import (
    Rate,
    commit_watcher,
    committed_total,
    preload,
    redis_holds,
    start,
    stop,
    worker_env,
)

from eventpulse.local.servers import (
    LocalRedis,
    LocalRedisCluster,
    TansuBroker,
    free_port,
    wait_for_port,
)
from eventpulse.redisconn import connect_async

ROOT = Path(__file__).resolve().parent.parent


def make_events(n: int, distribution: str = "zipf") -> list[bytes]:
    """Behaviour events over 20k users and 2k items. ``zipf``: popularity follows a power law
    (s=0.9 for users, 1.0 for items), as real traffic does; ``uniform``: every user equally
    likely, the worst case for per-batch combining."""
    rng = random.Random(3)
    now = int(time.time() * 1000) - 10 * 60_000
    users, items = range(1, 20_001), range(1, 2_001)
    if distribution == "zipf":
        user_ids = rng.choices(users, weights=[1 / u ** 0.9 for u in users], k=n)
        item_ids = rng.choices(items, weights=[1 / i for i in items], k=n)
    else:
        user_ids = [rng.choice(users) for _ in range(n)]
        item_ids = [rng.choice(items) for _ in range(n)]
    out = []
    for i in range(n):
        record: dict[str, object] = {
            "timestamp": now + i * 2, "user_id": f"u{user_ids[i]}", "item_id": f"i{item_ids[i]}",
            "device": rng.choice(["ios", "android", "web"]),
            "action": rng.choice(["click", "view", "view", "watch", "swipe"])}
        if record["action"] == "watch":
            record["watch"] = round(rng.uniform(1, 600), 1)
        out.append(json.dumps(record).encode())
    return out


async def from_start(bootstrap: str, topic: str, **options: int) -> AIOKafkaConsumer:
    """A started consumer reading the topic from its beginning, outside any group."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False, **options)
    await consumer.start()
    return consumer


async def ceiling(bootstrap: str, topic: str, n: int) -> float:
    consumer = await from_start(bootstrap, topic, fetch_max_bytes=64 * 1024 * 1024,
                                max_partition_fetch_bytes=16 * 1024 * 1024)
    seen, first = 0, None
    while seen < n:
        batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
        for messages in batch.values():
            if first is None:
                first = time.perf_counter()
            for message in messages:
                json.loads(message.value)
            seen += len(messages)
    elapsed = time.perf_counter() - (first or 0)
    await consumer.stop()
    return n / elapsed


FAUST_AGENT = textwrap.dedent('''
    import json, os, sys, time
    import faust
    N = int(os.environ["BENCH_N"])
    app = faust.App("bench-faust-" + os.environ["BENCH_TOPIC"], broker=os.environ["BENCH_BROKER"],
                    web_enabled=False, broker_session_timeout=6, broker_heartbeat_interval=1,
                    broker_rebalance_timeout=10, consumer_auto_offset_reset="earliest")
    topic = app.topic(os.environ["BENCH_TOPIC"], value_serializer="raw")
    state = {"n": 0, "first": None}

    @app.agent(topic)
    async def count(stream):
        async for value in stream:
            if state["first"] is None:
                state["first"] = time.perf_counter()
            json.loads(value)
            state["n"] += 1
            if state["n"] == N:
                elapsed = time.perf_counter() - state["first"]
                print(f"RATE {N / elapsed:.1f}", flush=True)
                os._exit(0)

    app.main()
''')


def faust_default(broker_url: str, topic: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "faust_bench.py"
        script.write_text(FAUST_AGENT)
        env = {**os.environ, "BENCH_N": str(n), "BENCH_TOPIC": topic, "BENCH_BROKER": broker_url}
        done = subprocess.run([sys.executable, str(script), "worker", "-l", "warn",
                               "--without-web"], env=env, capture_output=True, text=True,
                              timeout=1200, cwd=tmp)
    found = re.search(r"RATE ([0-9.]+)", done.stdout + done.stderr)  # Faust wraps stdout in logs
    if found:
        return float(found.group(1))
    raise RuntimeError(f"faust bench printed no rate: {done.stdout[-500:]} {done.stderr[-2000:]}")


async def naive(bootstrap: str, redis_url: str, topic: str, n: int, features_n: int) -> float:
    """One awaited Redis command per event per feature: what the seed code did."""
    client = aioredis.Redis.from_url(redis_url)
    consumer = await from_start(bootstrap, topic)
    seen, first = 0, None
    while seen < n:
        batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
        for messages in batch.values():
            for message in messages:
                if seen >= n:
                    break
                if first is None:
                    first = time.perf_counter()
                event = json.loads(message.value)
                for f in range(features_n):
                    await client.hincrby(f"naive:{{user:{event['user_id']}}}", f"f{f}", 1)
                seen += 1
    elapsed = time.perf_counter() - (first or 0)
    await consumer.stop()
    await client.aclose()
    return n / elapsed


def process_cpu(pid: int) -> float:
    """CPU seconds (user + sys) process ``pid`` has used so far (/proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def eventpulse_worker(broker_url: str, bootstrap: str, redis_url: str, topic: str, n: int,
                            workdir: Path, group_suffix: str = "",
                            cpu: list[float] | None = None) -> float:
    """The worker's events/s over ``n`` preloaded events; ``cpu`` gets the worker process'
    CPU seconds from ready to done (less swayed than events/s by what else the machine runs:
    bench/ab_worker.py prints it per event)."""
    group = f"bench-{topic}{group_suffix}"
    port = free_port()
    env = worker_env(broker_url, redis_url, topic, group, workdir, port,
                     EVENTPULSE_SESSION_TIMEOUT_MS="6000")
    worker = start("worker", env, workdir / f"worker{group_suffix}.log")
    client = connect_async(redis_url)
    watcher = commit_watcher(bootstrap, group)
    await watcher.start()
    try:
        wait_for_port(port, timeout=60, process=worker)
        ready_cpu = process_cpu(worker.pid)
        rate = Rate(n, time.perf_counter)
        # Kafka's committed offsets: the worker commits a batch only once Redis holds it
        while not rate.see(await committed_total(watcher, topic)):
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited; see {workdir / 'worker.log'}")
            await asyncio.sleep(0.01)
        await redis_holds(client, group, n)
        if cpu is not None:
            cpu.append(process_cpu(worker.pid) - ready_cpu)
        # the first batch was already in Redis when the clock started
        return rate.per_s
    finally:
        stop([worker])
        await watcher.stop()
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--naive-events", type=int, default=5_000)
    parser.add_argument("--distribution", choices=["zipf", "uniform"], default="zipf")
    parser.add_argument("--redis", choices=["single", "cluster"], default="single",
                        help="cluster: also run the worker on a local 3-primary Redis Cluster")
    args = parser.parse_args()
    n = args.events
    workdir = Path(tempfile.mkdtemp(prefix="eventpulse-bench-"))
    with TansuBroker() as broker, LocalRedis() as redis_server:
        topic = f"bench-{int(time.time())}"
        events = make_events(n, args.distribution)
        started = time.perf_counter()
        asyncio.run(preload(broker.bootstrap, topic, events))
        print(f"preloaded {n} events ({args.distribution} users/items) in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
        faust_rate = faust_default(broker.url, topic, n)
        print(f"faust default agent (decode + count): {faust_rate:,.0f} events/s", flush=True)
        naive_rate = asyncio.run(naive(broker.bootstrap, redis_server.url, topic,
                                       args.naive_events, 10))
        print(f"naive (1 Redis round trip per event per feature, 10 features): "
              f"{naive_rate:,.0f} events/s", flush=True)
        # the ceiling right before and right after the worker, and their mean: the machine's
        # speed drifts by tens of percent within a minute, so a ceiling taken while the
        # baselines ran (half a minute earlier) measured another machine than the worker's
        ceiling_before = asyncio.run(ceiling(broker.bootstrap, topic, n))
        before = redis_cpu([redis_server.port])
        rate = asyncio.run(eventpulse_worker(broker.url, broker.bootstrap, redis_server.url, topic,
                                             n, workdir))
        single_us = (redis_cpu([redis_server.port])[0] - before[0]) / n * 1e6
        ceiling_after = asyncio.run(ceiling(broker.bootstrap, topic, n))
        ceiling_rate = (ceiling_before + ceiling_after) / 2
        print(f"ceiling (raw aiokafka, decode only): {ceiling_rate:,.0f} events/s "
              f"({ceiling_before:,.0f} just before the worker, {ceiling_after:,.0f} just after)",
              flush=True)
        print(f"eventpulse worker (10 features, exactly-once writes): {rate:,.0f} events/s; "
              f"Redis CPU {single_us:.2f} us/event", flush=True)
        cluster_rate = cluster_us = None
        if args.redis == "cluster":
            with LocalRedisCluster(primaries=3, replicas=0) as cluster:
                ports = cluster.primary_ports()
                before = redis_cpu(ports)
                cluster_rate = asyncio.run(eventpulse_worker(broker.url, broker.bootstrap, cluster.url,
                                                             topic, n,
                                                             workdir, "-cluster"))
                per_primary = [(after - was) / n * 1e6
                               for was, after in zip(before, redis_cpu(ports), strict=True)]
            cluster_us = sum(per_primary) / len(per_primary)
            print(f"eventpulse worker on a 3-primary Redis Cluster: {cluster_rate:,.0f} "
                  f"events/s; Redis CPU per primary "
                  f"{', '.join(f'{us:.2f}' for us in per_primary)} us/event", flush=True)
    last = (f"throughput_ratio_vs_ceiling={rate / ceiling_rate:.3f} "
            f"speedup_vs_faust_default={rate / faust_rate:.2f} "
            f"speedup_vs_naive={rate / naive_rate:.1f} events_per_s={rate:.0f}")
    if cluster_rate is not None:
        last += (f" cluster_events_per_s={cluster_rate:.0f} redis_us_per_event_single="
                 f"{single_us:.2f} redis_us_per_event_per_primary={cluster_us:.2f}")
    print(last)


def redis_cpu(ports: list[int]) -> list[float]:
    """CPU seconds (user + sys) each Redis on ``ports`` has used so far (``INFO cpu``)."""
    import redis

    out = []
    for port in ports:
        client = redis.Redis(port=port)
        info = client.info("cpu")
        client.close()
        out.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return out


if __name__ == "__main__":
    main()
