"""The decoder: every bad input has a reason, nothing raises, valid records keep unknown fields."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventpulse.streams.deadletter import DeadLetter, make_dead_letter
from eventpulse.streams.decode import DecodeError, DecodeLimits, RecordDecoder
from eventpulse.streams.privacy import Pseudonymiser
from eventpulse.streams.schemas import BehaviourEvent, InferenceLog, MetricSample, Record
from eventpulse.streams.topics import RecordKind

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
