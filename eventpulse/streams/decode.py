"""Bytes from Kafka -> a validated record, or a reason why not.

The decoder never raises for bad input: a producer bug must cost one dead letter, not the worker.
The happy path is one call into pydantic-core's JSON parser and validator (no ``json.loads`` and
then a second pass); the checks that pydantic cannot express (size, nesting, non-finite numbers in
free-form fields, clock sanity) run only where they can matter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from eventpulse.streams.privacy import Pseudonymiser
from eventpulse.streams.schemas import SCHEMAS, SUPPORTED_SCHEMA_VERSIONS, Record
from eventpulse.streams.topics import RecordKind


@dataclass(frozen=True, slots=True)
class DecodeError:
    """Why a record was refused: a short machine-readable reason and a human sentence."""

    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds that protect the worker from absurd input."""

    max_bytes: int = 64 * 1024
    max_depth: int = 8
    max_past_ms: int = 7 * 24 * 3600 * 1000
    max_future_ms: int = 3600 * 1000
    #: False in ``replay``, where recorded events are legitimately old.
    check_clock: bool = True


class RecordDecoder:
    """Decodes one topic's records into its pydantic model."""

    def __init__(
        self,
        kind: RecordKind,
        limits: DecodeLimits | None = None,
        pseudonymiser: Pseudonymiser | None = None,
    ) -> None:
        self.kind = kind
        self.model = SCHEMAS[kind]
        self.limits = limits or DecodeLimits()
        self.pseudonymiser = pseudonymiser

    def decode(self, raw: bytes | None, now_ms: int | None = None) -> Record | DecodeError:
        limits = self.limits
        if raw is None:
            return DecodeError("empty", "record has no value (tombstone)")
        if len(raw) > limits.max_bytes:
            return DecodeError("too_large", f"{len(raw)} bytes is over the {limits.max_bytes} limit")
        try:
            record = self.model.model_validate_json(raw)
        except ValidationError as exc:
            return _explain(exc, raw)
        if record.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            return DecodeError(
                "unsupported_schema_version",
                f"schema_version {record.schema_version} is not one of "
                f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}",
            )
        problem = _check_free_fields(record, limits.max_depth)
        if problem is not None:
            return problem
        if limits.check_clock:
            now = int(time.time() * 1000) if now_ms is None else now_ms
            if record.timestamp < now - limits.max_past_ms:
                return DecodeError("timestamp_too_old", "timestamp is older than the accepted past")
            if record.timestamp > now + limits.max_future_ms:
                return DecodeError("timestamp_in_future", "timestamp is too far in the future")
        if self.pseudonymiser is not None:
            self.pseudonymiser.apply(record)
        return record


def _explain(exc: ValidationError, raw: bytes) -> DecodeError:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    kind = first["type"]
    where = ".".join(str(part) for part in first["loc"]) or "record"
    if kind == "json_invalid":
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return DecodeError("not_utf8", f"not UTF-8 at byte {err.start}")
        return DecodeError("not_json", first["msg"])
    if kind == "model_type":
        return DecodeError("not_object", "a record must be a JSON object")
    if kind == "finite_number":
        return DecodeError("non_finite", f"{where}: NaN or infinity where a number is needed")
    if kind == "missing" and where == "timestamp":
        return DecodeError("missing_timestamp", "record has no timestamp")
    if where == "timestamp":
        return DecodeError("bad_timestamp", first["msg"])
    if kind == "recursion_loop" or "recursion" in kind:
        return DecodeError("too_deep", first["msg"])
    summary = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'record'}: {e['msg']}" for e in errors[:3]
    )
    return DecodeError("schema", summary)


_FREE_TYPED_FIELDS = ("features", "prediction", "values")


def _check_free_fields(record: Record, max_depth: int) -> DecodeError | None:
    """Reject NaN/inf and deep nesting in the fields pydantic does not type."""
    extra = record.__pydantic_extra__
    fields = record.__dict__  # plain dict access: pydantic's __getattr__ is slow for misses
    typed = [fields[name] for name in _FREE_TYPED_FIELDS if fields.get(name) is not None]
    if not extra and not typed:
        return None
    values: list[Any] = [*extra.values(), *typed] if extra else typed
    for value in values:
        if isinstance(value, float) and not math.isfinite(value):
            return DecodeError("non_finite", "NaN or infinity in a free-form field")
        if isinstance(value, Mapping | list):
            problem = _walk(value, 2, max_depth)
            if problem is not None:
                return problem
    return None


def _walk(value: Any, depth: int, max_depth: int) -> DecodeError | None:
    if depth > max_depth:
        return DecodeError("too_deep", f"nested deeper than {max_depth} levels")
    children = value.values() if isinstance(value, Mapping) else value
    for child in children:
        if isinstance(child, float) and not math.isfinite(child):
            return DecodeError("non_finite", "NaN or infinity in a free-form field")
        if isinstance(child, Mapping | list):
            problem = _walk(child, depth + 1, max_depth)
            if problem is not None:
                return problem
    return None
