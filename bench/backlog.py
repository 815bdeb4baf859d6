"""Catching up a backlog while Redis is read: write-script length, reader latency, worker memory.

    .venv/bin/python bench/backlog.py [--events 1000000] [--items 200000] [--set EVENTPULSE_X=V]
                                      [--placement shared|nice|pinned]

Starts a local broker and Redis, preloads N behaviour events over N distinct users (and
``--items`` items) into a 4-partition topic, then starts one worker with default settings and the
10-feature workload of bench/throughput.py. In the same run a reader does the 100-entity
``get_many`` every 10 ms against the same Redis. Prints the catch-up rate, the reader's
p50/p99/max, the longest write script (from SLOWLOG), the BUSY errors the reader got and the
worker's peak RSS (with its RSS at each quarter of the backlog, to show whether it grows with
the number of distinct keys), and ends with one machine-readable line.

``--placement`` models where the processes run. ``shared`` (the default): everything competes
for the machine's cores as the OS pleases. On a real deployment Redis has cores of its own; on a
shared 2-core machine it does not, and SLOWLOG times a script by the wall clock, so a script
whose Redis thread was descheduled looks long. ``nice``: Redis and the reader run at nice -10
(they get a core when they want one, ahead of everything else on the machine; needs root). The
worker and the broker keep nice 0: lowering them made the worker lose to the other work of the
shared machine (1k events/s). ``pinned``: as ``nice``, and Redis and the
reader on CPU 0, the worker and the broker on CPU 1 (other processes of the machine still go
anywhere, but yield to Redis on CPU 0).
After the catch-up the reader goes on alone for ``--idle-seconds``, reported apart: what
the same reads cost on the same data with no writer, the machine's own noise. Also prints
what Redis' latency monitor saw (events over 10 ms), its Lua memory, when the slowest script
ran, and how long Redis' main thread waited for a CPU (``/proc`` schedstat: in all, and the
most within any 25 ms, with when): a script SLOWLOG times far above its cost waited for a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from eventpulse.local.servers import LocalRedis, TansuBroker, free_port, wait_for_port
from eventpulse.tables.client import AsyncFeatureClient
from eventpulse.tables.spec import FeatureSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit_watcher, committed_total, preload, start, worker_env


def make_events(n: int, items: int) -> list[bytes]:
    """N events, each from a user never seen before (the worst case: nothing combines)."""
    rng = random.Random(5)
    now = int(time.time() * 1000) - 30 * 60_000
    step = max(1, 20 * 60_000 // max(n, 1))  # N events over about 20 minutes of event time
    out = []
    for i in range(n):
        record: dict[str, object] = {
            "timestamp": now + i * step, "user_id": f"u{i}", "item_id": f"i{rng.randrange(items)}",
            "device": rng.choice(["ios", "android", "web"]),
            "action": rng.choice(["click", "view", "view", "watch", "swipe"])}
        if record["action"] == "watch":
            record["watch"] = round(rng.uniform(1, 600), 1)
        out.append(json.dumps(record).encode())
    return out


PLACEMENTS = ("shared", "nice", "pinned")


def _threads(pid: int) -> list[int]:
    """Every thread of ``pid``: nice and CPU affinity are per thread on Linux."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def place(placement: str, redis_pids: list[int], worker_pids: list[int]) -> None:
    """Apply ``--placement`` to the running processes (see the module docstring)."""
    if placement == "shared":
        return
    for pid in redis_pids:
        for tid in _threads(pid):
            os.setpriority(os.PRIO_PROCESS, tid, -10)
            if placement == "pinned":
                os.sched_setaffinity(tid, {0})
    if placement == "pinned":
        for pid in worker_pids:
            for tid in _threads(pid):
                os.sched_setaffinity(tid, {1})


class RunQueueWatch:
    """Samples how long Redis' main thread has waited for a CPU (``/proc/<pid>/schedstat``:
    time runnable but not running), every few ms, in a thread of the bench: a script that
    SLOWLOG times at 20 ms while costing 1 ms is a script whose thread waited for a core."""

    def __init__(self, pid: int, every_s: float = 0.005) -> None:
        self.path = Path(f"/proc/{pid}/task/{pid}/schedstat")
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []  # (wall clock, ns waited so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                waited = int(self.path.read_text().split()[1])
            except (OSError, IndexError, ValueError):
                return
            self.samples.append((time.time(), waited))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()

    def longest(self, window_s: float = 0.025) -> tuple[float, float]:
        """The most Redis waited within any ``window_s`` (ms), and when (wall clock)."""
        best, at, first = 0, 0.0, 0
        for when, waited in self.samples:
            while self.samples[first][0] < when - window_s:
                first += 1
            if waited - self.samples[first][1] > best:
                best, at = waited - self.samples[first][1], when
        return best / 1e6, at

    def total_ms(self) -> float:
        return (self.samples[-1][1] - self.samples[0][1]) / 1e6 if self.samples else 0.0


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def reader(url: str, users: int, stop: Event) -> dict[str, Any]:
    """The 100-entity get_many every 10 ms until ``stop``, timed; errors counted by their first
    word."""
    client = aioredis.Redis.from_url(url)
    rng = random.Random(7)
    latencies: list[tuple[float, float]] = []  # (wall clock at the start, milliseconds)
    errors: dict[str, int] = {}
    while not await client.exists("ep:features"):  # noqa: ASYNC110 (polling Redis)
        await asyncio.sleep(0.05)
    features_client = AsyncFeatureClient(client, await _specs(client))
    while not stop.is_set():
        ids = [f"u{rng.randrange(users)}" for _ in range(100)]
        started, wall = time.perf_counter(), time.time()
        try:
            await features_client.get_many("user", ids)
        except RedisError as exc:  # BUSY, or a timeout while Redis is stuck in a script
            word = str(exc).split(" ", 1)[0] if isinstance(exc, ResponseError) else (
                type(exc).__name__)
            errors[word] = errors.get(word, 0) + 1
        latencies.append((wall, (time.perf_counter() - started) * 1000))
        await asyncio.sleep(0.01)
    await client.aclose()
    return {"latencies": latencies, "errors": errors}


def reader_process(url: str, users: int, stop: Event, out: Path) -> None:
    """The reader in a process of its own, as a recommender would be: its timings must not
    include the bench's own work (the offset watcher, RSS sampling) on a shared event loop."""
    out.write_text(json.dumps(asyncio.run(reader(url, users, stop))))


async def _specs(client: aioredis.Redis) -> list[FeatureSpec]:
    raw = await client.hgetall("ep:features")
    return [FeatureSpec.model_validate_json(v) for v in raw.values()]


async def run(broker_url: str, bootstrap: str, redis_url: str, topic: str, n: int,
              workdir: Path, overrides: dict[str, str], placement: str = "shared",
              server_pids: tuple[int, int] = (0, 0), idle_seconds: float = 10.0,
              ) -> dict[str, float]:
    group = f"bench-{topic}"
    client = aioredis.Redis.from_url(redis_url)
    await client.config_set("slowlog-log-slower-than", 2000)  # µs: every call over 2 ms
    await client.config_set("slowlog-max-len", 100_000)
    await client.slowlog_reset()
    await client.config_set("latency-monitor-threshold", 10)  # ms
    await client.execute_command("LATENCY", "RESET")
    port = free_port()
    env = worker_env(broker_url, redis_url, topic, group, workdir, port, **overrides)
    worker = start("worker", env, workdir / "worker.log")
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    read_out = workdir / "reader.json"
    read_proc = spawn.Process(target=reader_process, args=(redis_url, n, stop, read_out))
    read_proc.start()
    redis_pid, broker_pid = server_pids
    place(placement, [redis_pid, read_proc.pid or 0], [worker.pid, broker_pid])
    rss_at: list[tuple[int, float]] = []
    watcher = commit_watcher(bootstrap, group)
    await watcher.start()
    waits = RunQueueWatch(redis_pid) if redis_pid else None
    try:
        wait_for_port(port, timeout=60, process=worker)
        if waits is not None:
            waits.start()
        place(placement, [redis_pid, read_proc.pid or 0], [worker.pid, broker_pid])  # new threads
        first = first_done = None
        crashed: tuple[int, int] | None = None
        caught_up = float("inf")
        peak = 0.0
        quarter = 1
        while True:
            done = await committed_total(watcher, topic)
            if done and first is None:
                first, first_done = time.perf_counter(), done
            while done >= n * quarter / 4 and quarter <= 4:
                rss_at.append((done, rss_mb(worker.pid)))
                quarter += 1
            if done >= n:
                caught_up = time.time()
                break
            if worker.poll() is not None:  # crashed: report what was measured until then
                crashed = (done, worker.returncode)
                print(f"WORKER EXITED (code {worker.returncode}) after {done} of {n} records; "
                      f"see {workdir / 'worker.log'}", flush=True)
                break
            peak = rss_mb(worker.pid, "VmHWM")
            await asyncio.sleep(0.2)
        assert first is not None and first_done is not None
        elapsed = time.perf_counter() - first
        rate = (done - first_done) / elapsed if elapsed > 0 else float("inf")
        if crashed is None:
            peak = rss_mb(worker.pid, "VmHWM")
            await asyncio.sleep(idle_seconds)  # the reader alone: the machine's own noise
    finally:
        if waits is not None:
            waits.stop()
        stop.set()
        read_proc.join(60)
        worker.terminate()
        worker.wait(30)
        await watcher.stop()
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    latency = await client.execute_command("LATENCY", "LATEST")
    memory = await client.info("memory")
    print("latency monitor (event, latest ms, max ms): "
          + (", ".join(f"{_text(e[0])} {e[2]} {e[3]}" for e in latency) or "nothing over 10 ms")
          + f"; Lua memory {memory.get('used_memory_lua', 0) / 2**20:.1f} MB", flush=True)
    slow = await client.slowlog_get(100_000)
    evals = [e for e in slow if bytes(e["command"][:4]).upper() in (b"EVAL", b"FCAL")]
    scripts = [e["duration"] / 1000 for e in evals]
    if evals:  # which call was the slowest: EVALSHA <sha> <number of keys> <first key>
        top = max(evals, key=lambda e: e["duration"])
        print("slowest script:", b" ".join(bytes(top["command"]).split(b" ")[2:4]).decode(
            errors="replace"), "at", time.strftime("%H:%M:%S", time.gmtime(top["start_time"])),
            flush=True)
    if waits is not None and waits.samples:
        longest, at = waits.longest()
        print(f"Redis waiting for a CPU: {waits.total_ms():,.0f} ms in all; at most "
              f"{longest:.1f} ms within 25 ms, at {time.strftime('%H:%M:%S', time.gmtime(at))}"
              f".{int(at % 1 * 1000):03d}", flush=True)
    await client.aclose()
    read = json.loads(read_out.read_text())
    errors: dict[str, int] = read["errors"]
    ordered = sorted(ms for at, ms in read["latencies"] if at < caught_up)
    idle = sorted(ms for at, ms in read["latencies"] if at > caught_up + 1)
    if idle:
        print(f"reader after the catch-up ({idle_seconds:.0f} s, same data, no writes): "
              f"p50 {statistics.median(idle):.2f} ms, p99 {idle[int(len(idle) * 0.99)]:.2f} ms, "
              f"max {idle[-1]:.1f} ms over {len(idle)} reads", flush=True)
    print("worker RSS at each quarter (records applied, MB): "
          + ", ".join(f"{d}: {r:.0f}" for d, r in rss_at), flush=True)
    print(f"reader: {len(ordered)} reads, errors {errors or 'none'}", flush=True)
    if ordered:  # where the tail starts: beyond one script's length, reads waited for a core
        print("reader percentiles (ms): " + ", ".join(
            f"p{q * 100:g} {ordered[min(len(ordered) - 1, int(len(ordered) * q))]:.2f}"
            for q in (0.5, 0.9, 0.95, 0.98, 0.99, 0.995)), flush=True)
    by_ms: dict[int, int] = {}
    for duration in scripts:
        by_ms[min(int(duration), 20)] = by_ms.get(min(int(duration), 20), 0) + 1
    print("scripts over 2 ms by whole ms: " + (", ".join(
        f"{ms}{'+' if ms == 20 else ''}: {n}" for ms, n in sorted(by_ms.items())) or "none"),
        flush=True)
    print(f"scripts: {stats.get('calls', 0)} calls, mean {stats.get('usec_per_call', 0) / 1000:.2f} ms; "
          f"{len(scripts)} over 2 ms, {sum(d > 20 for d in scripts)} over 20 ms; slowest (ms): "
          f"{sorted(scripts, reverse=True)[:6]}", flush=True)
    return {
        "rate": rate,
        "p50": statistics.median(ordered) if ordered else 0.0,
        "p99": ordered[int(len(ordered) * 0.99)] if ordered else 0.0,
        "max": ordered[-1] if ordered else 0.0,
        "longest": max(scripts, default=0.0),
        "busy": errors.get("BUSY", 0),
        "peak": peak,
    }


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--set", action="append", default=[], metavar="EVENTPULSE_X=V",
                        help="a worker setting other than its default (repeatable)")
    parser.add_argument("--placement", choices=PLACEMENTS, default="shared",
                        help="where Redis, the reader, the worker and the broker run "
                             "(see the module docstring)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="the reader keeps reading this long after the catch-up, alone "
                             "(reported apart: the machine's own noise)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    n = args.events
    workdir = Path(tempfile.mkdtemp(prefix="eventpulse-backlog-"))
    with TansuBroker() as broker, LocalRedis() as redis_server:
        topic = f"backlog-{int(time.time())}"
        events = make_events(n, args.items)
        started = time.perf_counter()
        asyncio.run(preload(broker.bootstrap, topic, events))
        del events
        print(f"placement: {args.placement}; load average before the run: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        print(f"preloaded {n} events over {n} users and {args.items} items in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
        assert redis_server.process is not None and broker.process is not None
        out = asyncio.run(run(broker.url, broker.bootstrap, redis_server.url, topic, n, workdir,
                              overrides, args.placement,
                              (redis_server.process.pid, broker.process.pid),
                              args.idle_seconds))
    print(f"catch-up: {out['rate']:,.0f} events/s; reader p50 {out['p50']:.2f} ms, "
          f"p99 {out['p99']:.2f} ms, max {out['max']:.1f} ms; longest write script "
          f"{out['longest']:.1f} ms; BUSY errors {out['busy']}; worker peak RSS "
          f"{out['peak']:.0f} MB", flush=True)
    print(f"backlog_events_per_s={out['rate']:.0f} reader_p99_ms={out['p99']:.2f} "
          f"reader_max_ms={out['max']:.1f} longest_script_ms={out['longest']:.1f} "
          f"busy_errors={out['busy']} peak_rss_mb={out['peak']:.0f}")


if __name__ == "__main__":
    main()
