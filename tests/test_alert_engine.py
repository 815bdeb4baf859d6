"""The alert lifecycle as on-call people expect it from Alertmanager (pure logic, no servers)."""

from __future__ import annotations

import json
from typing import Any

from eventpulse.alerts.blind import InputView
from eventpulse.alerts.evaluate import PIPELINE_RULE, AlertEvaluator
from eventpulse.alerts.message import blocks, escape, plain_text
from eventpulse.alerts.rules import AlertingConfig
from eventpulse.alerts.state import AlertState, Kind, Silence

S = 1000


def evaluator(**rule: Any) -> AlertEvaluator:
    base = {"name": "Disk", "kind": "threshold", "metric": "disk", "threshold": 90, "clear": 85,
            "for": "30s", "repeat_interval": "10m"}
    return AlertEvaluator.build(AlertingConfig.model_validate({"rules": [{**base, **rule}]}))


def kinds(transitions: list[Any]) -> list[str]:
    return [t.kind.value for t in transitions]


def test_pending_that_clears_never_notifies() -> None:
    ev = evaluator()
    labels = {"host": "a"}
    assert ev.on_metric("disk", 95, labels, 0, "m:0") == []
    assert ev.engine.states[next(iter(ev.engine.states))].phase.value == "pending"
    assert ev.on_metric("disk", 50, labels, 10 * S, "m:0") == []
    assert ev.tick(60 * S) == []


def test_for_then_fire_once_then_resolve_below_clear_only() -> None:
    ev = evaluator()
    labels = {"host": "a"}
    out = ev.on_metric("disk", 95, labels, 0, "m:0")
    out += ev.on_metric("disk", 96, labels, 20 * S, "m:0")
    assert out == []
    out = ev.on_metric("disk", 97, labels, 31 * S, "m:0")
    assert kinds(out) == ["firing"]
    # between clear and threshold: still firing (hysteresis), no message
    assert ev.on_metric("disk", 88, labels, 40 * S, "m:0") == []
    assert ev.on_metric("disk", 99, labels, 50 * S, "m:0") == []
    resolved = ev.on_metric("disk", 84, labels, 60 * S, "m:0")
    assert kinds(resolved) == ["resolved"]
    assert resolved[0].active_since == 0 and resolved[0].seq == 2


def test_for_elapses_on_the_clock_when_the_stream_is_quiet() -> None:
    ev = evaluator()
    ev.on_metric("disk", 95, {"host": "a"}, 0, "m:0")
    assert ev.tick(29 * S) == []
    assert kinds(ev.tick(30 * S)) == ["firing"]


def test_reminders_follow_repeat_interval() -> None:
    ev = evaluator(**{"for": "0s"})
    assert kinds(ev.on_metric("disk", 95, {"host": "a"}, 0, "m:0")) == ["firing"]
    assert ev.tick(9 * 60 * S) == []
    assert kinds(ev.tick(10 * 60 * S)) == ["reminder"]
    assert ev.tick(11 * 60 * S) == []


def test_reminders_count_from_the_notification_not_the_samples_stamp() -> None:
    """Alertmanager repeats a notification repeat_interval after it last sent one. A sample
    stamped 12 s before the worker read it notifies when read, so its reminder is due a minute
    after that, not 48 s after (found by outside testing: reminders came early by the
    samples' delay)."""
    ev = evaluator(**{"for": "0s", "repeat_interval": "1m"})
    read = 100 * S
    fired = ev.on_metric("disk", 95, {"host": "a"}, read - 12 * S, "m:0", read)
    assert kinds(fired) == ["firing"]
    assert fired[0].active_since == read - 12 * S  # the condition began at the stamp
    assert ev.tick(read + 48 * S) == []
    assert ev.tick(read + 59 * S) == []
    assert kinds(ev.tick(read + 60 * S)) == ["reminder"]
    # a sample read later still keeps reminders a minute apart
    assert ev.on_metric("disk", 96, {"host": "a"}, read + 100 * S, "m:0", read + 110 * S) == []
    assert kinds(ev.on_metric("disk", 96, {"host": "a"}, read + 115 * S, "m:0",
                              read + 120 * S)) == ["reminder"]


def test_series_are_separate_alerts() -> None:
    ev = evaluator(**{"for": "0s"})
    a = ev.on_metric("disk", 95, {"host": "a"}, 0, "m:0")
    b = ev.on_metric("disk", 95, {"host": "b"}, 0, "m:0")
    assert kinds(a) == kinds(b) == ["firing"]
    assert a[0].fingerprint != b[0].fingerprint
    assert ev.on_metric("disk", 95, {"host": "c"}, 0, "m:0")[0].labels["host"] == "c"


def test_silenced_alert_is_evaluated_not_sent_and_announced_when_silence_ends() -> None:
    ev = evaluator(**{"for": "0s"})
    ev.engine.silences = [Silence("s1", {"host": "a"}, 0, 100 * S, "maintenance")]
    held = ev.on_metric("disk", 95, {"host": "a"}, 10 * S, "m:0")
    assert kinds(held) == ["firing"] and held[0].silenced_until == 100 * S
    assert ev.tick(50 * S) == []
    after = ev.tick(100 * S)
    assert kinds(after) == ["firing"] and after[0].silenced_until is None
    assert after[0].silence_ended_ms == 100 * S
    assert "the silence ended" in plain_text(ev.rule("Disk"), after)
    # a firing that was never announced resolves silently
    ev.engine.silences = [Silence("s2", {"host": "b"}, 0, 10**12, "")]
    ev.on_metric("disk", 95, {"host": "b"}, 0, "m:0")
    assert ev.on_metric("disk", 10, {"host": "b"}, S, "m:0") == []


def test_absence_fires_when_samples_stop_and_resolves_when_they_return() -> None:
    config = AlertingConfig.model_validate({"rules": [
        {"name": "Silent", "kind": "absence", "metric": "cpu", "after": "2m"}]})
    ev = AlertEvaluator.build(config)
    assert ev.on_metric("cpu", 5, {"host": "a"}, 0, "m:0") == []
    assert ev.tick(119 * S) == []
    assert kinds(ev.tick(120 * S)) == ["firing"]
    assert kinds(ev.on_metric("cpu", 5, {"host": "a"}, 130 * S, "m:0")) == ["resolved"]


def test_a_host_whose_clock_is_behind_is_absent_only_when_its_samples_stop_arriving() -> None:
    """A host stamps its samples by a clock 3 minutes behind; they arrive every second. Judged
    by the stamps alone it looked silent at every tick (and fired, then resolved by its next
    sample, then fired again: a page every few seconds). It is absent once no sample has been
    read for `after`, and then it fires once."""
    config = AlertingConfig.model_validate({"rules": [
        {"name": "Silent", "kind": "absence", "metric": "cpu", "after": "2m"}]})
    ev = AlertEvaluator.build(config)
    behind = 180 * S
    start = 1_000_000 * S
    sent: list[Any] = []
    for t in range(start, start + 60 * S, S):  # alive: a sample read every second, then a tick
        sent += ev.on_metric("cpu", 5, {"host": "a"}, t - behind, "m:0", now_ms=t)
        sent += ev.tick(t + S // 2)
    assert sent == []
    last_read = start + 59 * S
    for t in range(last_read + S, last_read + 119 * S, S):  # stopped: not yet `after`
        sent += ev.tick(t)
    assert sent == []
    assert kinds(ev.tick(last_read + 120 * S)) == ["firing"]
    assert ev.tick(last_read + 121 * S) == []
    back = last_read + 130 * S
    resolved = ev.on_metric("cpu", 5, {"host": "a"}, back - behind, "m:0", now_ms=back)
    assert kinds(resolved) == ["resolved"]
    assert resolved[0].at_ms == back  # when it was read, not its stamp (before the firing)
    # the read time survives a restart (alert states are kept in Redis as JSON)
    state = next(iter(ev.engine.states.values()))
    assert AlertState.from_json(state.to_json()) == state


def test_for_on_an_absence_counts_from_when_the_samples_stopped_arriving() -> None:
    """With `for`, the skewed host is pending from `after` past its last sample *read*, and
    fires `for` later, as a host with a true clock does; its stamps alone made `for` look
    elapsed at once."""
    config = AlertingConfig.model_validate({"rules": [
        {"name": "Silent", "kind": "absence", "metric": "cpu", "after": "20s", "for": "30s"}]})
    fired: dict[str, int] = {}
    for host, behind in (("true", 0), ("behind", 60 * S)):
        ev = AlertEvaluator.build(config)
        start = 1_000_000 * S
        for t in range(start, start + 10 * S, S):
            ev.on_metric("cpu", 5, {"host": host}, t - behind, "m:0", now_ms=t)
        for t in range(start + 10 * S, start + 120 * S, S):
            firing = [x for x in ev.tick(t) if x.kind.value == "firing"]
            if firing:
                fired[host] = t - (start + 9 * S)  # since the last sample was read
                assert firing[0].active_since == start + 9 * S + 20 * S
                break
    assert fired == {"true": 50 * S, "behind": 50 * S}


class Reading:
    def __init__(self, value: float | None, count: int | None = None) -> None:
        self.value, self.event_count, self.window_end_ms, self.newest_event_ms = value, count, 0, 0


def test_ratio_needs_min_count_and_lag_holds_data_rules() -> None:
    config = AlertingConfig.model_validate({"rules": [
        {"name": "Err", "kind": "ratio", "feature": "err", "threshold": 0.05, "min_count": 20,
         "for": "0s"}]})
    ev = AlertEvaluator.build(config)
    assert ev.on_features("model", {"m1": {"err": Reading(1.0, 1)}}, 0) == []
    assert kinds(ev.on_features("model", {"m1": {"err": Reading(0.5, 40)}}, S)) == ["firing"]
    # blind (rebalancing) since 0 s: held at once, the blind alert after the 3 s fresh bound
    assert ev.see(InputView(None, 0, "rebalancing"), 3 * S) == []
    lag = ev.see(InputView(None, 0, "rebalancing"), 4 * S)
    assert kinds(lag) == ["firing"] and lag[0].rule == PIPELINE_RULE
    assert "cannot see all of its input (rebalancing)" in plain_text(ev.rule(PIPELINE_RULE), lag)
    assert ev.on_features("model", {"m1": {"err": Reading(0.0, 40)}}, 4 * S) == []
    back = ev.see(InputView(5 * S), 5 * S)
    assert kinds(back) == ["resolved"] and back[0].note == (
        "eventpulse sees its input again after 5s; held alerts resume")
    assert ev.on_features("model", {"m1": {"err": Reading(0.0, 40)}}, 5 * S) == []  # settling
    assert ev.see(InputView(6 * S), 6 * S) == []  # no window here: the settle is FRESH_MS
    assert ev.see(InputView(7 * S), 7 * S) == []
    assert ev.see(InputView(8 * S), 8 * S) == []
    assert kinds(ev.on_features("model", {"m1": {"err": Reading(0.0, 40)}}, 8 * S)) == [
        "resolved"]


def test_state_round_trips_through_json() -> None:
    ev = evaluator(**{"for": "0s"})
    ev.on_metric("disk", 95, {"host": "a"}, 0, "m:0")
    state = next(iter(ev.engine.states.values()))
    assert AlertState.from_json(state.to_json()) == state
    # a state an older version wrote (without the newer fields), and one a newer version
    # wrote (with a field this one does not know): both read, for rolling upgrades
    older = json.loads(state.to_json())
    del older["last_read"], older["across_skip"]
    assert AlertState.from_json(json.dumps(older)) == state
    assert AlertState.from_json(json.dumps({**older, "added_later": 1})) == state


def test_text_from_events_cannot_ping_or_inject_links() -> None:
    ev = evaluator(**{"for": "0s"}, annotations={"summary": "disk on {labels[host]}"})
    (t,) = ev.on_metric("disk", 95, {"host": "<!channel> <https://evil|x> & co"}, 0, "m:0")
    rule = ev.rule("Disk")
    text = plain_text(rule, [t])
    rendered = str(blocks(rule, [t]))
    for out in (text, rendered):
        assert "<!channel>" not in out and "<https://evil" not in out
    assert "&lt;!channel&gt;" in text and "&amp; co" in text
    assert escape("a<b>&c") == "a&lt;b&gt;&amp;c"
    assert t.kind == Kind.FIRING


def test_spike_compares_rates_against_the_baseline() -> None:
    config = AlertingConfig.model_validate({"rules": [
        {"name": "Spike", "kind": "spike", "feature": "errors_1m", "baseline": "errors_1h",
         "factor": 3, "for": "0s"}]})
    ev = AlertEvaluator.build(config, {"errors_1m": 60_000, "errors_1h": 3_600_000},
                              extensive=["errors_1m", "errors_1h"])
    # 10 per minute against 60 per hour (1 per minute): 10x the baseline rate
    spike = ev.on_features("model", {"m": {"errors_1m": Reading(10), "errors_1h": Reading(60)}}, 0)
    assert kinds(spike) == ["firing"]
    calm = ev.on_features("model", {"m": {"errors_1m": Reading(2), "errors_1h": Reading(60)}}, S)
    assert kinds(calm) == ["resolved"]


def test_a_silence_eventpulse_could_not_see_is_announced_once_when_it_is_seen_over() -> None:
    """A host silent from 12 s to 30 s while eventpulse was blind (worker down, a backlog): the
    clock never judged it, so the sample that ends it announces it, fired and resolved, once.
    Found by an outside test of issue 16."""
    config = AlertingConfig.model_validate({"rules": [
        {"name": "Silent", "kind": "absence", "metric": "cpu", "after": "10s"},
        {"name": "SilentFor", "kind": "absence", "metric": "cpu", "after": "10s", "for": "5s"}]})
    ev = AlertEvaluator.build(config)
    assert ev.on_metric("cpu", 5, {"host": "a"}, 2 * S, "m:0") == []
    got = ev.on_metric("cpu", 5, {"host": "a"}, 30 * S, "m:0")
    assert sorted((t.rule, t.kind.value, t.active_since) for t in got) == [
        ("Silent", "firing", 12 * S), ("Silent", "resolved", 12 * S),
        ("SilentFor", "firing", 12 * S), ("SilentFor", "resolved", 12 * S)]
    # a gap shorter than after (+ for) is no silence; nor is one across partitions, whose
    # samples a catch-up reads out of order
    assert ev.on_metric("cpu", 5, {"host": "a"}, 39 * S, "m:0") == []
    assert kinds(ev.on_metric("cpu", 5, {"host": "a"}, 53 * S, "m:0")) == ["firing", "resolved"]
    assert ev.on_metric("cpu", 5, {"host": "a"}, 90 * S, "m:1") == []
    # one the clock already announced is resolved once, not announced again (SilentFor was
    # pending at the tick; its `for` had elapsed in data time by 15 s)
    assert ev.on_metric("cpu", 5, {"host": "b"}, 0, "m:0") == []
    assert [t.rule for t in ev.tick(10 * S)] == ["Silent"]
    assert [(t.rule, t.kind.value) for t in ev.on_metric("cpu", 5, {"host": "b"}, 20 * S, "m:0")] \
        == [("Silent", "resolved"), ("SilentFor", "firing"), ("SilentFor", "resolved")]
