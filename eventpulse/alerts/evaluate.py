"""Turn records and feature values into observations for the engine, and transitions into outbox
entries. Plain Python: the agents feed it, the replay command feeds it the same way."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    #: While the pipeline is behind its input, rules over processed data are held.
    lagging: bool = False

    @classmethod
    def build(cls, config: AlertingConfig, window_sizes: Mapping[str, int] | None = None,
              extensive: Iterable[str] = ()) -> AlertEvaluator:
        pipeline_rule = ThresholdRule(
            name=PIPELINE_RULE, metric="eventpulse_pipeline_lag", threshold=0.5,
            severity=config.pipeline.severity, **{"for": 0},
            annotations={"summary": "eventpulse is behind its input; data-driven alerts are held",
                         "description": "Error-rate and absence rules wait until the pipeline "
                                        "catches up, so that unprocessed data is not paged on."},
        )
        engine = AlertEngine([*config.rules, pipeline_rule])
        return cls(config, engine, dict(window_sizes or {}), frozenset(extensive))

    # -- record-driven ---------------------------------------------------------------------
    def on_metric(self, name: str, value: float, labels: dict[str, str], at_ms: int,
                  partition: str | None) -> list[Transition]:
        out: list[Transition] = []
        for rule in self.config.rules:
            if isinstance(rule, ThresholdRule) and rule.metric == name and _matches(rule.match, labels):
                out += self.engine.observe(Observation(rule, labels, value, at_ms, partition))
            elif (isinstance(rule, AbsenceRule) and rule.metric == name
                  and _matches(rule.match, labels)):
                out += self.engine.seen(rule, labels, at_ms, partition)
        return out

    def on_features(self, entity: str, readings: Mapping[str, Mapping[str, FeatureReading]],
                    at_ms: int) -> list[Transition]:
        """``readings``: entity id -> feature name -> value, read at ``at_ms``."""
        if self.lagging:
            return []
        out: list[Transition] = []
        for rule in self.config.rules:
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
                        out += self.engine.seen(rule, labels, newest, part)
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
        if self.lagging:
            # hold rules over processed data; thresholds on raw samples still advance
            held = {r.name for r in self.config.rules if isinstance(r, AbsenceRule | RatioRule)}
            keep = {fp: s for fp, s in self.engine.states.items() if s.rule in held}
            for fp in keep:
                self.engine.states.pop(fp)
            try:
                return self.engine.tick(now_ms, owned, include_unowned)
            finally:
                self.engine.states.update(keep)
        return self.engine.tick(now_ms, owned, include_unowned)

    def set_lagging(self, lagging: bool, at_ms: int) -> list[Transition]:
        """The pipeline-lag alert: one alert that says why the others are quiet."""
        self.lagging = lagging
        rule = self.engine.by_name[PIPELINE_RULE]
        return self.engine.observe(Observation(rule, {}, 1.0 if lagging else 0.0, at_ms, None))

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
