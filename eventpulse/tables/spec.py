"""Declarative features: what to aggregate, keyed by what, over which event-time window.

A feature is declared once in YAML and compiled here into three small functions (does this record
count, which entity is it about, what value does it contribute) so that the hot path never
re-interprets configuration.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from eventpulse.durations import DurationMs
from eventpulse.streams.decode import MAX_FLOAT, EntityKeys
from eventpulse.streams.entitykey import key_text
from eventpulse.tables import kinds
from eventpulse.tables.kinds import PERCENTILES as PERCENTILES

Aggregation = Literal[
    "count", "sum", "mean", "min", "max", "last", "distinct", "p50", "p90", "p95", "p99", "ratio"
]
NEEDS_NUMBER = {"sum", "mean", "min", "max", *PERCENTILES}
NEEDS_VALUE = NEEDS_NUMBER | {"last", "distinct"}

#: Cap on windows one event updates (size / step): each costs one Redis write per batch.
MAX_WINDOWS_PER_EVENT = 360
#: Cap on the numbers of one feature's ring per entity (windows kept x numbers per window).
#: apply.lua unpacks a ring into Lua values in one call, and Redis' Lua refuses more than about
#: 7,990 results of one call ("too many results to unpack": every write of the feature failed,
#: found by outside testing); a ring that size is also 60 KB rewritten at every write.
MAX_RING_NUMBERS = 6_000

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_OPERATORS = {"eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists"}

#: A record as the hot path sees it: the typed fields and the extra fields in one dict.
View = dict[str, Any]
Getter = Callable[[View], Any]
Predicate = Callable[[View], bool]


def record_view(record: Any) -> View:
    """One dict over a pydantic record's typed and extra fields (no pydantic attribute access,
    which is slow for misses); an archived record is that dict already."""
    if type(record) is dict:
        return record
    extra = record.__pydantic_extra__
    return {**record.__dict__, **extra} if extra else record.__dict__


def field_getter(path: str) -> Getter:
    """A function reading ``a.b.c`` from a record view."""
    head, *rest = path.split(".")
    if not rest:
        return lambda view: view.get(head)

    def get(view: View) -> Any:
        value = view.get(head)
        for part in rest:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        if value.__class__ is float and not -MAX_FLOAT <= value <= MAX_FLOAT:
            return None  # a logged read's served values may pass the bound of inputs
        return value

    return get


def _compare(op: str, expected: Any) -> Callable[[Any], bool]:
    def as_number(x: Any) -> float | None:
        # as it is: Python compares ints and floats exactly (2**53 + 1 > 2**53), float() not
        return x if isinstance(x, int | float) and not isinstance(x, bool) else None

    match op:
        case "eq":
            return lambda v: v == expected
        case "ne":
            return lambda v: v != expected
        case "in":
            allowed = frozenset(expected)

            def is_in(v: Any) -> bool:
                try:
                    return v in allowed
                except TypeError:  # a list or object (unhashable) is never one of the values
                    return False

            return is_in
        case "not_in":
            refused = frozenset(expected)

            def is_not_in(v: Any) -> bool:
                try:
                    return v not in refused
                except TypeError:  # a list or object (unhashable) is none of the values
                    return True

            return is_not_in
        case "exists":
            return (lambda v: v is not None) if expected else (lambda v: v is None)
        case "gt" | "gte" | "lt" | "lte":
            bound = as_number(expected)
            if bound is None:  # validate_filter refuses it: a job read otherwise
                raise ValueError(f"{op} needs a finite number, got {expected!r:.40}")
            tests: dict[str, Callable[[float], bool]] = {
                "gt": lambda a: a > bound,
                "gte": lambda a: a >= bound,
                "lt": lambda a: a < bound,
                "lte": lambda a: a <= bound,
            }
            test = tests[op]

            def check(v: Any) -> bool:
                number = as_number(v)
                return number is not None and test(number)

            return check
    raise ValueError(f"unknown operator {op!r}")


def compile_filter(spec: dict[str, Any]) -> Predicate | None:
    """``{action: click, status: {gte: 500}, device: {in: [ios, android]}}`` -> predicate (AND);
    ``None`` for no condition, so that the hot path can skip the call."""
    checks: list[tuple[Getter, Callable[[Any], bool]]] = []
    for path, condition in spec.items():
        getter = field_getter(path)
        if isinstance(condition, dict):
            for op, expected in condition.items():
                checks.append((getter, _compare(op, expected)))
        else:
            checks.append((getter, _compare("eq", condition)))
    if not checks:
        return None
    equal = field_equals(spec)
    if equal is not None:  # the common filter, one top-level field equal to a value: one call
        path, condition = equal
        return lambda view: view.get(path) == condition
    if len(checks) == 1:
        (getter, test), = checks
        return lambda view: test(getter(view))
    return lambda view: all(test(getter(view)) for getter, test in checks)


def field_equals(spec: dict[str, Any]) -> tuple[str, Any] | None:
    """``(field, value)`` when the filter is the common one, a top-level field equal to a
    value (``{action: click}``), which the fold tests inline (``view.get(field) == value``,
    what :func:`compile_filter`'s predicate does) instead of calling the predicate; else None."""
    if len(spec) != 1:
        return None
    (path, condition), = spec.items()
    if "." in path or isinstance(condition, dict):
        return None
    return path, condition


def validate_filter(spec: dict[str, Any]) -> dict[str, Any]:
    for path, condition in spec.items():
        if not isinstance(condition, dict):
            continue
        for op, expected in condition.items():
            if op not in _OPERATORS:
                raise ValueError(
                    f"filter on {path!r}: unknown operator {op!r}; use one of {sorted(_OPERATORS)}"
                )
            if op in {"in", "not_in"} and not isinstance(expected, list):
                raise ValueError(f"filter on {path!r}: {op} needs a list")
            if op in {"in", "not_in"} and any(isinstance(v, list | dict) for v in expected):
                raise ValueError(f"filter on {path!r}: {op} takes a list of plain values "
                                 "(strings, numbers, booleans), not of lists or maps")
            if op in {"gt", "gte", "lt", "lte"} and (
                    not isinstance(expected, int | float) or isinstance(expected, bool)
                    or (isinstance(expected, float) and not math.isfinite(expected))):
                raise ValueError(f"filter on {path!r}: {op} needs a finite number, got "
                                 f"{expected!r:.40}")
    return spec


class WindowSpec(BaseModel):
    """An event-time window. ``hopping`` and ``sliding`` are the same thing here (Flink's naming
    says sliding, Kafka Streams' says hopping): a window of ``size`` that advances every ``step``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["tumbling", "hopping", "sliding"] = "tumbling"
    size: DurationMs
    step: DurationMs | None = None
    lateness: DurationMs = 0

    @model_validator(mode="after")
    def _check(self) -> WindowSpec:
        if self.size <= 0:
            raise ValueError("window.size must be positive")
        if self.type == "tumbling":
            if self.step not in (None, self.size):
                raise ValueError("a tumbling window has no step (it is its size)")
            self.step = self.size
        elif self.step is None or self.step <= 0:
            raise ValueError(f"a {self.type} window needs a positive step")
        assert self.step is not None
        if self.size % self.step:
            raise ValueError("window.size must be a whole multiple of window.step")
        if self.size // self.step > MAX_WINDOWS_PER_EVENT:
            raise ValueError(
                f"size/step is {self.size // self.step}; at most {MAX_WINDOWS_PER_EVENT} windows "
                "per event are allowed, use a larger step"
            )
        return self

    @property
    def step_ms(self) -> int:
        assert self.step is not None
        return self.step

    @property
    def windows_per_event(self) -> int:
        return self.size // self.step_ms

    @property
    def ring_slots(self) -> int:
        """Windows kept per feature and entity (eventpulse/tables/ring.py): the ``size / step``
        an event updates, the ones a late event (up to ``lateness``) can still reach, and the one
        a reader sees while the newest event's step is still open."""
        return self.windows_per_event + -(-self.lateness // self.step_ms) + 1

    def current_end(self, at_ms: int) -> int:
        """End of the latest closed window at or before ``at_ms``."""
        return at_ms - at_ms % self.step_ms


class FeatureSpec(BaseModel):
    """One feature as declared in YAML."""

    model_config = ConfigDict(extra="forbid")

    name: str
    topic: str
    entity: str
    key: list[str] = Field(min_length=1)
    where: dict[str, Any] = Field(default_factory=dict)
    aggregation: Aggregation
    value: str | None = None
    numerator: dict[str, Any] | None = None
    window: WindowSpec
    ttl: DurationMs | None = None
    max_age: DurationMs | None = None

    @property
    def fields_read(self) -> set[str]:
        """The top-level record fields this feature reads (keys, value, filters): a reader that
        builds records for it alone may leave the others out (the training set does)."""
        paths = [*self.key, *self.where, *(self.numerator or {}),
                 *([self.value] if self.value else [])]
        return {path.split(".", 1)[0] for path in paths}

    @field_validator("name", "entity")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("use lower-case letters, digits and _ (start with a letter)")
        return value

    @field_validator("key", mode="before")
    @classmethod
    def _key_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("where", "numerator")
    @classmethod
    def _filters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else validate_filter(value)

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        if self.aggregation in NEEDS_VALUE and not self.value:
            raise ValueError(f"aggregation {self.aggregation!r} needs 'value' (the field to read)")
        if self.aggregation == "ratio" and not self.numerator:
            raise ValueError("aggregation 'ratio' needs 'numerator' (a filter, e.g. status: {gte: 500})")
        if self.aggregation != "ratio" and self.numerator:
            raise ValueError("'numerator' only applies to aggregation 'ratio'")
        numbers = self.window.ring_slots * kinds.KINDS[self.aggregation].stride
        if numbers > MAX_RING_NUMBERS:
            window = self.window
            raise ValueError(
                f"window keeps {window.ring_slots} windows per entity (size/step "
                f"{window.windows_per_event}, {window.ring_slots - window.windows_per_event - 1} "
                f"more for the lateness, and the open one), {numbers} numbers for "
                f"{self.aggregation!r}; at most {MAX_RING_NUMBERS}: use a larger window.step or "
                "a smaller window.lateness")
        horizon = self.window.size + self.window.lateness
        if self.ttl is None:
            self.ttl = max(2 * horizon, 3_600_000)
        elif self.ttl < horizon + self.window.step_ms:
            # a record stays in the latest closed window up to size + step after its event
            # time: the key it lives in must not expire before (nor its sketch's step keys),
            # or a read loses it, and a training set cannot tell when (offline/expiry.py)
            raise ValueError(
                f"ttl must cover the window, one step and the lateness "
                f"({horizon + self.window.step_ms} ms), or values vanish early")
        return self


#: Aggregation codes for the hot path's dispatch (eventpulse/tables/kinds.py).
AGG_CODES = {name: kind.code for name, kind in kinds.KINDS.items()}


class CompiledFeature:
    """A feature ready for the hot path: plain attributes, no properties, no re-parsing."""

    __slots__ = (
        "agg_code", "aggregation", "entity", "index", "is_match", "is_numerator", "key_field",
        "key_of", "lateness", "match_equals", "name", "numerator_equals", "spec", "step",
        "value_field", "value_of", "window",
    )

    def __init__(self, spec: FeatureSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.name = spec.name
        self.entity = spec.entity
        self.aggregation = spec.aggregation
        self.agg_code = AGG_CODES[spec.aggregation]
        self.window = spec.window
        self.step = spec.window.step_ms
        self.lateness = spec.window.lateness
        self.is_match = compile_filter(spec.where)
        self.is_numerator = compile_filter(spec.numerator or {})
        #: the filters as (field, value) where they are one field equal to a value (tested
        #: inline by the fold), else None
        self.match_equals = field_equals(spec.where)
        self.numerator_equals = field_equals(spec.numerator or {})
        # the common case, one top-level key field, is read inline by the combiner
        simple = len(spec.key) == 1 and "." not in spec.key[0]
        self.key_field: str | None = spec.key[0] if simple else None
        getters = [field_getter(path) for path in spec.key]

        def key_of(view: View) -> str | None:
            """The entity id (``a|b`` for a composite key; each part as ``key_text`` says,
            which raises ``BadKey`` for a part that is not an id)."""
            parts = [getter(view) for getter in getters]
            if any(part is None or part == "" for part in parts):
                return None
            return "|".join(key_text(part) for part in parts)

        self.key_of = key_of
        simple_value = spec.value is not None and "." not in spec.value
        self.value_field: str | None = spec.value if simple_value else None
        self.value_of: Getter | None = field_getter(spec.value) if spec.value else None

    def entity_id(self, view: View) -> str | None:
        """The entity id the combiner keys the record on for this feature, or None when the
        record is not about an entity of its kind (``fold.add`` inlines the same rule: it runs
        for every record)."""
        entity_id = view.get(self.key_field) if self.key_field is not None else self.key_of(view)
        if entity_id is None or entity_id == "":
            return None
        return entity_id if entity_id.__class__ is str else key_text(entity_id)

    def number(self, view: View) -> float | None:
        """The value as a finite number, or None (not a number, NaN, infinite)."""
        assert self.value_of is not None
        value = view.get(self.value_field) if self.value_field else self.value_of(view)
        if value.__class__ is float:
            return value if math.isfinite(value) else None
        if value.__class__ is int:
            return float(value)
        return None


def entity_key_reader(features: list[CompiledFeature], topic: str) -> EntityKeys | None:
    """Where a record's entity ids are for the features of ``topic``, each as the combiner will
    key it (one read per distinct key), so the decoder can refuse ids that would make absurd
    Redis key names; None when no feature reads the topic. Top-level key fields are named (the
    decoder reads them straight from the record, for every record); composite and nested keys
    are read from a view."""
    simple: list[str] = []
    composite: dict[tuple[str, ...], Getter] = {}
    for feature in features:
        if feature.spec.topic != topic:
            continue
        if feature.key_field is not None:
            if feature.key_field not in simple:
                simple.append(feature.key_field)
        else:
            composite.setdefault(tuple(feature.spec.key), feature.key_of)
    if not simple and not composite:
        return None
    if not composite:
        return EntityKeys(tuple(simple))
    getters = list(composite.values())

    def read_others(record: Any) -> list[Any]:
        view = record_view(record)
        return [getter(view) for getter in getters]

    return EntityKeys(tuple(simple), read_others)
