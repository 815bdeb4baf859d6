"""The end-to-end slice: a real worker process, a real broker, a real redis-server, and slack-sdk
talking HTTP to a Slack-like server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Any

from tests.conftest import WorkerProcess, produce, unique, wait_until
from tests.fakeslack import FakeSlack


def slice_config(events: str, metrics: str) -> dict[str, Any]:
    return {
        "topics": {events: "behaviour", metrics: "metric"},
        "partitions": 2,
        "features": [{
            "name": "clicks_5m", "topic": events, "entity": "user", "key": "user_id",
            "where": {"action": "click"}, "aggregation": "count",
            "window": {"type": "hopping", "size": "5m", "step": "10s", "lateness": "30s"},
        }],
        "alerts": {
            "routes": [{"severity": ["critical"], "channel": "#oncall"}],
            "rules": [{
                "name": "DiskAlmostFull", "kind": "threshold", "metric": "disk_used_percent",
                "op": ">", "threshold": 90, "clear": 85, "for": "0s", "severity": "critical",
                "group_by": ["host"],
                "annotations": {"summary": "disk on {labels[host]} is {value}% full"},
            }],
        },
    }


def features_get(worker: WorkerProcess, *args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "eventpulse", "features", "get", *args],
                          env=worker.env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def features_get_when_ready(worker: WorkerProcess, *args: str) -> dict[str, Any] | None:
    """None until the worker has registered its features."""
    try:
        return features_get(worker, *args)
    except AssertionError:
        return None


async def test_click_updates_feature_and_disk_alert_fires_once_and_resolves_once(
        kafka: Any, fake_slack: FakeSlack, make_worker: Any) -> None:
    events, metrics = unique("events"), unique("metrics")
    worker = make_worker(slice_config(events, metrics), unique("slice"), fake_slack).start()
    now = int(time.time() * 1000)
    past = now - 20_000  # inside a closed 10 s step, so the current window includes it
    clicks = [{"timestamp": past, "user_id": "u1", "item_id": f"i{i}", "action": "click",
               "device": "ios"} for i in range(3)]
    noise = [{"timestamp": past, "user_id": "u1", "item_id": "i9", "action": "view"},
             {"timestamp": past, "user_id": "u2", "item_id": "i9", "action": "click"}]
    await produce(kafka.bootstrap, events, clicks + noise, key=lambda r: r["user_id"].encode())

    def clicks_of_u1() -> Any:
        values = features_get_when_ready(worker, "user", "u1")
        return values["clicks_5m"] if values and values["clicks_5m"]["value"] == 3 else None

    feature = await wait_until(clicks_of_u1, timeout=90, message="clicks_5m of u1 == 3")
    assert feature["newest_event_ms"] == past
    assert feature["window_end_ms"] - feature["window_start_ms"] == 300_000
    assert features_get(worker, "user", "u2")["clicks_5m"]["value"] == 1

    def sample(value: float, host: str = "web-1") -> dict[str, Any]:
        return {"timestamp": int(time.time() * 1000), "name": "disk_used_percent",
                "value": value, "labels": {"host": host, "mount": "/"}}

    await produce(kafka.bootstrap, metrics, [sample(93.5)], key=lambda r: b"web-1")
    await wait_until(lambda: fake_slack.posts(), message="the firing message")
    # more bad samples, and one between clear (85) and threshold (90): still firing, no message
    await produce(kafka.bootstrap, metrics, [sample(95.0), sample(97.0), sample(88.0)],
                  key=lambda r: b"web-1")
    await produce(kafka.bootstrap, metrics, [sample(50.0, "web-2")], key=lambda r: b"web-2")
    await asyncio.sleep(3)
    assert len(fake_slack.posts()) == 1
    firing = fake_slack.posts()[0]
    assert firing.channel == fake_slack.channel_id("oncall")
    assert "FIRING" in firing.text and "web-1" in firing.text and "93.5" in firing.text

    await produce(kafka.bootstrap, metrics, [sample(80.0)], key=lambda r: b"web-1")
    await wait_until(lambda: len(fake_slack.posts()) == 2, message="the resolve message")
    resolve = fake_slack.posts()[1]
    assert "RESOLVED" in resolve.text
    assert resolve.thread_ts == firing.ts, "the resolve goes into the firing message's thread"
    await wait_until(lambda: fake_slack.updates(), message="the original message updated")
    assert fake_slack.updates()[0].ts == firing.ts
    assert "Resolved" in fake_slack.updates()[0].text
    await asyncio.sleep(2)
    assert len(fake_slack.posts()) == 2, "one message per state change, not per sample"
    assert "xoxb-test-secret-token" not in worker.log()
    assert f'eventpulse_records_consumed_total{{topic="{events}"}} 5.0' in worker.metrics()
