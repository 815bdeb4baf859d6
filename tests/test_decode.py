"""The decoder: every bad input has a reason, nothing raises, valid records keep unknown fields."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventpulse.config import parse_config
from eventpulse.streams.deadletter import (
    KAFKA_FRAMING_BYTES,
    MIN_DEAD_LETTER_BYTES,
    DeadLetter,
    make_dead_letter,
)
from eventpulse.streams.decode import DecodeError, DecodeLimits, RecordDecoder
from eventpulse.streams.privacy import Pseudonymiser
from eventpulse.streams.schemas import BehaviourEvent, InferenceLog, MetricSample, Record
from eventpulse.streams.tail import describe
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.spec import CompiledFeature, entity_key_reader

NOW = 1_790_000_000_000
behaviour = RecordDecoder(RecordKind.BEHAVIOUR)


def event(**fields: Any) -> bytes:
    base = {"timestamp": NOW - 1000, "user_id": "u1", "action": "click", "item_id": "i9"}
    base.update(fields)
    return json.dumps(base).encode()


def reason(raw: bytes | None, decoder: RecordDecoder = behaviour) -> str:
    result = decoder.decode(raw, NOW)
    assert isinstance(result, DecodeError), result
    return result.reason


def test_valid_event_keeps_extra_fields_and_normalises_time() -> None:
    record = behaviour.decode(event(timestamp="2026-09-21T14:13:19Z", watch_seconds=12.5,
                                    experiment={"arm": "b"}), NOW)
    assert isinstance(record, BehaviourEvent)
    assert record.timestamp == 1_789_999_999_000
    assert record.model_extra == {"watch_seconds": 12.5, "experiment": {"arm": "b"}}


@pytest.mark.parametrize(("value", "expected_ms"), [
    (1_789_999_000, 1_789_999_000_000),          # epoch seconds
    (1_789_999_000_123, 1_789_999_000_123),      # epoch milliseconds
    ("2026-09-21T14:10:00+02:00", 1_789_992_600_000),
])
def test_timestamp_forms(value: Any, expected_ms: int) -> None:
    record = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False)).decode(
        event(timestamp=value))
    assert isinstance(record, Record)
    assert record.timestamp == expected_ms


@pytest.mark.parametrize(("raw", "expected"), [
    (b"\xff\xfe{}", "not_utf8"),
    (b"{not json", "not_json"),
    (b"[1, 2]", "not_object"),
    (event(user_id=7), "schema"),
    (json.dumps({"user_id": "u", "action": "a"}).encode(), "missing_timestamp"),
    (event(timestamp="yesterday"), "bad_timestamp"),
    (event(timestamp=NOW - 30 * 86_400_000), "timestamp_too_old"),
    (event(timestamp=NOW + 86_400_000), "timestamp_in_future"),
    (event(score=float("nan")), "non_finite"),
    (event(nested={"a": {"b": [float("inf")]}}), "non_finite"),
    (event(deep=json.loads("[" * 20 + "]" * 20)), "too_deep"),
    (event(padding="x" * 70_000), "too_large"),
    (event(schema_version=9), "unsupported_schema_version"),
    (None, "empty"),
    (b"", "empty"),
    (b"[" * 5000 + b"]" * 5000, "too_deep"),  # past the JSON parser's own nesting bound
    (event(deep="D").replace(b'"D"', b"[" * 300 + b"]" * 300), "too_deep"),
])
def test_bad_input_has_a_reason(raw: bytes | None, expected: str) -> None:
    assert reason(raw) == expected


def test_inference_and_metric_contracts() -> None:
    inference = RecordDecoder(RecordKind.INFERENCE)
    ok = inference.decode(json.dumps({"timestamp": NOW, "model": "ranker", "latency_ms": 12.0,
                                      "status": 200, "features": {"x": 1}}).encode(), NOW)
    assert isinstance(ok, InferenceLog)
    assert reason(json.dumps({"timestamp": NOW, "model": "r", "latency_ms": -1, "status": 200}
                             ).encode(), inference) == "schema"
    metric = RecordDecoder(RecordKind.METRIC)
    sample = metric.decode(b'{"timestamp": %d, "name": "cpu", "value": 3, "labels": {"h": "a"}}'
                           % NOW, NOW)
    assert isinstance(sample, MetricSample) and sample.value == 3.0
    assert reason(b'{"timestamp": %d, "name": "cpu", "value": NaN}' % NOW, metric) == "non_finite"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    for kind in RecordKind:
        result = RecordDecoder(kind).decode(raw, NOW)
        assert isinstance(result, DecodeError | Record)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.text(max_size=5), children, max_size=3), max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(["timestamp", "user_id", "action", "item_id", "device", "extra",
                              "schema_version"]), value=json_values)
def test_mutated_valid_records_are_decoded_or_refused_with_a_reason(field: str, value: Any) -> None:
    base = json.loads(event())
    base[field] = value
    raw = json.dumps(base).encode()  # allow_nan: NaN/Infinity literals are produced too
    result = behaviour.decode(raw, NOW)
    if isinstance(result, DecodeError):
        assert result.reason and result.detail
    else:
        assert isinstance(result, BehaviourEvent)
        assert isinstance(result.timestamp, int)


def test_privacy_hashes_and_drops_before_anything_sees_the_record() -> None:
    policy = Pseudonymiser(b"k3y", drop=["email"], hash_fields=["user_id", "ip"])
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, pseudonymiser=policy)
    record = decoder.decode(event(email="a@b.c", ip="10.0.0.1"), NOW)
    assert isinstance(record, BehaviourEvent)
    assert record.user_id.startswith("h_") and record.user_id != "u1"
    assert record.user_id == decoder.decode(event(), NOW).user_id  # type: ignore[union-attr]
    assert "email" not in (record.model_extra or {})
    assert (record.model_extra or {})["ip"].startswith("h_")
    assert "k3y" not in repr(policy)
    # a refused record is scrubbed too before it becomes a dead letter
    bad = event(email="a@b.c", timestamp="never")
    letter = make_dead_letter(DecodeError("bad_timestamp", "x"), bad, "events", 1, 7, policy)
    payload = json.loads(letter.payload() or b"{}")
    assert "email" not in payload and payload["user_id"].startswith("h_")
    letter = make_dead_letter(DecodeError("not_json", "x"), b"{user u1 a@b.c", "events", 1, 8,
                              policy)
    assert letter.payload() is None and "withheld" in letter.payload_note


def test_dead_letter_round_trip_keeps_original_bytes() -> None:
    raw = b"\xff not json"
    letter = make_dead_letter(DecodeError("not_utf8", "x"), raw, "events", 3, 42)
    again = DeadLetter.from_json(letter.to_json())
    assert again.payload() == raw and (again.topic, again.partition, again.offset) == (
        "events", 3, 42)
    assert again.refused_at_ms <= time.time() * 1000


def keyed(max_key_bytes: int = 256, key: str | list[str] = "user_id") -> RecordDecoder:
    """A behaviour decoder with the key check a job with one per-user feature gets."""
    job = parse_config({"topics": {"events": "behaviour"}, "features": [
        {"name": "n", "topic": "events", "entity": "user", "key": key, "aggregation": "count",
         "window": {"size": "1m"}}]})
    features = [CompiledFeature(spec, i) for i, spec in enumerate(job.features)]
    return RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(max_key_bytes=max_key_bytes),
                         keys=entity_key_reader(features, "events"))


@pytest.mark.parametrize(("fields", "expected"), [
    ({"user_id": "u" * 257}, "key_too_long"),
    ({"user_id": "é" * 129}, "key_too_long"),  # 258 UTF-8 bytes
    ({"user_id": "u\n1"}, "key_control_char"),
    ({"user_id": "u\x00"}, "key_control_char"),
    ({"user_id": "u\x85"}, "key_control_char"),  # C1 control (NEL)
    ({"user_id": "u\x7f"}, "key_control_char"),
])
def test_entity_keys_are_bounded_and_printable(fields: dict[str, Any], expected: str) -> None:
    assert reason(event(**fields), keyed()) == expected


def test_key_limits_apply_to_composite_keys_and_spare_other_fields() -> None:
    composite = keyed(64, ["user_id", "device"])
    assert isinstance(composite.decode(event(user_id="u" * 40, device="d" * 23), NOW), Record)
    assert reason(event(user_id="u" * 40, device="d" * 24), composite) == "key_too_long"
    # a key in an unknown (extra) field, and a nested one
    assert reason(event(tenant="t" * 65), keyed(64, "tenant")) == "key_too_long"
    assert reason(event(ctx={"org": "o\tx"}), keyed(64, ["user_id", "ctx.org"])) == \
        "key_control_char"
    assert isinstance(keyed(64, "tenant").decode(event(), NOW), Record)  # no such field: no key
    # a field no feature keys on may be long or hold newlines
    assert isinstance(keyed().decode(event(item_id="i" * 5000, note="a\nb"), NOW), Record)
    assert isinstance(keyed().decode(event(user_id="u" * 256), NOW), Record)
    # the limit is configured per job, and a tiny one is refused at start-up
    assert parse_config({"limits": {"max_key_bytes": 1000}}).limits.max_key_bytes == 1000
    with pytest.raises(Exception, match="max_key_bytes"):
        parse_config({"limits": {"max_key_bytes": 0}})


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=700))
def test_any_key_is_accepted_only_within_the_limit_and_printable(key: str) -> None:
    result = keyed(300).decode(event(user_id=key), NOW)
    size = len(key.encode("utf-8", "surrogatepass"))
    if isinstance(result, DecodeError):
        assert result.reason in {"key_too_long", "key_control_char", "schema"}
        if result.reason == "key_too_long":
            assert size > 300
        if result.reason == "schema":
            assert key == ""  # user_id has min_length 1
    else:
        assert size <= 300 and all(not (ord(c) < 32 or 0x7F <= ord(c) <= 0x9F) for c in key)


def check_bounded(raw: bytes, limit: int) -> DeadLetter:
    """The letter of ``raw`` cut to ``limit``: fits, says so, and describes the whole payload."""
    letter = make_dead_letter(DecodeError("too_large", "big"), raw, "events", 2, 77)
    bounded = letter.bounded(limit)
    encoded = bounded.to_json()
    assert len(encoded) + KAFKA_FRAMING_BYTES <= limit
    again = DeadLetter.from_json(encoded)
    assert again.original_bytes == again.payload_bytes == len(raw)
    assert again.payload_sha256 == hashlib.sha256(raw).hexdigest()
    kept = again.payload()
    assert kept is not None and raw.startswith(kept)
    assert again.payload_truncated == (kept != raw)
    if again.payload_truncated:
        assert "truncated" in again.payload_note
        # the cut keeps nearly all the room there is: within one base64 quantum of the bound
        assert limit - KAFKA_FRAMING_BYTES - len(encoded) < 8
    return again


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=0, max_value=3_000_000),
       limit=st.integers(min_value=MIN_DEAD_LETTER_BYTES, max_value=1_048_588))
def test_dead_letters_fit_any_limit_whatever_the_record_size(size: int, limit: int) -> None:
    check_bounded(bytes(range(256)) * (size // 256) + b"x" * (size % 256), limit)


@pytest.mark.parametrize("size", [1_500_000, 5_000_000, 20_000_000])
def test_records_past_the_broker_limit_become_truncated_letters(size: int) -> None:
    letter = check_bounded(b"{" + b"9" * (size - 1), 1_048_576)
    assert letter.payload_truncated and letter.reason == "too_large"
    assert f"payload truncated: {size} bytes, sha256 {letter.payload_sha256}" in describe(letter)


def test_a_letter_that_fits_is_kept_whole() -> None:
    letter = check_bounded(b"x" * 1000, 1_048_576)
    assert not letter.payload_truncated and letter.payload_note == "original bytes"
    assert base64.b64decode(letter.payload_b64 or "") == b"x" * 1000
    # a tombstone has nothing to hash
    empty = make_dead_letter(DecodeError("empty", "x"), None, "events", 0, 1)
    assert empty.payload_sha256 is None and empty.original_bytes is None
    # letters written before these fields existed still read
    old = b'{"reason":"x","detail":"d","topic":"t","partition":0,"offset":1,' \
          b'"refused_at_ms":1,"payload_b64":null,"payload_note":"n"}'
    assert DeadLetter.from_json(old).payload_truncated is False
