"""Bytes from Kafka -> a validated record, or a reason why not.

The decoder never raises for bad input: a producer bug must cost one dead letter, not the worker.
The happy path is one call into pydantic-core's JSON parser and validator (no ``json.loads`` and
then a second pass); the checks that pydantic cannot express (size, nesting, non-finite numbers in
free-form fields, clock sanity) run only where they can matter.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from eventpulse.streams.entitykey import BadKey, key_text
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
    #: longest entity key (UTF-8 bytes): a key becomes part of a Redis key name
    max_key_bytes: int = 256


#: Entity ids of a record, one per feature key on its topic (None: not about such an entity).
KeyReader = Callable[[Record], Iterable[object]]


@dataclass(frozen=True, slots=True)
class EntityKeys:
    """Where the features of a topic find a record's entity ids, so that the decoder can check
    them: top-level fields, read straight off the record (the usual key: ``user_id``), and a
    reader of the others (composite and nested keys), if any."""

    fields: tuple[str, ...] = ()
    others: KeyReader | None = None


#: The numbers a record may hold anywhere (typed, free-form or nested fields): integers that fit
#: a signed 64-bit integer (what msgpack, Lua's cmsgpack, Redis and the archive's int64 Parquet
#: columns all carry) and floats of magnitude up to 1e300 (sums, means and percentile sketches
#: of larger ones overflow). Anything else is refused with reason ``number_out_of_range``.
MIN_INT = -(2**63)
MAX_INT = 2**63 - 1
MAX_FLOAT = 1e300
#: ... but a logged read (``feature_read``) holds values the worker served, which sums and
#: means of numbers within MAX_FLOAT can take beyond it (found by an outside test: a read
#: serving 9e301 was refused, and with it every feature of the read): any finite float there
SERVED_MAX_FLOAT = sys.float_info.max


#: C0 controls, DEL and C1 controls: invisible in logs and CLIs, and never part of a real id.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def check_key(key: str, max_bytes: int) -> DecodeError | None:
    """The one rule for entity ids: bounded and printable (it ends up inside a Redis key)."""
    size = len(key) if key.isascii() else len(key.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return DecodeError("key_too_long", f"entity key of {size} bytes is over the "
                           f"{max_bytes}-byte limit (limits.max_key_bytes)")
    found = _CONTROL.search(key)
    if found is not None:
        return DecodeError("key_control_char", f"entity key has control character "
                           f"U+{ord(found.group()):04X} at position {found.start()}")
    return None


class RecordDecoder:
    """Decodes one topic's records into its pydantic model."""

    def __init__(
        self,
        kind: RecordKind,
        limits: DecodeLimits | None = None,
        pseudonymiser: Pseudonymiser | None = None,
        keys: EntityKeys | KeyReader | None = None,
    ) -> None:
        self.kind = kind
        self.model = SCHEMAS[kind]
        #: the model's typed int/float fields: checked against the number bounds
        self.numeric = tuple(name for name, info in self.model.model_fields.items()
                             if info.annotation in (int, float)
                             and name not in ("schema_version", "timestamp"))
        self.limits = limits or DecodeLimits()
        #: pydantic-core's parser and validator, called without ``model_validate_json``'s
        #: Python-level wrapper (the same call with the same defaults: one less frame per record)
        self._validate_json = self.model.__pydantic_validator__.validate_json
        #: the free-form typed fields (``_FREE_TYPED_FIELDS``) this model has at all
        self.free_typed = tuple(name for name in _FREE_TYPED_FIELDS
                                if name in self.model.model_fields)
        #: the float bound of free-form fields (:data:`SERVED_MAX_FLOAT` in logged reads)
        self.max_float = SERVED_MAX_FLOAT if kind is RecordKind.FEATURE_READ else MAX_FLOAT
        self.pseudonymiser = pseudonymiser
        #: the entity ids the features of this topic will key on (checked after privacy)
        if not isinstance(keys, EntityKeys):
            keys = EntityKeys(others=keys)
        self.keys = keys

    def decode(self, raw: bytes | None, now_ms: int | None = None) -> Record | DecodeError:
        """The record, or why it is refused. Never raises: whatever a record's own content
        makes a check raise becomes a refusal (``internal_error``) rather than a stopped
        partition.

        This runs for every record, and what it checks after pydantic-core's validation once
        cost as much as the validation itself: one frame, the record's dict read directly
        (pydantic's attribute access goes through its class), and the usual entity id (short
        printable ASCII) checked inline."""
        limits, keys = self.limits, self.keys
        try:
            if not raw:
                return DecodeError("empty", "record has no value (tombstone)" if raw is None
                                   else "record value is zero bytes")
            if len(raw) > limits.max_bytes:
                return DecodeError("too_large",
                                   f"{len(raw)} bytes is over the {limits.max_bytes} limit")
            try:
                record: Record = self._validate_json(raw)
            except ValidationError as exc:
                return _explain(exc, raw)
            fields = record.__dict__
            version = fields["schema_version"]
            if version not in SUPPORTED_SCHEMA_VERSIONS:
                return DecodeError(
                    "unsupported_schema_version",
                    f"schema_version {version} is not one of "
                    f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}",
                )
            if self.numeric:  # typed number fields pydantic does not bound (status, latency_ms)
                for name in self.numeric:
                    problem = _check_number(fields[name], name)
                    if problem is not None:
                        return problem
            if record.__pydantic_extra__ or self.free_typed:  # most records have neither
                problem = _check_free_fields(record, limits.max_depth, self.free_typed,
                                             self.max_float)
                if problem is not None:
                    return problem
            if limits.check_clock:
                timestamp = fields["timestamp"]
                now = int(time.time() * 1000) if now_ms is None else now_ms
                if timestamp < now - limits.max_past_ms:
                    return DecodeError("timestamp_too_old",
                                       "timestamp is older than the accepted past")
                if timestamp > now + limits.max_future_ms:
                    return DecodeError("timestamp_in_future",
                                       "timestamp is too far in the future")
            if self.pseudonymiser is not None:
                self.pseudonymiser.apply(record)
            # composite and nested keys are read first: a part that is not an id is the
            # refusal, whatever the other keys hold (as when every key was read, then checked)
            others: Iterable[object] = ()
            if keys.others is not None:
                try:
                    others = list(keys.others(record))
                except BadKey as exc:
                    return DecodeError("bad_key", str(exc))
            if keys.fields:
                extra = record.__pydantic_extra__
                for name in keys.fields:
                    key = fields[name] if name in fields else extra.get(name) if extra else None
                    # the usual id: short printable ASCII (no controls, 1 byte per character)
                    if key is None or (key.__class__ is str and len(key) <= limits.max_key_bytes
                                       and key.isascii() and key.isprintable()):
                        continue
                    problem = self._check_key(key)
                    if problem is not None:
                        return problem
            for key in others:
                if key is not None:
                    problem = self._check_key(key)
                    if problem is not None:
                        return problem
            return record
        except Exception as exc:  # the last guard: one record, one dead letter
            return DecodeError("internal_error", f"{type(exc).__name__} while decoding: "
                               f"{str(exc)[:300]}")

    def _check_key(self, key: object) -> DecodeError | None:
        """The key rule (:func:`check_key`) for any key value: its canonical text."""
        try:
            text = key if key.__class__ is str else key_text(key)
        except BadKey as exc:
            return DecodeError("bad_key", str(exc))
        return check_key(text, self.limits.max_key_bytes)


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
        if "number out of range" in first["msg"]:
            # an integer of thousands of digits: the parser's own bound, before ours
            return DecodeError("number_out_of_range", first["msg"])
        if "recursion limit" in first["msg"]:
            # the JSON parser's own nesting bound (about 200 levels) is hit before ours
            return DecodeError("too_deep", f"nested too deep for the JSON parser: {first['msg']}")
        return DecodeError("not_json", first["msg"])
    if kind == "model_type":
        return DecodeError("not_object", "a record must be a JSON object")
    if kind == "finite_number" and isinstance(
            exc.errors(include_url=False)[0].get("input"), int):
        return DecodeError("number_out_of_range", f"{where}: integer beyond the float range")
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


def _check_number(value: Any, where: str, max_float: float = MAX_FLOAT) -> DecodeError | None:
    """The number bounds (MIN_INT..MAX_INT, |float| <= ``max_float``, finite) for one value;
    None for a value in bounds or not a number."""
    kind = value.__class__
    if kind is float:
        if -max_float <= value <= max_float:  # False for NaN and infinities too
            return None
        if not math.isfinite(value):
            return DecodeError("non_finite", f"{where}: NaN or infinity")
        # (only MAX_FLOAT's bound can be passed by a finite float: SERVED_MAX_FLOAT is the
        # largest there is)
        return DecodeError("number_out_of_range",
                           f"{where}: {value!r} is beyond the accepted magnitude 1e300")
    if kind is int and not MIN_INT <= value <= MAX_INT:
        return DecodeError("number_out_of_range", f"{where}: integer of {value.bit_length()} "
                           "bits is outside the 64-bit range")
    return None


def _check_free_fields(record: Record, max_depth: int,
                       free_typed: tuple[str, ...] = _FREE_TYPED_FIELDS,
                       max_float: float = MAX_FLOAT) -> DecodeError | None:
    """Reject NaN/inf, numbers out of bounds and deep nesting in the fields pydantic does not
    type (walked only when a record has such fields: most records return at once);
    ``free_typed``: which of ``_FREE_TYPED_FIELDS`` the record's model has; ``max_float``: their
    float bound (extra fields keep :data:`MAX_FLOAT`)."""
    extra = record.__pydantic_extra__
    if extra and not free_typed:  # a behaviour event's extra fields: mostly flat and in bounds
        for value in extra.values():
            kind = value.__class__
            if not (kind is str or (kind is float and -MAX_FLOAT <= value <= MAX_FLOAT)
                    or (kind is int and MIN_INT <= value <= MAX_INT)):
                break  # the walk below says what is wrong with it, if anything
        else:
            return None
    fields = record.__dict__  # plain dict access: pydantic's __getattr__ is slow for misses
    typed = [name for name in free_typed if fields.get(name) is not None]
    if not extra and not typed:
        return None
    items: list[tuple[str, Any]] = [*extra.items()] if extra else []
    items += [(name, fields[name]) for name in typed]
    for name, value in items:
        bound = max_float if name in free_typed else MAX_FLOAT  # extra fields: MAX_FLOAT
        if value.__class__ is float or value.__class__ is int:
            problem = _check_number(value, name, bound)
            if problem is not None:
                return problem
        elif isinstance(value, Mapping | list):
            problem = _walk(value, 2, max_depth, name, bound)
            if problem is not None:
                return problem
    return None


def _walk(value: Any, depth: int, max_depth: int, where: str,
          max_float: float = MAX_FLOAT) -> DecodeError | None:
    if depth > max_depth:
        return DecodeError("too_deep", f"nested deeper than {max_depth} levels")
    children = value.values() if isinstance(value, Mapping) else value
    for child in children:
        if child.__class__ is float or child.__class__ is int:
            problem = _check_number(child, f"in {where}", max_float)
            if problem is not None:
                return problem
        elif isinstance(child, Mapping | list):
            problem = _walk(child, depth + 1, max_depth, where, max_float)
            if problem is not None:
                return problem
    return None
