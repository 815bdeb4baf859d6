"""Slack delivery through the real slack-sdk against the Slack-like server, outbox in real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from eventpulse.alerts.delivery import BotTransport, Deliverer, Posted, WebhookTransport, _safe
from eventpulse.alerts.evaluate import AlertEvaluator
from eventpulse.alerts.outbox import AlertStore
from eventpulse.alerts.rules import AlertingConfig
from eventpulse.alerts.state import fingerprint
from tests.conftest import wait_until
from tests.fakeslack import FakeSlack
from tests.fakeslack import Posted as SlackMessage

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
        self.parked_reasons: list[str] = []
        self.sizes = (0, 0)
        self.unresolved = -1

    def sent(self, kind: str, latency_s: float) -> None:
        self.kinds.append(kind)

    def failed(self, reason: str) -> None:
        self.failures.append(reason)

    def suppressed(self) -> None:
        self.suppressed_count += 1

    def parked(self, reason: str) -> None:
        self.parked_reasons.append(reason)

    def outbox(self, pending: int, parked: int) -> None:
        self.sizes = (pending, parked)

    def unresolved_channels(self, count: int) -> None:
        self.unresolved = count


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
    assert len(posts) == 1 and posts[0].channel == fake_slack.channel_id("oncall")
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


# -- the Slack stand-in answers as Slack documents it --------------------------------------------

async def test_the_fake_answers_like_slacks_web_api(fake_slack: FakeSlack) -> None:
    """What the crash recovery relies on, checked against the documented behaviour."""
    from slack_sdk.errors import SlackApiError
    from slack_sdk.web.async_client import AsyncWebClient

    client = AsyncWebClient(token="xoxb-test", base_url=fake_slack.base_url)
    meta = {"event_type": "eventpulse_alert", "event_payload": {"keys": "k1"}}
    parent = await client.chat_postMessage(channel="#oncall", text="parent", metadata=meta)
    oncall = fake_slack.channel_id("oncall")
    assert parent["channel"] == oncall, "chat.postMessage answers with the channel's ID"
    reply = await client.chat_postMessage(channel=oncall, text="reply", thread_ts=parent["ts"],
                                          metadata={**meta, "event_payload": {"keys": "k2"}})
    history = await client.conversations_history(channel=oncall)
    assert [m["ts"] for m in history["messages"]] == [parent["ts"]], "parents only"
    assert "metadata" not in history["messages"][0], "metadata only with include_all_metadata"
    thread = await client.conversations_replies(channel=oncall, ts=reply["ts"],
                                                include_all_metadata=True)
    assert [m["ts"] for m in thread["messages"]] == [parent["ts"], reply["ts"]]
    assert thread["messages"][1]["metadata"]["event_payload"] == {"keys": "k2"}
    for call in (lambda: client.conversations_history(channel="#oncall"),
                 lambda: client.conversations_replies(channel="oncall", ts=parent["ts"]),
                 lambda: client.chat_update(channel="#oncall", ts=parent["ts"], text="x")):
        with pytest.raises(SlackApiError) as refused:
            await call()
        assert refused.value.response["error"] == "channel_not_found", "IDs only"
    with pytest.raises(SlackApiError) as refused:
        await client.conversations_replies(channel=oncall, ts="1.000001")
    assert refused.value.response["error"] == "thread_not_found"

    for i in range(5):
        fake_slack.add_channel(f"extra-{i}")
    fake_slack.add_channel("old", archived=True)
    names, cursor, pages = [], None, 0
    while True:
        page = await client.conversations_list(limit=3, cursor=cursor, exclude_archived=True)
        names += [c["name"] for c in page["channels"]]
        pages += 1
        cursor = page["response_metadata"]["next_cursor"]
        if not cursor:
            break
    assert pages == 3 and "old" not in names and {"oncall", "extra-4"} <= set(names)

    archived = fake_slack.add_channel("gone", archived=True)
    outside = fake_slack.add_channel("outside", member=False)
    for channel, error in ((archived, "is_archived"), (outside, "not_in_channel"),
                           ("#nope", "channel_not_found")):
        with pytest.raises(SlackApiError) as refused:
            await client.chat_postMessage(channel=channel, text="x")
        assert refused.value.response["error"] == error
    with pytest.raises(SlackApiError) as refused:
        await client.chat_postMessage(channel=oncall, text="x", blocks=[
            {"type": "section", "text": {"type": "mrkdwn", "text": "y" * 3001}}])
    assert refused.value.response["error"] == "invalid_blocks"


# -- channel IDs, crash recovery through threads, parking ---------------------------------------

async def test_names_are_resolved_once_and_every_later_call_uses_the_id(
        aredis: aioredis.Redis, fake_slack: FakeSlack) -> None:
    for i in range(7):  # more channels than one page of conversations.list
        fake_slack.add_channel(f"team-{i}")
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    transport = BotTransport("xoxb-test", fake_slack.base_url, timeout=2, list_page=2)
    deliverer = Deliverer(store, CONFIG, transport, Metrics(), pace_s=0.05)
    for n, host in enumerate("abc"):
        await decide(store, ev, 95, host, n * 10)
    await run_until_empty(deliverer, store)
    await decide(store, ev, 10, "a", 100)
    await run_until_empty(deliverer, store)
    oncall = fake_slack.channel_id("oncall")
    lists = fake_slack.called("conversations.list")
    assert len(lists) > 1 and lists[1].get("cursor"), "paginated"
    assert len({c.get("cursor") for c in lists}) == len(lists), "listed once, then cached"
    later = [args["channel"] for method in ("chat.update", "conversations.history",
                                            "conversations.replies")
             for args in fake_slack.called(method)]
    later += [p.channel_arg for p in fake_slack.posts()]
    assert later and set(later) == {oncall}


async def test_a_crash_after_posting_a_threaded_resolve_finds_the_reply(
        aredis: aioredis.Redis, fake_slack: FakeSlack) -> None:
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    await decide(store, ev, 95, "a", 0)
    await run_until_empty(Deliverer(store, CONFIG, bot(fake_slack), Metrics(), pace_s=0.05),
                          store)
    await decide(store, ev, 10, "a", 1000)
    dying = Deliverer(store, CONFIG, DiesAfterPosting("xoxb", fake_slack.base_url), Metrics(),
                      pace_s=0.05)
    with contextlib.suppress(asyncio.CancelledError):
        await dying.deliver_due()
    assert len(fake_slack.posts()) == 2 and len(await store.outbox()) == 1
    await run_until_empty(Deliverer(store, CONFIG, bot(fake_slack), Metrics()), store)
    assert len(fake_slack.posts()) == 2, "the reply was found in the thread, not posted again"
    assert fake_slack.called("conversations.replies"), "history does not list replies"
    reply = fake_slack.posts()[1]
    receipt = (await store.sent_keys(reply.outbox_keys()))[reply.outbox_keys()[0]]
    assert (receipt["channel"], receipt["ts"]) == (reply.channel, reply.ts)


def _with_routes(*routes: dict[str, Any]) -> AlertingConfig:
    data = CONFIG.model_dump(by_alias=True)
    data["routes"] = list(routes)
    data["rules"][0]["group_by"] = ["host"]
    data["rules"][0]["group_wait"] = 0
    return AlertingConfig.model_validate(data)


async def test_refused_entries_are_parked_visibly_and_never_block_the_others(
        aredis: aioredis.Redis, fake_slack: FakeSlack) -> None:
    fake_slack.add_channel("frozen", archived=True)
    fake_slack.add_channel("closed", member=False)
    config = _with_routes({"match": {"host": "a"}, "channel": "#frozen"},
                          {"match": {"host": "b"}, "channel": "#closed"},
                          {"match": {"host": "c"}, "channel": "#nope"},
                          {"channel": "#oncall"})
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(config)
    hooks = Metrics()
    transport = BotTransport("xoxb-test", fake_slack.base_url, timeout=2, relist_s=0)
    deliverer = Deliverer(store, config, transport, hooks, pace_s=0.05)
    assert await deliverer.check_channels() == ["#nope"] and hooks.unresolved == 1
    for host in "abcde":
        await decide(store, ev, 95, host, 0)
    await decide(store, ev, 10, "a", 10)  # a's resolve waits behind its parked firing
    # Slack refuses d's message content once; e, decided after it, still goes out
    fake_slack.fail_next(1, 200, error="invalid_blocks", methods={"chat.postMessage"},
                         matching="host=d")
    await run_until_empty(deliverer, store)
    assert [p.channel for p in fake_slack.posts()] == [fake_slack.channel_id("oncall")]
    assert "host=e" in fake_slack.posts()[0].text
    parked = {p.entry.transition.labels["host"] + ":" + p.entry.transition.kind.value:
              p.reason.split(":")[0] for p in await store.parked()}
    assert parked == {"a:firing": "is_archived", "a:resolved": "behind_parked",
                      "b:firing": "not_in_channel", "c:firing": "channel_not_found",
                      "d:firing": "invalid_blocks"}
    assert sorted(hooks.parked_reasons) == sorted(parked.values()) and hooks.sizes[1] == 5

    # a person fixes things and retries: the channel exists now, d's content is accepted
    fake_slack.add_channel("nope")
    retried = await store.unpark([p.entry.key for p in await store.parked()
                                  if p.entry.transition.labels["host"] in "cd"])
    assert len(retried) == 2
    await run_until_empty(deliverer, store)
    assert {("host=c" in p.text, p.channel == fake_slack.channel_id("nope"))
            for p in fake_slack.posts()[1:]} == {(True, True), (False, False)}
    assert len(await store.parked()) == 3


async def test_episodes_of_one_alert_are_never_merged_nor_reordered(
        aredis: aioredis.Redis, fake_slack: FakeSlack) -> None:
    """A backlog (Slack down) of three episodes of host a and one of host b, in one group."""
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    for n, value in enumerate([95, 10, 96, 10, 97]):
        await decide(store, ev, value, "a", n * 1000)
    await decide(store, ev, 95, "b", 5000)
    await decide(store, ev, 10, "b", 6000)
    await asyncio.sleep(1.1)  # group_wait
    await run_until_empty(Deliverer(store, CONFIG, bot(fake_slack), Metrics(), pace_s=0.05),
                          store)
    posts = fake_slack.posts()
    host_of = {fingerprint("Disk", {"host": h, "dc": "eu", "alertname": "Disk"}): h for h in "ab"}
    per_host: dict[str, list[tuple[int, str, SlackMessage]]] = {}
    for post in posts:
        for key in post.outbox_keys():
            fp, seq, kind = key.split(":")
            per_host.setdefault(host_of[fp], []).append((int(seq), kind, post))
    assert [(s, k) for s, k, _ in per_host["a"]] == [
        (1, "firing"), (2, "resolved"), (3, "firing"), (4, "resolved"), (5, "firing")]
    assert [(s, k) for s, k, _ in per_host["b"]] == [(1, "firing"), (2, "resolved")]
    firings_a = [p for _, k, p in per_host["a"] if k == "firing"]
    assert len({p.ts for p in firings_a}) == 3, "each episode its own message"
    resolves_a = [p for _, k, p in per_host["a"] if k == "resolved"]
    assert [r.thread_ts for r in resolves_a] == [firings_a[0].ts, firings_a[1].ts]
    assert "(2 alerts)" in firings_a[0].text, "a's first episode and b's share one message"
    assert all("(3 alerts)" not in p.text for p in posts)


async def test_every_text_field_is_escaped_and_kept_within_slacks_limits(
        aredis: aioredis.Redis, fake_slack: FakeSlack) -> None:
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    await decide(store, ev, 95, "<!channel> & <https://evil|x>" + "&" * 4000, 0)
    await asyncio.sleep(1.1)
    hooks = Metrics()
    await run_until_empty(Deliverer(store, CONFIG, bot(fake_slack), hooks, pace_s=0.05), store)
    assert not hooks.parked_reasons and len(fake_slack.posts()) == 1
    post = fake_slack.posts()[0]
    texts = [post.text] + [json_text for json_text in _strings(post.blocks)]
    for text in texts:
        assert "<!channel>" not in text and "<https://evil" not in text
        assert not re.search(r"&(?!amp;|lt;|gt;)", text), "raw or cut entity"
    assert "(threshold &gt; 90)" in post.text, "the notification text too"


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EVENTPULSE_REDIS_URL": redis_url}
    return subprocess.run([sys.executable, "-m", "eventpulse", "alerts", "outbox", *args],
                          env=env, capture_output=True, text=True, timeout=60)


async def test_parked_entries_are_listed_and_retried_by_a_person(
        aredis: aioredis.Redis, redis_url: str, fake_slack: FakeSlack) -> None:
    fake_slack.add_channel("frozen", archived=True)
    config = _with_routes({"match": {"host": "a"}, "channel": "#frozen"}, {"channel": "#oncall"})
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(config)
    await decide(store, ev, 95, "a", 0)
    await decide(store, ev, 95, "b", 0)
    await run_until_empty(Deliverer(store, config, bot(fake_slack), Metrics(), pace_s=0.05),
                          store)
    [parked] = await store.parked()
    shown = _cli(redis_url)
    assert shown.returncode == 0, shown.stderr
    assert "0 waiting to be sent, 1 parked" in shown.stdout
    line = next(x for x in shown.stdout.splitlines() if x.startswith(parked.entry.key))
    assert "is_archived" in line and "host=a" in line and "#frozen" in line

    refused = _cli(redis_url, "retry", "nosuchkey")
    assert refused.returncode != 0 and "not parked: nosuchkey" in refused.stderr
    assert "Traceback" not in refused.stderr
    retried = _cli(redis_url, "retry", parked.entry.key)
    assert retried.returncode == 0 and f"retrying {parked.entry.key}" in retried.stdout
    assert [e.key for e in await store.outbox()] == [parked.entry.key]
    assert not await store.parked() and not (await store.attempts([parked.entry.key]))
    assert "1 waiting to be sent, 0 parked" in _cli(redis_url).stdout


async def test_a_retried_entry_goes_back_before_its_alerts_newer_entries(
        aredis: aioredis.Redis) -> None:
    store = AlertStore(aredis, "ep")
    ev = AlertEvaluator.build(CONFIG)
    await decide(store, ev, 95, "a", 0)
    await decide(store, ev, 95, "b", 0)
    firing_a, _ = await store.outbox()
    await store.park([firing_a], "is_archived: test")
    await decide(store, ev, 10, "a", 1000)  # a's resolve, decided while its firing is parked
    await decide(store, ev, 10, "b", 1000)
    await store.unpark()
    order = [(e.transition.labels["host"], e.transition.kind.value) for e in await store.outbox()]
    assert order == [("b", "firing"), ("a", "firing"), ("a", "resolved"), ("b", "resolved")]


def test_the_outbox_command_says_in_one_line_when_redis_is_unreachable() -> None:
    from eventpulse.local.servers import free_port

    done = _cli(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "cannot reach Redis at 127.0.0.1" in done.stderr and "hunter2" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_several_workers_post_each_notification_once(aredis: aioredis.Redis,
                                                          fake_slack: FakeSlack) -> None:
    """An outside tester saw every alert posted once per worker: each worker's deliverer
    read the shared outbox, and the channel's history cannot show a post still in flight."""
    stores = [AlertStore(aredis, "ep") for _ in range(3)]  # three workers, one outbox
    ev = AlertEvaluator.build(CONFIG)
    fake_slack.delay_response_s = 0.5  # each post in flight while the others look
    deliverers = [Deliverer(s, CONFIG, bot(fake_slack), Metrics(), pace_s=0.1) for s in stores]
    tasks = [asyncio.create_task(d.run()) for d in deliverers]

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10):
                await task

    try:
        await decide(stores[0], ev, 95, "a", 0)
        await wait_until(lambda: _empty(stores[0]), timeout=30, message="firing delivered")
        await asyncio.sleep(1)  # what another worker had in flight has landed by now
        assert len(fake_slack.posts()) == 1, [p.text for p in fake_slack.posts()]
        # the holder stops cleanly: another worker takes delivery over at once
        holder = await aredis.get(stores[0].keys.delivery_lease)
        index = [s.holder.encode() for s in stores].index(holder)
        await stop(tasks[index])
        await decide(stores[0], ev, 10, "a", 1000)
        await wait_until(lambda: _empty(stores[0]), timeout=20, message="resolve delivered")
    finally:
        for task in tasks:
            await stop(task)
    posts = fake_slack.posts()
    assert len(posts) == 2, [p.text for p in posts]
    assert posts[1].thread_ts == posts[0].ts and "host=a" in posts[1].text


def test_a_failed_delivery_names_the_redis_state_it_waits_for() -> None:
    """During a BUSY script or a pipeline's error the warning says which state Redis is in (its
    own reply, which carries no secret), not only the exception's type."""
    busy = redis.exceptions.ResponseError(
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.")
    assert _safe(busy) == ("ResponseError: BUSY Redis is busy running a script. You can only "
                           "call SCRIPT KILL or SHUTDOWN NOSAVE.")
    wrapped = redis.exceptions.ResponseError(
        "Command # 1 (EVALSHA abc) of pipeline caused error: BUSY Redis is busy\nmore")
    assert _safe(wrapped) == "ResponseError: BUSY Redis is busy"
    assert _safe(ConnectionError("redis://:hunter2@host")) == "ConnectionError"


async def test_a_webhook_outage_logs_neither_its_url_nor_every_retry(
        caplog: pytest.LogCaptureFixture) -> None:
    """An outside tester found slack-sdk's retry handlers printing the webhook's full URL (a
    secret) at INFO, once per retried request of an outage."""
    with socket.socket() as placeholder:  # a port nothing listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    secret = "WebhookSecretXYZ"
    transport = WebhookTransport(f"http://127.0.0.1:{port}/services/T0/B0/{secret}")
    # whatever aiohttp raises for a refused connection
    with caplog.at_level(logging.DEBUG), pytest.raises(Exception):  # noqa: B017
        await transport.post("#alerts", "text", [], [])
    assert secret not in caplog.text
    assert not [r for r in caplog.records if "retry" in r.getMessage().lower()], caplog.text


async def test_an_unreachable_slack_is_reported_once_by_the_channel_check(
        aredis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    transport = BotTransport("xoxb-test", f"http://127.0.0.1:{port}/api/", timeout=2)
    deliverer = Deliverer(AlertStore(aredis, "ep"), CONFIG, transport, Metrics())
    with caplog.at_level(logging.DEBUG, logger="eventpulse.alerts"):
        for _ in range(3):
            await deliverer.check_channels()
    checks = [r for r in caplog.records if "could not check Slack channel" in r.getMessage()]
    assert len(checks) == 3, caplog.text
    assert [r.levelno for r in checks] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
