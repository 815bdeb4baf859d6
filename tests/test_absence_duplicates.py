"""Absence rules through a real worker and the fake Slack: one episode of silence is one
FIRING (and, once samples return, one RESOLVED) per rule and series, never more."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from eventpulse.alerts.state import fingerprint
from eventpulse.local.servers import TansuBroker
from tests.conftest import WorkerProcess, produce, unique, wait_until
from tests.fakeslack import FakeSlack, Posted


def absence_config(metrics: str, inference: str) -> dict[str, Any]:
    return {
        "topics": {metrics: "metric", inference: "inference"}, "partitions": 1,
        "features": [{
            "name": "calls_20s", "topic": inference, "entity": "model", "key": "model",
            "aggregation": "count",
            "window": {"type": "hopping", "size": "20s", "step": "2s", "lateness": "2s"}}],
        "alerts": {
            "default_channel": "#alerts",
            "rules": [
                {"name": "HostSilent", "kind": "absence", "metric": "cpu_percent", "after": "4s"},
                {"name": "ModelSilent", "kind": "absence", "feature": "calls_20s", "after": "4s"},
            ],
        },
    }


SERIES = [("HostSilent", "host", "web-1"), ("ModelSilent", "model", "ranker")]
NAMES = {fingerprint(rule, {label: value, "alertname": rule}): (rule, value)
         for rule, label, value in SERIES}
STATES = {"firing": "FIRING", "resolved": "RESOLVED", "reminder": "STILL FIRING"}


def kinds(posts: list[Posted]) -> list[tuple[str, str, str]]:
    """(state, rule, series) per transition posted, from the outbox keys in each message's
    metadata (a grouped firing names several alerts in one message)."""
    out = []
    for post in posts:
        for key in post.outbox_keys():
            fp, _, kind = key.split(":")
            if fp in NAMES:  # not eventpulse's own input-blind alert (after a SIGKILL)
                rule, series = NAMES[fp]
                out.append((STATES[kind], rule, series))
    return out


async def alive(bootstrap: str, metrics: str, inference: str, seconds: float,
                hosts: tuple[str, ...] = ("web-1",), models: tuple[str, ...] = ("ranker",)) -> None:
    for _ in range(int(seconds * 2)):
        now = int(time.time() * 1000)
        await produce(bootstrap, metrics, [
            {"timestamp": now, "name": "cpu_percent", "value": 1.0, "labels": {"host": h}}
            for h in hosts], key=lambda r: r["labels"]["host"].encode())
        await produce(bootstrap, inference, [
            {"timestamp": now, "model": m, "latency_ms": 5.0, "status": 200} for m in models],
            key=lambda r: r["model"].encode())
        await asyncio.sleep(0.5)


async def _seeing(worker: WorkerProcess) -> bool:
    status, body = await asyncio.to_thread(worker.readyz)
    return status == 200 and "input blind" not in body


def firings(posts: list[Posted]) -> Counter[tuple[str, str]]:
    return Counter((rule, series) for state, rule, series in kinds(posts) if state == "FIRING")


@pytest.mark.slow
async def test_one_silence_is_one_firing_per_absence_rule(
        kafka: TansuBroker, fake_slack: FakeSlack, make_worker: Callable[..., WorkerProcess]) -> None:
    """Samples/events stop (one firing per rule), resume (one resolve each), stop again (one
    firing each: a second episode). The feature rule flapped FIRING/RESOLVED every clock tick
    for as long as its window still held the last event (found by an outside test)."""
    metrics, inference, group = unique("metrics"), unique("inference"), unique("absence")
    worker = make_worker(absence_config(metrics, inference), group, fake_slack).start()
    await wait_until(lambda: _seeing(worker), timeout=60, message="worker assigned, not blind")
    await alive(kafka.bootstrap, metrics, inference, 5)
    # both series silent: each rule fires once, and stays firing while the feature's 20 s
    # window still holds the last event (the clock re-reads it every second)
    await wait_until(lambda: len(firings(fake_slack.posts())) == 2, timeout=30,
                     message="both absences firing")
    await asyncio.sleep(6)
    posts = fake_slack.posts()
    assert firings(posts) == {("HostSilent", "web-1"): 1, ("ModelSilent", "ranker"): 1}, kinds(posts)
    assert len(kinds(posts)) == 2, kinds(posts)
    await alive(kafka.bootstrap, metrics, inference, 2)  # back: each resolves once
    # silent again: a second episode, one firing each
    await wait_until(lambda: sum(firings(fake_slack.posts()).values()) >= 4, timeout=30,
                     message="the second firings")
    await asyncio.sleep(6)
    got = kinds(fake_slack.posts())
    for rule, series in (("HostSilent", "web-1"), ("ModelSilent", "ranker")):
        assert [s for s, r, e in got if (r, e) == (rule, series)] == [
            "FIRING", "RESOLVED", "FIRING"], got
    worker.stop()


def model_silent() -> Any:
    """The alert evaluator alone, with one absence rule over a 20 s feature (`after` 4 s)."""
    from eventpulse.alerts.evaluate import AlertEvaluator
    from eventpulse.alerts.rules import AlertingConfig

    config = AlertingConfig.model_validate({"rules": [
        {"name": "ModelSilent", "kind": "absence", "feature": "calls_20s", "after": "4s"}]})
    return AlertEvaluator.build(config, {"calls_20s": 20_000})


def reading(newest: int, now: int) -> Any:
    """What a read of the feature at ``now`` gives, its newest event at ``newest``."""
    from types import SimpleNamespace

    return {"ranker": {"calls_20s": SimpleNamespace(
        value=5, event_count=5, window_end_ms=now, newest_event_ms=newest)}}


def test_a_feature_absence_fires_once_while_its_window_still_holds_the_last_event() -> None:
    """The engine alone: the clock re-reads the feature every tick, and its newest event (the
    same one, the same stamp) is no sign of life; each re-read resolved the absence and the
    next tick fired it again."""
    evaluator = model_silent()

    t0, out = 1_000_000, []
    for now in range(t0, t0 + 15_000, 1000):  # last event at t0, still in the window
        out += evaluator.on_features("model", reading(t0, now), now)
        out += evaluator.tick(now)
    assert [t.kind.value for t in out] == ["firing"]
    out = evaluator.on_features("model", reading(t0 + 15_500, t0 + 16_000), t0 + 16_000)
    assert [t.kind.value for t in out] == ["resolved"]  # a newer event does resolve it


def test_a_feature_absence_of_a_producer_whose_clock_is_behind_fires_once_when_it_stops() -> None:
    """Events stamped 10 s behind (more than `after`) keep coming: no alert, since a newer
    newest event is an arrival at the read, whatever its stamp (an outside test saw it flap
    FIRING/RESOLVED while they came); once they stop, one firing, and no resolve while the
    window still holds the last event."""
    evaluator = model_silent()

    t0, out = 1_000_000, []
    for now in range(t0, t0 + 25_000, 500):  # an event every half second, stamped 10 s behind
        out += evaluator.on_features("model", reading(now - 10_000, now), now)
        out += evaluator.tick(now)
    assert out == []
    stopped = t0 + 25_000
    for now in range(stopped, stopped + 15_000, 500):  # stopped: the last one still read
        out += evaluator.on_features("model", reading(stopped - 10_500, now), now)
        out += evaluator.tick(now)
    assert [t.kind.value for t in out] == ["firing"]
    assert out[0].at_ms >= stopped - 500 + 4_000  # absent from its last arrival + after


def test_a_feature_absence_counts_arrivals_of_older_stamped_events() -> None:
    """A producer whose clock stepped back sends events older than the newest one read: the
    newest does not change, but the batch that wrote them is an arrival (an outside test saw
    FIRING/RESOLVED while they kept coming; a metric absence already counted them)."""
    evaluator = model_silent()
    t0 = 1_000_000  # the newest event throughout: the one before the step back
    out = evaluator.on_features("model", reading(t0, t0), t0, {"calls_20s": {"ranker"}})
    for now in range(t0 + 500, t0 + 16_000, 500):  # an event every half second, 10 s behind
        out += evaluator.on_features("model", reading(t0, now), now, {"calls_20s": {"ranker"}})
        out += evaluator.on_features("model", reading(t0, now), now)  # the clock's re-read
        out += evaluator.tick(now)
    assert out == []
    stopped = t0 + 15_500
    for now in range(stopped + 500, stopped + 10_000, 500):  # stopped: re-reads only
        out += evaluator.on_features("model", reading(t0, now), now)
        out += evaluator.tick(now)
    assert [t.kind.value for t in out] == ["firing"]
