"""The YAML job description: topics, privacy, features and alerts, validated as one document.

Errors name the feature or rule by its ``name`` (not its list index) and the field, because that
is what a person edits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from eventpulse.alerts.rules import AbsenceRule, AlertingConfig, RatioRule, SpikeRule
from eventpulse.durations import DurationMs
from eventpulse.streams.decode import DecodeLimits, RecordDecoder
from eventpulse.streams.privacy import Pseudonymiser
from eventpulse.streams.topics import DEAD_LETTER_TOPIC, DEFAULT_TOPICS, RecordKind
from eventpulse.tables.spec import FeatureSpec

EXAMPLE_CONFIG = Path(__file__).parent / "examples" / "eventpulse.yaml"


class PrivacyPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    drop: list[str] = Field(default_factory=list)
    hash: list[str] = Field(default_factory=list)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_bytes: int = Field(default=64 * 1024, gt=0)
    max_depth: int = Field(default=8, gt=0)
    max_past: DurationMs = 7 * 24 * 3_600_000
    max_future: DurationMs = 3_600_000

    def decode_limits(self, check_clock: bool = True) -> DecodeLimits:
        return DecodeLimits(self.max_bytes, self.max_depth, self.max_past, self.max_future,
                            check_clock)


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topics: dict[str, RecordKind] = Field(default_factory=lambda: dict(DEFAULT_TOPICS))
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    partitions: int = Field(default=4, ge=1, description="partitions of topics eventpulse creates")
    privacy: dict[str, PrivacyPolicy] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    features: list[FeatureSpec] = Field(default_factory=list)
    alerts: AlertingConfig = Field(default_factory=AlertingConfig)

    @model_validator(mode="after")
    def _references(self) -> JobConfig:
        names: dict[str, FeatureSpec] = {}
        for feature in self.features:
            if feature.name in names:
                raise ValueError(f"feature {feature.name!r}: two features have this name")
            if feature.topic not in self.topics:
                raise ValueError(f"feature {feature.name!r}: topic {feature.topic!r} is not in "
                                 f"topics ({sorted(self.topics)})")
            names[feature.name] = feature
        for topic in self.privacy:
            if topic not in self.topics:
                raise ValueError(f"privacy: topic {topic!r} is not in topics")
        for rule in self.alerts.rules:
            for attr in ("feature", "baseline"):
                ref = getattr(rule, attr, None)
                if ref is not None and ref not in names:
                    raise ValueError(f"alert rule {rule.name!r}: {attr} {ref!r} is not a declared "
                                     "feature")
            if isinstance(rule, RatioRule) and names[rule.feature].aggregation != "ratio":
                raise ValueError(f"alert rule {rule.name!r}: feature {rule.feature!r} must have "
                                 "aggregation 'ratio'")
            if isinstance(rule, SpikeRule):
                a, b = names[rule.feature], names[rule.baseline]
                if a.entity != b.entity or a.aggregation != b.aggregation:
                    raise ValueError(f"alert rule {rule.name!r}: feature and baseline must share "
                                     "entity and aggregation")
            if isinstance(rule, AbsenceRule) and rule.metric is not None and not any(
                    kind == RecordKind.METRIC for kind in self.topics.values()):
                raise ValueError(f"alert rule {rule.name!r}: no metric topic is configured")
        return self

    def pseudonymisers(self, privacy_secret: bytes | None) -> dict[str, Pseudonymiser]:
        """The privacy policy per topic, as the live pipeline and the archive both apply it."""
        return {topic: Pseudonymiser(privacy_secret or b"", policy.drop, policy.hash)
                for topic, policy in self.privacy.items()}

    def decoders(self, pseudonymisers: dict[str, Pseudonymiser], check_clock: bool = True,
                 ) -> dict[str, RecordDecoder]:
        """One decoder per topic: what counts as a valid record, for every reader of the topics."""
        limits = self.limits.decode_limits(check_clock)
        return {topic: RecordDecoder(kind, limits, pseudonymisers.get(topic))
                for topic, kind in self.topics.items()}

    def topics_of(self, kind: RecordKind) -> list[str]:
        return [name for name, k in self.topics.items() if k == kind]


class ConfigError(Exception):
    """The YAML is wrong; the message names the feature or rule and the field."""


def load_config(path: Path | str | None) -> JobConfig:
    """Read and validate the job YAML (``None``: the bundled example)."""
    source = Path(path) if path is not None else EXAMPLE_CONFIG
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: cannot read YAML: {exc}") from None
    return parse_config(data, str(source))


def parse_config(data: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_locate(data, error['loc'])}: {error['msg']}"
                 for error in exc.errors(include_url=False, include_input=False)]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


def _locate(data: Any, loc: tuple[int | str, ...]) -> str:
    """``('features', 2, 'window', 'size')`` -> ``feature 'clicks_5m': window.size``."""
    if len(loc) >= 2 and loc[0] == "features" and isinstance(loc[1], int):
        name = _name_at(data, "features", loc[1])
        return f"feature {name!r}: " + ".".join(str(p) for p in loc[2:]) if loc[2:] else f"feature {name!r}"
    if len(loc) >= 3 and loc[:2] == ("alerts", "rules") and isinstance(loc[2], int):
        rules = (data.get("alerts") or {}).get("rules") or []
        name = rules[loc[2]].get("name", f"#{loc[2]}") if loc[2] < len(rules) and isinstance(
            rules[loc[2]], dict) else f"#{loc[2]}"
        rest = [str(p) for p in loc[3:] if p not in ("threshold", "ratio", "absence", "spike")
                or p != loc[3]]
        return f"alert rule {name!r}: " + ".".join(rest)
    return ".".join(str(p) for p in loc) or "top level"


def _name_at(data: Any, section: str, index: int) -> str:
    items = data.get(section) if isinstance(data, dict) else None
    if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
        return str(items[index].get("name", f"#{index}"))
    return f"#{index}"
