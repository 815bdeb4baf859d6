"""From the metric sample that crosses a threshold (``for: 0``) to the Slack-like server receiving
the message: the worker process, a local broker and Redis, slack-sdk over HTTP.

    .venv/bin/python bench/alert_latency.py [--alerts 30]

Samples are sent 1.2 s apart (each a new host, so a new alert), below Slack's one message per
second per channel pace, so the figure is eventpulse's own latency, not the pacing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eventpulse.local.servers import LocalRedis, TansuBroker, free_port, wait_for_port
from tests.fakeslack import FakeSlack

CONFIG = {
    "topics": {"metrics": "metric"}, "partitions": 2,
    "alerts": {"default_channel": "#oncall", "rules": [{
        "name": "DiskAlmostFull", "kind": "threshold", "metric": "disk_used_percent",
        "threshold": 90, "for": "0s", "severity": "critical", "group_by": ["host"]}]},
}


async def run(bootstrap: str, slack: FakeSlack, alerts: int) -> list[float]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=False)
    await producer.start()
    # warm-up sample: the worker has joined and the topic exists when this one is applied
    await producer.send_and_wait("metrics", json.dumps({
        "timestamp": int(time.time() * 1000), "name": "disk_used_percent", "value": 10,
        "labels": {"host": "warmup"}}).encode(), key=b"warmup")
    await asyncio.sleep(8)
    latencies = []
    for i in range(alerts):
        host = f"host-{i}"
        sent_at = time.time()
        await producer.send_and_wait("metrics", json.dumps({
            "timestamp": int(sent_at * 1000), "name": "disk_used_percent", "value": 95,
            "labels": {"host": host}}).encode(), key=host.encode())
        deadline = time.time() + 10
        while time.time() < deadline:
            received = [p for p in slack.posts() if f"host={host}" in p.text]
            if received:
                latencies.append(received[0].received_at - sent_at)
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(max(0.0, 1.2 - (time.time() - sent_at)))
    await producer.stop()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=30)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="eventpulse-alert-bench-"))
    slack = FakeSlack().start()
    with TansuBroker() as broker, LocalRedis() as redis_server:
        config_path = workdir / "alerts.yaml"
        config_path.write_text(yaml.safe_dump(CONFIG))
        port = free_port()
        env = {**os.environ, "EVENTPULSE_BROKER_URL": broker.url,
               "EVENTPULSE_REDIS_URL": redis_server.url, "EVENTPULSE_CONFIG_PATH": str(config_path),
               "EVENTPULSE_METRICS_PORT": str(port), "EVENTPULSE_SESSION_TIMEOUT_MS": "6000",
               "EVENTPULSE_SLACK_TOKEN": "xoxb-bench", "EVENTPULSE_SLACK_BASE_URL": slack.base_url,
               "EVENTPULSE_LOG_LEVEL": "WARNING"}
        with open(workdir / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "eventpulse", "worker"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_for_port(port, timeout=60, process=worker)
                latencies = asyncio.run(run(broker.bootstrap, slack, args.alerts))
            finally:
                worker.terminate()
                worker.wait(30)
    slack.stop()
    if len(latencies) < args.alerts:
        raise SystemExit(f"only {len(latencies)} of {args.alerts} alerts arrived; see {workdir}")
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000
    print(f"threshold crossed -> Slack received, {len(ordered)} alerts: p50 {p50:.0f} ms, "
          f"p99 {p99:.0f} ms, max {ordered[-1] * 1000:.0f} ms")
    print(f"alert_latency_p50_ms={p50:.0f} alert_latency_p99_ms={p99:.0f}")


if __name__ == "__main__":
    main()
