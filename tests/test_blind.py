"""What the worker has seen of its input, and which rules that holds (pure logic, no servers).

The real-server stories (broker stopped, worker down, backlog) are in test_blind_worker.py."""

from __future__ import annotations

import pytest

from eventpulse.agents.sight import Cause, InputSight, PartitionFetch
from eventpulse.alerts.blind import InputView
from eventpulse.alerts.evaluate import PIPELINE_RULE, AlertEvaluator
from eventpulse.alerts.rules import AlertingConfig
from eventpulse.alerts.state import AlertState

S = 1000
T0 = 1_700_000_000_000


def answered(sight: InputSight, parts: dict[str, PartitionFetch]) -> dict[str, PartitionFetch]:
    """``parts`` as fetches that follow ones processed half a second earlier: the requests of
    ``parts`` were sent after those, which is what their view times are."""
    sight.observe({tp: PartitionFetch(f.highwater, (f.fetched_ms or 0) - 500, f.next_offset)
                   for tp, f in parts.items()})
    return parts


def test_a_caught_up_partition_whose_fetches_stopped_answering_is_seen_only_until_then() -> None:
    sight = InputSight(T0)
    fetch = answered(sight, {"m:0": PartitionFetch(highwater=10, fetched_ms=T0, next_offset=10)})
    view = sight.view(T0 + 1 * S, fetch, rebalancing=False)
    assert view.seen_until_ms == T0 - 500 and view.reason is None and view.blind_ms(T0 + S) == 0
    # aiokafka keeps the last high watermark while the broker is silent: caught up, yet blind
    view = sight.view(T0 + 9 * S, fetch, rebalancing=False)
    assert view.seen_until_ms == T0 - 500 and view.blind_ms(T0 + 9 * S) == 9 * S + 500
    assert view.reason == "no fetch of m:0 answered for 10s"
    assert sight.causes == {Cause.FETCH_STALLED}
    status = sight.status(T0 + 9 * S)
    assert status.blind and status.reason == view.reason


def test_behind_is_seen_until_the_last_fetch_whose_high_watermark_is_applied() -> None:
    sight = InputSight(T0)
    sight.view(T0, answered(sight, {"m:0": PartitionFetch(10, T0, 10)}), rebalancing=False)
    # 500 new records fetched at +20 s, none applied yet: seen up to the last catch-up
    view = sight.view(T0 + 20 * S, answered(sight, {"m:0": PartitionFetch(510, T0 + 20 * S, 10)}),
                      rebalancing=False)
    assert view.seen_until_ms == T0 - 500
    assert view.reason == "m:0 500 records behind, seen up to 20s ago"
    # +25 s: the fetch of +20 s is applied, more arrived since: seen up to +20 s (its request
    # was sent after +19.5 s)
    view = sight.view(T0 + 25 * S, answered(sight, {"m:0": PartitionFetch(900, T0 + 25 * S, 510)}),
                      rebalancing=False)
    assert view.seen_until_ms == T0 + 20 * S - 500 and sight.causes == {Cause.BEHIND}
    # half of the +25 s fetch applied: still +20 s, whatever the applied events' times say
    view = sight.view(T0 + 26 * S, answered(sight, {"m:0": PartitionFetch(900, T0 + 26 * S, 700)}),
                      rebalancing=False)
    assert view.seen_until_ms == T0 + 20 * S - 500
    # the oldest partition sets the view; a fresh one adds no reason
    two = answered(sight, {"m:0": PartitionFetch(1500, T0 + 27 * S, 700),
                           "m:1": PartitionFetch(3, T0 + 27 * S, 3)})
    view = sight.view(T0 + 27 * S, two, rebalancing=False)
    assert view.seen_until_ms == T0 + 20 * S - 500
    assert view.reason == "m:0 800 records behind, seen up to 8s ago"
    view = sight.view(T0 + 28 * S,
                      answered(sight, {**two, "m:0": PartitionFetch(1500, T0 + 28 * S, 1500)}),
                      rebalancing=False)
    assert view.seen_until_ms == T0 + 27 * S - 500 and view.reason is None


def test_unknown_views_hold_everything_and_count_blindness_from_the_last_known_view() -> None:
    sight = InputSight(T0)
    view = sight.view(T0 + S, {}, rebalancing=True)
    assert view.seen_until_ms is None and view.blind_since_ms == T0
    assert view.reason == "rebalancing: partitions not assigned"
    view = sight.view(T0 + 2 * S, {"m:0": PartitionFetch(None, None, 0)},
                      rebalancing=False)
    assert view.seen_until_ms is None and view.reason == "m:0 not fetched yet"
    # restarted on a backlog: nothing fed from it since assignment
    # the first fetch answered: when its request was sent is not known
    view = sight.view(T0 + 3 * S, {"m:0": PartitionFetch(900, T0 + 3 * S, 100)},
                      rebalancing=False)
    assert view.seen_until_ms is None and view.reason == "m:0 not fetched yet"
    # restarted on a backlog: nothing fed from it since assignment
    view = sight.view(T0 + 3 * S, {"m:0": PartitionFetch(900, T0 + 3 * S + 500, 100)},
                      rebalancing=False)
    assert view.seen_until_ms is None and "not caught up since assigned" in (view.reason or "")
    view = sight.view(T0 + 4 * S, {"m:0": PartitionFetch(900, T0 + 4 * S, 900)},
                      rebalancing=False)
    assert view.seen_until_ms == T0 + 3 * S + 500 and view.reason is None
    view = sight.view(T0 + 9 * S, {}, rebalancing=True)
    assert view.blind_since_ms == T0 + 3 * S + 500 and view.blind_ms(T0 + 9 * S) == 5500


def test_a_lost_coordinator_caps_the_view_at_the_time_it_was_lost() -> None:
    sight = InputSight(T0)
    fresh = answered(sight, {"m:0": PartitionFetch(5, T0 + 10 * S, 5)})
    sight.view(T0 + 5 * S, fresh, rebalancing=False, coordinator_known=False)
    view = sight.view(T0 + 10 * S, fresh, rebalancing=False, coordinator_known=False)
    assert view.seen_until_ms == T0 + 5 * S
    assert view.reason == "group coordinator lost 5s ago" and sight.causes == {
        Cause.COORDINATOR_LOST}
    view = sight.view(T0 + 11 * S, {"m:0": PartitionFetch(5, T0 + 11 * S, 5)},
                      rebalancing=False)
    assert view.seen_until_ms == T0 + 10 * S and view.reason is None


def config() -> AlertingConfig:
    return AlertingConfig.model_validate({"rules": [
        {"name": "HostSilent", "kind": "absence", "metric": "cpu", "after": "5s",
         "group_by": ["host"]},
        {"name": "Errors", "kind": "ratio", "feature": "err_1m", "threshold": 0.1},
        {"name": "Disk", "kind": "threshold", "metric": "disk", "threshold": 90},
    ]})


def test_each_rule_is_held_against_its_own_horizon_and_the_alert_fires_past_the_shortest() -> None:
    ev = AlertEvaluator.build(config(), {"err_1m": 60 * S})
    assert ev.rule(PIPELINE_RULE).threshold == 5.0  # type: ignore[union-attr]
    assert ev.see(InputView(T0), T0 + 4 * S) == [] and ev.holds is not None
    assert ev.holds.held == set()
    assert ev.see(InputView(T0), T0 + 5 * S) == [] and ev.holds.held == set()
    fired = ev.see(InputView(T0, reason="no fetch of m:0 answered for 6s"), T0 + 6 * S)
    assert [t.kind.value for t in fired] == ["firing"] and fired[0].value == 6.0
    assert fired[0].note == ("eventpulse cannot see all of its input (no fetch of m:0 answered "
                             "for 6s); data-driven alerts are held")
    assert ev.holds.held == {"HostSilent"}  # the 1-minute window still has most of its data
    assert ev.see(InputView(T0, reason="still"), T0 + 61 * S) == []  # once
    assert ev.holds.held == {"HostSilent", "Errors"}  # a threshold without `for` is never held


def test_absences_are_judged_up_to_what_was_seen_and_real_silences_announced_once() -> None:
    ev = AlertEvaluator.build(config(), {"err_1m": 60 * S})
    for host in ("alive", "dead"):
        ev.on_metric("cpu", 1, {"host": host}, T0, "m:0")
    # the broker stops answering at T0 + 1 s; "alive" keeps sending, "dead" has stopped
    ev.see(InputView(T0 + S), T0 + 2 * S)
    assert ev.tick(T0 + 2 * S) == []
    for now in range(T0 + 3 * S, T0 + 30 * S, S):
        ev.see(InputView(T0 + S, reason="stalled"), now)
        assert [t.rule for t in ev.tick(now)] == [], now
    # sight returns: the buffered samples of "alive" arrive within the settle period
    back = T0 + 30 * S
    resolved = ev.see(InputView(back), back)
    assert [(t.rule, t.kind.value) for t in resolved] == [(PIPELINE_RULE, "resolved")]
    assert ev.tick(back) == []
    ev.on_metric("cpu", 1, {"host": "alive"}, back + 2 * S, "m:0")
    paged = []
    for now in range(back + S, back + 20 * S, S):
        ev.see(InputView(now - 200), now)
        if now % (2 * S) == 0:
            ev.on_metric("cpu", 1, {"host": "alive"}, now - 300, "m:0")
        paged += ev.tick(now)
    assert [(t.rule, t.labels["host"], t.kind.value) for t in paged] == [
        ("HostSilent", "dead", "firing")]
    assert paged[0].at_ms == back + 5 * S  # after the settle period (the rule's `after`)



def test_a_threshold_with_for_is_held_and_a_held_rule_settles_at_most_30s() -> None:
    config = AlertingConfig.model_validate({"rules": [
        {"name": "Disk", "kind": "threshold", "metric": "disk", "threshold": 90, "for": "10s"},
        {"name": "Gone", "kind": "absence", "metric": "cpu", "after": "10m"}]})
    ev = AlertEvaluator.build(config)
    assert ev.rule(PIPELINE_RULE).threshold == 10.0  # type: ignore[union-attr]
    assert ev.on_metric("disk", 95, {"host": "a"}, T0, "m:0") == []  # pending
    ev.see(InputView(T0), T0 + 11 * S)  # blind for 11 s: is it still above 90? unknown
    assert ev.holds is not None and ev.holds.held == {"Disk"}
    assert ev.tick(T0 + 11 * S) == []
    ev.see(InputView(None, T0, "rebalancing"), T0 + 20 * 60 * S)
    assert ev.holds.held == {"Disk", "Gone"}
    back = T0 + 21 * 60 * S
    for now in range(back, back + 30 * S, S):
        ev.see(InputView(now), now)
        assert "Gone" in ev.holds.held and ("Disk" in ev.holds.held) == (now < back + 10 * S)
    ev.see(InputView(back + 30 * S), back + 30 * S)
    assert ev.holds.held == set()
    assert [t.rule for t in ev.tick(back + 30 * S)] == ["Disk"]  # resumes: its `for` has elapsed


def test_every_cause_of_blindness_has_its_metric_series() -> None:
    from eventpulse.metrics import BLIND_CAUSES
    assert set(BLIND_CAUSES) == {cause.value for cause in Cause}


def test_a_position_past_the_log_end_is_unknown_and_said_once(
        caplog: pytest.LogCaptureFixture) -> None:
    sight = InputSight(T0)
    for now in (T0 + S, T0 + 2 * S):
        view = sight.view(now, answered(sight, {"m:0": PartitionFetch(289, now, 1596)}),
                          rebalancing=False)
        assert view.seen_until_ms is None and sight.causes == {Cause.OFFSETS_AHEAD}
        assert view.skipping == {"m:0"}  # no gap across it is judged (alerts.state.skipping)
    assert view.reason == "m:0 offsets ahead: applied up to 1595, past the log end 289"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "m:0" in errors[0] and "1595" in errors[0], errors
    # producers wrote past the old position: read on from it, with a warning
    view = sight.view(T0 + 3 * S, {"m:0": PartitionFetch(1700, T0 + 3 * S, 1596)},
                      rebalancing=False)
    assert view.seen_until_ms is None and sight.causes == {Cause.BEHIND}
    assert any("never applied" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")


def test_a_view_not_measured_lately_keeps_counting_and_says_why() -> None:
    sight = InputSight(T0)
    sight.view(T0, answered(sight, {"m:0": PartitionFetch(5, T0, 5)}), rebalancing=False)
    assert not sight.status(T0 + S).blind and sight.status(T0 + S).causes == set()
    status = sight.status(T0 + 5 * S)  # the clock's tick waits on a frozen Redis
    assert status.blind and status.blind_seconds == 5.5 and status.causes == {Cause.NOT_MEASURED}
    assert status.reason == ("input not measured for 5s (the alert clock waits on Redis or on "
                             "a batch)")


def absence_evaluator() -> AlertEvaluator:
    return AlertEvaluator.build(AlertingConfig.model_validate({"rules": [
        {"name": "HostSilent", "kind": "absence", "metric": "cpu", "after": "10s"}]}))


def test_a_gap_the_clock_judged_live_is_no_silence_but_one_it_could_not_judge_is() -> None:
    """Second outside test of issue 16, F1: one sample stamped 2 min ahead, or a producer's
    clock stepping 15 s ahead for good, leaves a gap between two samples while eventpulse was
    watching live: no silence. A silence that began and ended while the rule was held is
    announced once, since its last sample + ``after``."""
    ev = absence_evaluator()
    paged: list[tuple[str, str, int | None]] = []
    skew = {"h1": 0, "h2": 0, "h3": 0}
    for now in range(T0, T0 + 60 * S, S):
        skew["h1"] = 120 * S if now == T0 + 20 * S else 0
        skew["h2"] = 15 * S if now >= T0 + 30 * S else 0
        ev.see(InputView(now - 500), now)
        for host, ahead in skew.items():
            paged += [(t.labels["host"], t.kind.value, t.active_since)
                      for t in ev.on_metric("cpu", 1, {"host": host}, now + ahead, "m:0", now)]
        paged += [(t.labels["host"], t.kind.value, t.active_since) for t in ev.tick(now)]
    assert paged == []
    # blind from +60 s to +100 s (the rule held from +70 s); h3 silent from +62 s to +85 s
    buffered = [T0 + s * S for s in (*range(60, 63), *range(85, 100))]
    for now in range(T0 + 60 * S, T0 + 100 * S, S):
        ev.see(InputView(T0 + 60 * S, reason="stalled"), now)
        assert ev.tick(now) == []
    now = T0 + 100 * S
    ev.see(InputView(now - 500), now)
    assert ev.holds is not None
    assert not ev.holds.unjudged("HostSilent", T0 + 10 * S, T0 + 59 * S)  # judged live
    assert ev.holds.unjudged("HostSilent", T0 + 10 * S, T0 + 61 * S)  # held from +60.5 s
    assert ev.holds.unjudged("HostSilent", T0 + 99 * S, T0 + 100 * S)  # held, settling
    for at in buffered:
        paged += [(t.labels["host"], t.kind.value, t.active_since)
                  for t in ev.on_metric("cpu", 1, {"host": "h3"}, at, "m:0", now)]
    assert paged == [("h3", "firing", T0 + 72 * S), ("h3", "resolved", T0 + 72 * S)]


def test_no_gap_across_skipped_offsets_is_announced() -> None:
    """F2: the broker lost its log, the position is past the new log end; when the log end
    passes it, the records below were never read: the gap they leave is not a silence."""
    ev = absence_evaluator()
    for now in range(T0, T0 + 5 * S, S):
        ev.see(InputView(now - 500), now)
        for host in ("h1", "h2"):
            ev.on_metric("cpu", 1, {"host": host}, now, "m:0", now)
        ev.on_metric("cpu", 1, {"host": "h3"}, now, "m:1", now)
    for now in range(T0 + 5 * S, T0 + 40 * S, S):
        ev.see(InputView(None, T0 + 5 * S, "m:0 offsets ahead", frozenset({"m:0"})), now)
        assert ev.tick(now) == []
    back = T0 + 40 * S
    ev.see(InputView(back - 500), back)
    got = [(t.labels["host"], t.kind.value)
           for host, part in (("h1", "m:0"), ("h2", "m:0"), ("h3", "m:1"))
           for t in ev.on_metric("cpu", 1, {"host": host}, back - S, part, back)]
    assert got == [("h3", "firing"), ("h3", "resolved")]  # m:1 was read all along: announced
    # the next gap of h1 is judged again
    assert ev.on_metric("cpu", 1, {"host": "h1"}, back, "m:0", back) == []
    assert not any(state.across_skip for state in ev.engine.states.values())


def test_the_skipped_offsets_mark_survives_a_restart() -> None:
    """The worker restarts between the skip and the series' next sample: alert states come
    back from Redis (JSON), and the gap across the skip is still not announced."""
    ev = absence_evaluator()
    for now in range(T0, T0 + 5 * S, S):
        ev.see(InputView(now - 500), now)
        ev.on_metric("cpu", 1, {"host": "h1"}, now, "m:0", now)
    for now in range(T0 + 5 * S, T0 + 40 * S, S):
        ev.see(InputView(None, T0 + 5 * S, "m:0 offsets ahead", frozenset({"m:0"})), now)
        ev.tick(now)
    saved = {fp: AlertState.from_json(state.to_json()) for fp, state in ev.engine.states.items()}
    restarted = absence_evaluator()
    restarted.engine.states = saved
    back = T0 + 40 * S
    restarted.see(InputView(back - 500), back)
    assert restarted.on_metric("cpu", 1, {"host": "h1"}, back - S, "m:0", back) == []


def test_an_absence_found_by_the_clock_is_active_since_its_last_sample_plus_after() -> None:
    """'since' in a FIRING message: its last sample + ``after``, however late the clock
    could tell (a silence still going on when sight returns), as for one already over."""
    ev = absence_evaluator()
    ev.see(InputView(T0), T0)
    ev.on_metric("cpu", 1, {"host": "h1"}, T0, "m:0", T0)
    for now in range(T0 + S, T0 + 40 * S, S):
        ev.see(InputView(T0 + S, reason="stalled"), now)
        assert ev.tick(now) == []
    fired = []
    for now in range(T0 + 40 * S, T0 + 55 * S, S):
        ev.see(InputView(now - 500), now)
        fired += [t for t in ev.tick(now) if t.rule == "HostSilent"]
    assert [(t.kind.value, t.active_since) for t in fired] == [("firing", T0 + 10 * S)]


def test_a_fetch_processed_after_the_worker_was_paused_is_seen_as_of_before_the_pause() -> None:
    """Second outside test of issue 16, F3: a worker SIGSTOPped for 12 s; a fetch sent before
    the pause, answered during it (the high watermark of then), is processed on resume and
    stamped then. It says nothing about what was produced during the pause: the view is the
    stamp of the fetch before it, so the worker is blind until a fetch sent after the resume
    is answered and applied."""
    sight = InputSight(T0)
    for k in range(4):  # caught up, a fetch every half second
        sight.observe({"m:0": PartitionFetch(10, T0 + k * 500, 10)})
    resumed = T0 + 13_600
    view = sight.view(resumed, {"m:0": PartitionFetch(10, resumed, 10)}, rebalancing=False)
    assert view.seen_until_ms == T0 + 1500 and sight.causes == {Cause.FETCH_STALLED}
    assert view.reason == "no fetch of m:0 answered for 12s"
    ev = absence_evaluator()
    ev.see(view, resumed)
    assert ev.holds is not None and ev.holds.held == {"HostSilent"}
    # the next fetch, sent after the resume, finds what was produced meanwhile
    view = sight.view(resumed + 600, {"m:0": PartitionFetch(22, resumed + 500, 10)},
                      rebalancing=False)
    assert view.seen_until_ms == T0 + 1500 and sight.causes == {Cause.BEHIND}
    view = sight.view(resumed + 700, {"m:0": PartitionFetch(22, resumed + 500, 22)},
                      rebalancing=False)
    assert view.seen_until_ms == resumed and view.reason is None
