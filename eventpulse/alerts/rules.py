"""Alert rules as declared in YAML: what to watch, when it is bad, and whom to tell.

Four kinds, matching what on-call people actually page on: a ``threshold`` on a metric series, a
``ratio`` feature over a window (error rate, with a minimum count so that 1 failure out of 1 is
not an outage), ``absence`` of samples or events, and a ``spike`` of a feature against a longer
trailing baseline. All share the Alertmanager vocabulary: ``for``, a ``clear`` threshold for
hysteresis, ``repeat_interval``, ``group_by``, labels and annotations.
"""

from __future__ import annotations

import operator
import re
import string
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eventpulse.durations import DurationMs

Severity = Literal["critical", "warning", "info"]
Comparison = Literal[">", ">=", "<", "<="]
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
}
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,80}$")


class Annotations(BaseModel):
    """Templates use ``{labels[host]}``, ``{value}``, ``{threshold}`` (str.format)."""

    model_config = ConfigDict(extra="allow")

    summary: str = "{rule} is {state}"
    description: str = ""
    runbook_url: str | None = None
    dashboard_url: str | None = None

    @field_validator("summary", "description")
    @classmethod
    def _renders(cls, template: str) -> str:
        """A template that cannot render is refused at start-up (and by ``check-config``), not
        found on Slack as ``[template error: ...]`` when the alert fires."""
        problem = template_problem(template)
        if problem:
            raise ValueError(f"{problem} in {template!r}")
        return template


class _RuleBase(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str
    severity: Severity = "warning"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: Annotations = Field(default_factory=Annotations)
    for_ms: DurationMs = Field(default=0, alias="for")
    repeat_interval: DurationMs = 4 * 3_600_000
    group_by: list[str] = Field(default_factory=list)
    group_wait: DurationMs = 0

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("rule names start with a letter and use letters, digits, _ . -")
        return value


class _Compared(_RuleBase):
    op: Comparison = ">"
    threshold: float
    clear: float | None = None

    @model_validator(mode="after")
    def _hysteresis(self) -> _Compared:
        if self.clear is None:
            return self
        above = self.op in (">", ">=")
        if (above and self.clear > self.threshold) or (not above and self.clear < self.threshold):
            raise ValueError(
                f"clear ({self.clear}) must be on the healthy side of threshold ({self.threshold})"
            )
        return self

    def is_bad(self, value: float) -> bool:
        return _COMPARE[self.op](value, self.threshold)

    def is_clear(self, value: float) -> bool:
        """After firing, the condition holds until the value crosses ``clear`` (hysteresis)."""
        if self.clear is None:
            return not self.is_bad(value)
        if self.op in (">", ">="):
            return value < self.clear if self.op == ">" else value <= self.clear
        return value > self.clear if self.op == "<" else value >= self.clear


class ThresholdRule(_Compared):
    """``metric`` compared per label set (one alert per host/mount...)."""

    kind: Literal["threshold"] = "threshold"
    metric: str
    match: dict[str, str] = Field(default_factory=dict)


class RatioRule(_Compared):
    """A ``ratio`` feature (e.g. 5xx / all over 5 minutes) compared per entity."""

    kind: Literal["ratio"] = "ratio"
    feature: str
    min_count: int = Field(default=20, ge=1)


class AbsenceRule(_RuleBase):
    """No sample of ``metric`` (per label set) or no event for an entity of ``feature``."""

    kind: Literal["absence"] = "absence"
    metric: str | None = None
    feature: str | None = None
    match: dict[str, str] = Field(default_factory=dict)
    after: DurationMs

    @model_validator(mode="after")
    def _one_source(self) -> AbsenceRule:
        if (self.metric is None) == (self.feature is None):
            raise ValueError("an absence rule names exactly one of 'metric' or 'feature'")
        return self


class SpikeRule(_RuleBase):
    """``feature`` above ``factor`` x ``baseline`` (a longer window of the same measure).

    Counts and sums are compared as rates (per window length), so a 5-minute count and a 1-hour
    count of the same thing are comparable.
    """

    kind: Literal["spike"] = "spike"
    feature: str
    baseline: str
    factor: float = Field(gt=1)
    min_baseline: float = Field(default=0.0, ge=0)


Rule = Annotated[ThresholdRule | RatioRule | AbsenceRule | SpikeRule, Field(discriminator="kind")]


class Route(BaseModel):
    """First matching route wins; ``channel`` is a Slack channel id or name."""

    model_config = ConfigDict(extra="forbid")

    channel: str
    severity: list[Severity] | None = None
    match: dict[str, str] = Field(default_factory=dict)

    def matches(self, severity: str, labels: dict[str, str]) -> bool:
        if self.severity is not None and severity not in self.severity:
            return False
        return all(labels.get(k) == v for k, v in self.match.items())


class PipelineGuard(BaseModel):
    """When the worker cannot see its input, data-dependent rules are held (each against its
    own horizon, see ``alerts.blind``) and one alert says so: ``max_lag_ms`` caps how long the
    worker may be blind before that alert fires (the shortest rule horizon, if shorter)."""

    model_config = ConfigDict(extra="forbid")

    max_lag_ms: DurationMs = 120_000
    severity: Severity = "warning"


class AlertingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    default_channel: str = "#alerts"
    pipeline: PipelineGuard = Field(default_factory=PipelineGuard)

    @model_validator(mode="after")
    def _unique_names(self) -> AlertingConfig:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"two alert rules are named {rule.name!r}")
            seen.add(rule.name)
        return self

    def channel_for(self, severity: str, labels: dict[str, str]) -> str:
        for route in self.routes:
            if route.matches(severity, labels):
                return route.channel
        return self.default_channel


#: what an annotation template may refer to (message.py fills these)
TEMPLATE_FIELDS = frozenset({"rule", "state", "labels", "value", "threshold", "note"})


def template_problem(template: str) -> str | None:
    """Why ``template`` cannot render with the fields :data:`TEMPLATE_FIELDS`, or None."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"not a valid template ({exc}; write {{{{ and }}}} for literal braces)"
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split("[", 1)[0].split(".", 1)[0]
        if root not in TEMPLATE_FIELDS:
            known = ", ".join(f"{{{f}}}" for f in sorted(TEMPLATE_FIELDS))
            return f"unknown field {{{name}}} (known: {known}, and {{labels[NAME]}})"
    return None


def render(template: str, **context: Any) -> str:
    """Fill an annotation template; a broken template shows itself instead of crashing."""
    try:
        return template.format(**context)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        return f"{template} [template error: {exc!r}]"
