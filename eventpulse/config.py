"""The YAML job description: topics, privacy, features and alerts, validated as one document.

Errors name the feature or rule by its ``name`` (not its list index) and the field, because that
is what a person edits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from eventpulse.alerts.rules import AbsenceRule, AlertingConfig, RatioRule, SpikeRule
from eventpulse.durations import DurationMs
from eventpulse.streams.deadletter import DEFAULT_MAX_MESSAGE_BYTES, MIN_DEAD_LETTER_BYTES
from eventpulse.streams.decode import DecodeLimits, RecordDecoder
from eventpulse.streams.privacy import Pseudonymiser
from eventpulse.streams.topics import DEAD_LETTER_TOPIC, DEFAULT_TOPICS, RecordKind, topic_name_problem
from eventpulse.tables.spec import FeatureSpec
from eventpulse.validation import messages, report

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
    max_key_bytes: int = Field(default=256, ge=16, le=65_536, description=(
        "longest entity key in UTF-8 bytes; a longer one is refused as key_too_long"))
    dead_letter_max_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=MIN_DEAD_LETTER_BYTES,
                                       description=(
        "max.message.bytes of the dead-letter topic when eventpulse creates it, and the bound "
        "assumed when the broker does not report the topic's own"))

    def decode_limits(self, check_clock: bool = True) -> DecodeLimits:
        return DecodeLimits(self.max_bytes, self.max_depth, self.max_past, self.max_future,
                            check_clock, self.max_key_bytes)


class JobConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topics: dict[str, RecordKind] = Field(default_factory=lambda: dict(DEFAULT_TOPICS))
    dead_letter_topic: str = DEAD_LETTER_TOPIC
    partitions: int = Field(default=4, ge=1, description="partitions of topics eventpulse creates")
    privacy: dict[str, PrivacyPolicy] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    features: list[FeatureSpec] = Field(default_factory=list)
    alerts: AlertingConfig = Field(default_factory=AlertingConfig)

    @field_validator("dead_letter_topic")
    @classmethod
    def _legal_topic(cls, value: str) -> str:
        # a name the broker refuses would fail every dead letter, for good: refuse it here
        problem = topic_name_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

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
        from eventpulse.tables.spec import CompiledFeature, entity_key_reader

        limits = self.limits.decode_limits(check_clock)
        compiled = [CompiledFeature(spec, i) for i, spec in enumerate(self.features)]
        return {topic: RecordDecoder(kind, limits, pseudonymisers.get(topic),
                                     entity_key_reader(compiled, topic))
                for topic, kind in self.topics.items()}

    def topics_of(self, kind: RecordKind) -> list[str]:
        return [name for name, k in self.topics.items() if k == kind]


class ConfigError(Exception):
    """The YAML is wrong; the message names the feature or rule and the field."""


def load_config(path: Path | str | None) -> JobConfig:
    """Read and validate the job YAML (``None``: the bundled example)."""
    source = Path(path) if path is not None else EXAMPLE_CONFIG
    try:
        text = source.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read it: {_os_reason(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_reason(exc)}") from None
    if data is None or data == {}:
        raise ConfigError(f"{source}: the file is empty; it needs at least 'features:' or "
                          "'alerts:' (see the bundled eventpulse/examples/eventpulse.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (topics:, "
                          f"features:, alerts: ...), not a {type(data).__name__}")
    return parse_config(data, str(source))


def _os_reason(exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return exc.strerror or type(exc).__name__


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """``line 3, column 5: mapping values are not allowed here``: PyYAML's own report names
    "<unicode string>" and spreads over several lines."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc).splitlines()[0]
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = f" ({exc.context})" if exc.context else ""
    return f"{where}{exc.problem or 'cannot parse'}{context}"


def parse_config(data: dict[str, Any], source: str = "config") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        lines = [f"{source}: {_locate(data, loc)}{text}" for loc, text in messages(errors)]
        raise ConfigError(report("invalid configuration", lines)) from None


def _locate(data: Any, loc: tuple[int | str, ...]) -> str:
    """``('features', 2, 'window', 'size')`` -> ``feature 'clicks_5m': window.size: `` (the
    prefix of the message); a rule's kind, which pydantic inserts after the index, is left out."""
    if len(loc) >= 2 and loc[0] == "features" and isinstance(loc[1], int):
        return _joined(f"feature {_name_at(data, 'features', loc[1])!r}", loc[2:])
    if len(loc) >= 3 and loc[:2] == ("alerts", "rules") and isinstance(loc[2], int):
        return _joined(f"alert rule {_name_at(data.get('alerts'), 'rules', loc[2])!r}", loc[4:])
    return _joined("", loc) or "top level: "


def _joined(what: str, path: Sequence[int | str]) -> str:
    parts = [what] if what else []
    if path:
        parts.append(".".join(str(p) for p in path))
    return "".join(part + ": " for part in parts)


def _name_at(data: Any, section: str, index: int) -> str:
    items = data.get(section) if isinstance(data, dict) else None
    if isinstance(items, list) and index < len(items) and isinstance(items[index], dict):
        return str(items[index].get("name", f"#{index}"))
    return f"#{index}"
