"""A/B of the worker alone on one preloaded topic: alternating configurations, a fresh Redis each.

    .venv/bin/python bench/ab_worker.py --rounds 3 "A:EVENTPULSE_X=1" "B:PYTHONSAFEPATH=1,PYTHONPATH=/other"

Each configuration is ``label:VAR=value,VAR=value`` (environment of the worker process; a
``PYTHONPATH`` with ``PYTHONSAFEPATH=1`` runs another checkout's worker: without it
``python -m`` puts the current directory first). Prints events/s per run (measured as
``bench/throughput.py`` does, from the Kafka offsets the worker commits) and the Redis CPU each
run cost per event (``INFO cpu``) and the worker's own CPU per event (from ready to done; on
a machine whose speed drifts it tells a change in the worker's work apart better than events/s),
and per label the medians. For deciding between settings
quickly; the figures of record come from throughput.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest.mock import patch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import preload
from throughput import eventpulse_worker, make_events, redis_cpu

from eventpulse.local.servers import LocalRedis, TansuBroker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", metavar="LABEL:VAR=V,...")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    configs: list[tuple[str, dict[str, str]]] = []
    for config in args.configs:
        label, _, assignments = config.partition(":")
        configs.append((label, dict(a.split("=", 1) for a in assignments.split(",") if a)))
    workdir = Path(tempfile.mkdtemp(prefix="eventpulse-ab-"))
    rates: dict[str, list[float]] = {label: [] for label, _ in configs}
    worker_us: dict[str, list[float]] = {label: [] for label, _ in configs}
    with TansuBroker() as broker:
        topic = f"ab-{int(time.time())}"
        asyncio.run(preload(broker.bootstrap, topic, make_events(args.events)))
        for round_ in range(args.rounds):
            for index, (label, env) in enumerate(configs):
                # the worker's environment is the bench's plus ``env`` (bench/common.worker_env)
                with patch.dict(os.environ, env), LocalRedis() as redis_server:
                    before = redis_cpu([redis_server.port])[0]
                    cpu: list[float] = []
                    rate = asyncio.run(eventpulse_worker(
                        broker.url, broker.bootstrap, redis_server.url, topic, args.events,
                        workdir, f"-{round_}-{index}", cpu))
                    redis_us = (redis_cpu([redis_server.port])[0] - before) / args.events * 1e6
                rates[label].append(rate)
                worker_us[label].append(cpu[0] / args.events * 1e6)
                load = os.getloadavg()[0]
                print(f"round {round_} {label}: {rate:,.0f} events/s, Redis {redis_us:.2f} "
                      f"us/event, worker {worker_us[label][-1]:.2f} us/event (load {load:.2f})",
                      flush=True)
    for label, values in rates.items():
        print(f"{label}: median {statistics.median(values):,.0f} events/s over "
              f"{', '.join(f'{v:,.0f}' for v in values)}; worker CPU median "
              f"{statistics.median(worker_us[label]):.2f} us/event")


if __name__ == "__main__":
    main()
