"""Turn records and feature values into observations for the engine, and transitions into outbox
entries. Plain Python: the agents feed it, the replay command feeds it the same way."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from eventpulse.alerts.blind import FRESH_MS, Holds, InputView
from eventpulse.alerts.outbox import OutboxEntry
from eventpulse.alerts.rules import (
    AbsenceRule,
    AlertingConfig,
    RatioRule,
    Rule,
    SpikeRule,
    ThresholdRule,
)
from eventpulse.alerts.state import AlertEngine, Observation, Transition

#: the input-blind alert (the name predates "blind": routes and silences may name it)
PIPELINE_RULE = "EventpulsePipelineLagging"


class FeatureReading(Protocol):
    """What alerting needs of a feature value (``eventpulse.tables.client.FeatureValue``)."""

    value: Any
    event_count: int | None
    window_end_ms: int
    newest_event_ms: int | None


@dataclass
class AlertEvaluator:
    config: AlertingConfig
    engine: AlertEngine
    #: Names of features whose window sizes turn counts into rates for spike rules.
    window_sizes: Mapping[str, int] = field(default_factory=dict)
    extensive: frozenset[str] = frozenset()
    #: rules over data held while the worker cannot see its input (see ``alerts.blind``)
    holds: Holds | None = None
    #: the newest view of the input (None: not measured, as in replay: everything is seen)
    view: InputView | None = None

    @classmethod
    def build(cls, config: AlertingConfig, window_sizes: Mapping[str, int] | None = None,
              extensive: Iterable[str] = ()) -> AlertEvaluator:
        sizes = dict(window_sizes or {})
        holds = Holds(config.rules, sizes)
        # blind for longer than the shortest rule horizon (or the configured bound): say so
        bound_ms = min(config.pipeline.max_lag_ms, holds.shortest or config.pipeline.max_lag_ms)
        pipeline_rule = ThresholdRule(
            name=PIPELINE_RULE, metric="eventpulse_input_blind_seconds",
            threshold=max(bound_ms, FRESH_MS) / 1000, clear=0.5,
            severity=config.pipeline.severity, **{"for": 0},
            annotations={
                "summary": "{note}",
                "description": "Absence, ratio and spike rules (and thresholds with `for`) are "
                               "held while the worker has not seen its input for longer than "
                               "their own horizon, so data not seen yet is not paged on. Real "
                               "silences that happened meanwhile are announced once it sees "
                               "again. The value is how many seconds the worker has been blind."},
        )
        engine = AlertEngine([*config.rules, pipeline_rule], unjudged=holds.unjudged)
        return cls(config, engine, sizes, frozenset(extensive), holds)

    @property
    def lagging(self) -> bool:
        """Some rule is held because the worker cannot see (all of) its input."""
        return bool(self.holds and self.holds.held)

    def held(self, rule: str) -> bool:
        return self.holds is not None and rule in self.holds.held

    def seen_until(self, now_ms: int) -> int:
        """The time up to which data-driven rules may judge: now, or the view if older."""
        if self.view is None or self.view.seen_until_ms is None:
            return now_ms
        return min(now_ms, self.view.seen_until_ms)

    # -- record-driven ---------------------------------------------------------------------
    def on_metric(self, name: str, value: float, labels: dict[str, str], at_ms: int,
                  partition: str | None, now_ms: int | None = None) -> list[Transition]:
        """A metric sample stamped ``at_ms``, read at ``now_ms`` (None: not known, as in
        replay)."""
        out: list[Transition] = []
        for rule in self.config.rules:
            if isinstance(rule, ThresholdRule) and rule.metric == name and _matches(rule.match, labels):
                out += self.engine.observe(Observation(rule, labels, value, at_ms, partition,
                                                       read_ms=now_ms))
            elif (isinstance(rule, AbsenceRule) and rule.metric == name
                  and _matches(rule.match, labels)):
                out += self.engine.seen(rule, labels, at_ms, partition, now_ms)
        return out

    def on_features(self, entity: str, readings: Mapping[str, Mapping[str, FeatureReading]],
                    at_ms: int, arrived: Mapping[str, Collection[str]] | None = None,
                    ) -> list[Transition]:
        """``readings``: entity id -> feature name -> value, read at ``at_ms``. ``arrived``:
        feature name -> the ids a batch just wrote records of (None: a re-read on the clock):
        an arrival at ``at_ms`` for an absence, whatever the records' stamps (a producer whose
        clock stepped back sends events older than the newest one read before)."""
        out: list[Transition] = []
        for rule in self.config.rules:
            if self.held(rule.name):
                continue
            for entity_id, values in readings.items():
                labels = {entity: entity_id}
                part = None  # feature-driven: evaluated by the alert lease holder
                if isinstance(rule, RatioRule) and rule.feature in values:
                    reading = values[rule.feature]
                    enough = (reading.event_count or 0) >= rule.min_count and reading.value is not None
                    value = float(reading.value) if enough else None
                    out += self.engine.observe(Observation(rule, labels, value, at_ms, part))
                elif isinstance(rule, SpikeRule) and rule.feature in values and rule.baseline in values:
                    ratio = self._spike_ratio(rule, values[rule.feature], values[rule.baseline])
                    out += self.engine.observe(Observation(rule, labels, ratio, at_ms, part))
                elif isinstance(rule, AbsenceRule) and rule.feature is not None and rule.feature in values:
                    newest = values[rule.feature].newest_event_ms
                    if newest is not None:
                        fresh = arrived is not None and entity_id in arrived.get(rule.feature, ())
                        out += self.engine.seen(rule, labels, newest, part, at_ms,
                                                reread=not fresh)
        return out

    def _spike_ratio(self, rule: SpikeRule, current: FeatureReading,
                     baseline: FeatureReading) -> float | None:
        if current.value is None or baseline.value is None:
            return None
        now, base = float(current.value), float(baseline.value)
        if rule.feature in self.extensive and rule.baseline in self.extensive:
            now /= self.window_sizes.get(rule.feature, 1)
            base /= self.window_sizes.get(rule.baseline, 1)
        if base <= 0:
            return None if now <= 0 else float("inf") if base <= rule.min_baseline else None
        if base < rule.min_baseline:
            return None
        return now / base

    # -- time-driven ---------------------------------------------------------------------
    def tick(self, now_ms: int, owned: Iterable[str] | None = None,
             include_unowned: bool = True) -> list[Transition]:
        seen_until = None if self.view is None else self.seen_until(now_ms)
        held = self.holds.held if self.holds is not None else set()
        if not held:
            return self.engine.tick(now_ms, owned, include_unowned, seen_until)
        # held rules keep their states untouched; the others (raw thresholds...) advance
        keep = {fp: s for fp, s in self.engine.states.items() if s.rule in held}
        for fp in keep:
            self.engine.states.pop(fp)
        try:
            return self.engine.tick(now_ms, owned, include_unowned, seen_until)
        finally:
            self.engine.states.update(keep)

    def see(self, view: InputView, now_ms: int) -> list[Transition]:
        """The worker's view of its input now: update the holds and the input-blind alert,
        which fires once (saying why) and resolves once sight returns."""
        previous = self.view
        self.view = view
        if self.holds is not None:
            self.holds.update(view, now_ms)
        for partition in view.skipping:
            self.engine.skipping(partition)
        rule = self.engine.by_name[PIPELINE_RULE]
        blind_s = view.blind_ms(now_ms) / 1000
        if blind_s > 0:
            note = (f"eventpulse cannot see all of its input ({view.reason or 'unknown'}); "
                    "data-driven alerts are held")
        else:
            was = previous.blind_ms(now_ms) / 1000 if previous is not None else 0.0
            note = (f"eventpulse sees its input again{f' after {was:.0f}s' if was else ''}; "
                    "held alerts resume")
        return self.engine.observe(Observation(rule, {}, blind_s, now_ms, None, note=note))

    # -- to the outbox -------------------------------------------------------------------
    def entries(self, transitions: Iterable[Transition], decided_ms: int) -> list[OutboxEntry]:
        out = []
        for t in transitions:
            rule = self.engine.by_name[t.rule]
            group_key = ",".join(f"{k}={t.labels.get(k, '')}" for k in rule.group_by)
            channel = self.config.channel_for(rule.severity, t.labels)
            out.append(OutboxEntry(
                # as in Alertmanager: one group per rule and value of its group_by labels
                key=t.key, group=f"{rule.name}|{group_key}",
                rule=rule.name, channel=channel, transition=t,
                not_before_ms=decided_ms + (rule.group_wait if t.kind.value == "firing" else 0),
                decided_ms=decided_ms,
            ))
        return out

    def rule(self, name: str) -> Rule:
        return self.engine.by_name[name]


def _matches(match: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())
