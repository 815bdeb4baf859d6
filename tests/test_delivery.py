"""Slack delivery through the real slack-sdk against the Slack-like server, outbox in real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from eventpulse.alerts.delivery import BotTransport, Deliverer, Posted
from eventpulse.alerts.evaluate import AlertEvaluator
from eventpulse.alerts.outbox import AlertStore
from eventpulse.alerts.rules import AlertingConfig
from tests.conftest import wait_until
from tests.fakeslack import FakeSlack

CONFIG = AlertingConfig.model_validate({
    "routes": [{"severity": ["critical"], "channel": "#oncall"}],
    "rules": [{"name": "Disk", "kind": "threshold", "metric": "disk", "threshold": 90,
               "for": "0s", "severity": "critical", "group_by": ["dc"], "group_wait": "1s"}],
})


class Metrics:
    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.failures: list[str] = []
        self.suppressed_count = 0

    def sent(self, kind: str, latency_s: float) -> None:
        self.kinds.append(kind)

    def failed(self, reason: str) -> None:
        self.failures.append(reason)

    def suppressed(self) -> None:
        self.suppressed_count += 1


async def decide(store: AlertStore, ev: AlertEvaluator, value: float, host: str,
                 at_ms: int) -> None:
    transitions = ev.on_metric("disk", value, {"host": host, "dc": "eu"}, at_ms, "m:0")
    await store.save(ev.engine.take_dirty(), ev.entries(transitions, int(time.time() * 1000)))


async def run_until_empty(deliverer: Deliverer, store: AlertStore, timeout: float = 30) -> None:
    task = asyncio.create_task(deliverer.run())
    try:
        await wait_until(lambda: _empty(store), timeout=timeout, message="outbox drained")
    finally:
        # a deliverer that outlived its test would deliver the next test's alerts
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task


async def _empty(store: AlertStore) -> bool:
    return not await store.outbox()


def bot(slack: FakeSlack) -> BotTransport:
    return BotTransport("xoxb-test", slack.base_url, timeout=2)


async def test_grouped_firing_then_threaded_resolves_in_order(aredis: aioredis.Redis,
                                                              fake_slack: FakeSlack) -> None:
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    await decide(store, ev, 95, "a", 0)
    await decide(store, ev, 96, "b", 0)  # same group (dc=eu), within group_wait: one message
    hooks = Metrics()
    deliverer = Deliverer(store, CONFIG, bot(fake_slack), hooks, pace_s=0.2)
    await run_until_empty(deliverer, store)
    posts = fake_slack.posts()
    assert len(posts) == 1 and posts[0].channel == "#oncall"
    assert "(2 alerts)" in posts[0].text and "host=a" in posts[0].text and "host=b" in posts[0].text
    await decide(store, ev, 10, "a", 1000)
    await decide(store, ev, 10, "b", 1000)
    await run_until_empty(deliverer, store)
    posts = fake_slack.posts()
    assert [p.thread_ts for p in posts[1:]] == [posts[0].ts, posts[0].ts]
    assert ["host=a" in posts[1].text, "host=b" in posts[2].text] == [True, True]
    assert len(fake_slack.updates()) == 2
    assert hooks.kinds == ["firing", "firing", "resolved", "resolved"]


async def test_rate_limit_honours_retry_after_and_5xx_are_retried(aredis: aioredis.Redis,
                                                                  fake_slack: FakeSlack) -> None:
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    await decide(store, ev, 95, "a", 0)
    fake_slack.fail_next(1, 429, retry_after=2)
    started = time.monotonic()
    deliverer = Deliverer(store, CONFIG, bot(fake_slack), Metrics(), pace_s=0.1)
    await run_until_empty(deliverer, store)
    assert time.monotonic() - started >= 2.0
    assert len(fake_slack.posts()) == 1

    await decide(store, ev, 10, "a", 1000)
    hooks = Metrics()
    fake_slack.fail_next(8, 500)  # longer than slack-sdk's own retries: the outbox keeps it
    deliverer = Deliverer(store, CONFIG, bot(fake_slack), hooks, pace_s=0.1, max_backoff_s=0.5)
    await run_until_empty(deliverer, store)
    assert len(fake_slack.posts()) == 2
    assert hooks.failures and hooks.kinds == ["resolved"]


class DiesAfterPosting(BotTransport):
    """Slack got the message, then the worker died before recording it."""

    async def post(self, channel: str, text: str, blocks: list[dict[str, Any]], keys: list[str],
                   thread_ts: str | None = None) -> Posted:
        await super().post(channel, text, blocks, keys, thread_ts)
        raise asyncio.CancelledError("killed")


async def test_a_crash_between_sending_and_recording_does_not_send_twice(
        aredis: aioredis.Redis, fake_slack: FakeSlack) -> None:
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    await decide(store, ev, 95, "a", 0)
    await asyncio.sleep(1.1)  # group_wait
    dying = Deliverer(store, CONFIG, DiesAfterPosting("xoxb", fake_slack.base_url), Metrics())
    with contextlib.suppress(asyncio.CancelledError):
        await dying.deliver_due()
    assert len(fake_slack.posts()) == 1 and len(await store.outbox()) == 1
    restarted = Deliverer(store, CONFIG, bot(fake_slack), Metrics())
    await run_until_empty(restarted, store)
    assert len(fake_slack.posts()) == 1, "found in the channel history, not posted again"
    await decide(store, ev, 10, "a", 1000)
    await run_until_empty(restarted, store)
    assert fake_slack.posts()[1].thread_ts == fake_slack.posts()[0].ts


async def test_messages_to_one_channel_are_paced(aredis: aioredis.Redis,
                                                 fake_slack: FakeSlack) -> None:
    config = AlertingConfig.model_validate({"default_channel": "#x", "rules": [
        {"name": "Disk", "kind": "threshold", "metric": "disk", "threshold": 90, "for": "0s",
         "group_by": ["host"]}]})
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(config)
    for host in "abc":
        transitions = ev.on_metric("disk", 95, {"host": host}, 0, "m:0")
        await store.save(ev.engine.take_dirty(), ev.entries(transitions, 0))
    await run_until_empty(Deliverer(store, config, bot(fake_slack), Metrics(), pace_s=1.0), store)
    times = [p.received_at for p in fake_slack.posts()]
    assert len(times) == 3
    assert times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95


def test_prometheus_delivery_hooks_count() -> None:
    from prometheus_client import REGISTRY

    from eventpulse.metrics import DeliveryMetrics

    def value(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(name, labels or {}) or 0.0

    before = (value("eventpulse_notifications_sent_total", {"kind": "firing"}),
              value("eventpulse_notifications_retried_total"),
              value("eventpulse_notifications_suppressed_total"))
    hooks = DeliveryMetrics()
    hooks.sent("firing", 0.2)
    hooks.failed("SlackApiError")
    hooks.suppressed()
    after = (value("eventpulse_notifications_sent_total", {"kind": "firing"}),
             value("eventpulse_notifications_retried_total"),
             value("eventpulse_notifications_suppressed_total"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


async def test_incoming_webhook_mode(aredis: aioredis.Redis, fake_slack: FakeSlack) -> None:
    from eventpulse.alerts.delivery import WebhookTransport

    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    await decide(store, ev, 95, "a", 0)
    await decide(store, ev, 10, "a", 1000)
    transport = WebhookTransport(fake_slack.base_url + "webhook")
    await run_until_empty(Deliverer(store, CONFIG, transport, Metrics(), pace_s=0.1), store)
    hooks = [c for c in fake_slack.calls if c.method == "webhook"]
    assert [("FIRING" in h.text, "RESOLVED" in h.text) for h in hooks] == [(True, False),
                                                                          (False, True)]


@pytest.mark.parametrize("swallowed_as", ["ConnectionError", "a normal return"])
async def test_a_cancelled_deliverer_stops_even_if_a_library_swallows_the_cancel(
        aredis: aioredis.Redis, fake_slack: FakeSlack, swallowed_as: str) -> None:
    # redis-py's asyncio client, cancelled while its connection is being closed, raises
    # ConnectionError instead of CancelledError: a deliverer retrying on it outlived its task
    # and delivered the next test's alerts
    class ClosingStore(AlertStore):
        async def outbox(self) -> list[Any]:
            reading.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed_as == "ConnectionError":
                    raise redis.exceptions.ConnectionError("Connection closed.") from None
            return []

    reading = asyncio.Event()
    deliverer = Deliverer(ClosingStore(aredis, "ep"), CONFIG, bot(fake_slack), Metrics())
    task = asyncio.create_task(deliverer.run())
    await asyncio.wait_for(reading.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done and task.cancelled(), "the deliverer kept running after it was cancelled"
