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

from eventpulse.archive.layout import KindLayout
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


@pytest.mark.parametrize(("fields", "expected", "names"), [
    ({"user_id": "u\n", "tenant": 1.5}, "bad_key", "a fraction"),
    ({"user_id": "x" * 300, "tenant": [1]}, "bad_key", "a list"),
    ({"user_id": "u\n", "ctx": {"id": {}}}, "bad_key", "an object"),
    ({"user_id": "u\n", "tenant": "t"}, "key_control_char", "U+000A"),
    ({"user_id": "x" * 300, "tenant": "t"}, "key_too_long", "300 bytes"),
    ({"user_id": "u1", "tenant": 1.5}, "bad_key", "a fraction"),
])
def test_a_composite_part_that_is_no_id_is_the_refusal_whatever_the_plain_key(
        fields: dict[str, Any], expected: str, names: str) -> None:
    """Found by outside testing of the faster decoder: with a plain and a composite (or
    nested) key both bad, the refusal is the composite part's ``bad_key``, as it always was."""
    job = parse_config({"topics": {"events": "behaviour"}, "features": [
        {"name": name, "topic": "events", "entity": name, "key": key, "aggregation": "count",
         "window": {"size": "1m"}}
        for name, key in (("plain", "user_id"), ("pair", ["tenant", "user_id"]),
                          ("nested", ["ctx.id", "user_id"]))]})
    features = [CompiledFeature(spec, i) for i, spec in enumerate(job.features)]
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, keys=entity_key_reader(features, "events"))
    result = decoder.decode(event(**fields), NOW)
    assert isinstance(result, DecodeError) and result.reason == expected, result
    assert names in result.detail, result


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


# --- hostile values (issue 10, outside test): no record that decodes can stop the combiner,
# --- msgpack or a read; every refusal has a documented reason

#: numbers at and past every bound in the path: int64 (msgpack, Parquet), the float range, the
#: sketch's largest value, the timestamp's years 1-9999
EDGE_NUMBERS = [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1,
                123456789012345678901234567890, 10**400, -(10**400), 10**4000,
                1e300, -1e300, 1.0000000000000002e300, 1e301, 1.7976931348623157e308,
                -1.7976931348623157e308, 5e-324, 253_402_300_799_999, 253_402_300_800_000,
                -62_135_596_800_001]
hostile_scalars = (st.none() | st.booleans() | st.text(max_size=10) | st.sampled_from(EDGE_NUMBERS)
                   | st.integers(min_value=-(10**400), max_value=10**400)
                   | st.floats(allow_nan=True, allow_infinity=True))
hostile_values = st.recursive(
    hostile_scalars, lambda children: st.lists(children, max_size=3) | st.dictionaries(
        st.sampled_from(["a", "b", "x", ""]), children, max_size=3), max_leaves=8)

#: a job whose features read every field below as a key, a filter (every operator) or a value
HOSTILE_JOB = parse_config({"topics": {"inf": "inference"}, "features": [
    {"name": f"{agg}_{i}", "topic": "inf", "entity": "m", "key": key, "aggregation": agg,
     "window": {"size": "1m"}, **extra}
    for i, (agg, key, extra) in enumerate([
        ("count", "model", {"where": {"status": {"gte": 500}}}),
        ("count", "u", {"where": {"v": {"in": [1, "a", True]}}}),
        ("count", ["u", "ctx.org"], {"where": {"v.a": {"not_in": [1]}, "w": {"gt": 0}}}),
        ("ratio", "model", {"numerator": {"status": {"in": [500, 503]}, "v": {"exists": True}}}),
        ("sum", "model", {"value": "v", "where": {"w": {"lte": 10}}}),
        ("mean", "u", {"value": "w"}),
        ("min", "model", {"value": "ctx.x"}), ("max", "model", {"value": "v"}),
        ("last", "model", {"value": "v"}), ("last", "u", {"value": "ctx"}),
        ("distinct", "model", {"value": "v", "where": {"v": {"ne": 3}}}),
        ("p95", "model", {"value": "v"}), ("p50", "u", {"value": "latency_ms"}),
    ])]})
HOSTILE_FEATURES = [CompiledFeature(spec, i) for i, spec in enumerate(HOSTILE_JOB.features)]
hostile_decoder = RecordDecoder(RecordKind.INFERENCE, DecodeLimits(check_clock=False),
                                keys=entity_key_reader(HOSTILE_FEATURES, "inf"))


def documented_reasons() -> set[str]:
    """The reasons docs/configuration.md's "Dead letters" table lists (each with an example)."""
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    section = doc.split("### Dead letters", 1)[1].split("\n### ", 1)[0]
    return {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}


DOCUMENTED = documented_reasons()


ARCHIVE_LAYOUT = KindLayout(RecordKind.INFERENCE)


def decode_and_combine(record: dict[str, Any]) -> DecodeError | Record:
    """Decode; an accepted record must then combine, plan, pack for Lua, read back and fit
    the archive's columns."""
    import msgpack

    from eventpulse.tables import sketch
    from eventpulse.tables.batch import BatchCombiner

    raw = json.dumps(record).encode()  # allow_nan: NaN/Infinity literals are produced too
    result = hostile_decoder.decode(raw, NOW)
    if isinstance(result, DecodeError):
        assert result.reason in DOCUMENTED, result
        assert result.reason != "internal_error", result  # every case here has its own reason
        return result
    combiner = BatchCombiner("ep", HOSTILE_FEATURES, {"inf:0": None})
    assert combiner.add("inf:0", "inf", 0, result)
    plan = combiner.plan()
    groups = [group for piece in plan.all_slices for group in piece.groups]
    for piece in plan.all_slices:  # what each fenced script gets, packed for Lua
        msgpack.packb(piece.argv(plan.packed_features))
    ARCHIVE_LAYOUT.table([ARCHIVE_LAYOUT.row(result, 0, 0, NOW)])  # and the archive's Parquet
    for group in groups:
        for op in group[1:]:
            if HOSTILE_FEATURES[op[0] - 1].agg_code == 8:  # a sketch: reading it back must work
                for bins in op[3::2]:
                    sketch.quantile(list(zip(bins[::2], bins[1::2], strict=True)), 0.99)
    return result


INFERENCE_FIELDS = ["timestamp", "model", "latency_ms", "status", "u", "v", "w", "ctx",
                    "features", "prediction", "schema_version"]


@settings(max_examples=600, deadline=None)
@given(field=st.sampled_from(INFERENCE_FIELDS), value=hostile_values,
       nested=st.sampled_from([None, "a", "x", "org"]))
def test_hostile_values_in_any_field_are_combined_or_refused_with_a_documented_reason(
        field: str, value: Any, nested: str | None) -> None:
    record: dict[str, Any] = {"timestamp": NOW, "model": "m", "latency_ms": 5, "status": 500,
                              "u": "u1", "v": 2, "w": 1.5, "ctx": {"org": "o", "x": 1}}
    if nested is not None and field in ("v", "ctx"):
        record[field] = {nested: value}  # the dotted paths v.a, ctx.org, ctx.x
    else:
        record[field] = value
    decode_and_combine(record)


def inference(**fields: Any) -> dict[str, Any]:
    return {"timestamp": NOW, "model": "m", "latency_ms": 5, "status": 200, "u": "u1", **fields}


@pytest.mark.parametrize(("record", "expected"), [
    # F1: a timestamp beyond the float range (and beyond years 1-9999)
    ({"timestamp": -(10**400), "user_id": "x", "action": "click"}, "bad_timestamp"),
    ({"timestamp": 10**400, "user_id": "x", "action": "click"}, "bad_timestamp"),
    ({"timestamp": 1e300, "user_id": "x", "action": "click"}, "bad_timestamp"),
    ({"timestamp": 253_402_300_800_000, "user_id": "x", "action": "click"}, "bad_timestamp"),
    # before 1970: stored where no read reached them (the store takes 0 as "no event yet")
    ({"timestamp": -1, "user_id": "x", "action": "click"}, "bad_timestamp"),
    ({"timestamp": -100_000_000_001, "user_id": "x", "action": "click"}, "bad_timestamp"),
    ({"timestamp": "1969-12-31T23:59:59.999Z", "user_id": "x", "action": "click"},
     "bad_timestamp"),
    ({"timestamp": "0001-01-01T00:00:30Z", "user_id": "x", "action": "click"}, "bad_timestamp"),
    # a fraction of a millisecond before 1970, an offset carrying the time into year 10000
    ({"timestamp": -0.0004, "user_id": "x", "action": "click"}, "bad_timestamp"),
    ({"timestamp": "1969-12-31T23:59:59.9999Z", "user_id": "x", "action": "click"},
     "bad_timestamp"),
    ({"timestamp": "9999-12-31T22:00:00-02:00", "user_id": "x", "action": "click"},
     "bad_timestamp"),
    # F2: integers beyond the float range in a filtered or aggregated field
    (inference(status=10**400), "number_out_of_range"),
    (inference(v=10**400), "number_out_of_range"),
    (inference(latency_ms=10**400), "number_out_of_range"),
    (inference(prediction=[1, {"deep": -(10**30)}]), "number_out_of_range"),
    # F4: integers outside a signed 64-bit integer (msgpack's, Lua's and Parquet's range)
    (inference(v=123456789012345678901234567890), "number_out_of_range"),
    (inference(v=-9223372036854775809), "number_out_of_range"),
    (inference(v=2**63), "number_out_of_range"),
    (inference(status=2**64 - 1), "number_out_of_range"),
    # F5: floats whose sketch value overflows (past the 1e300 bound)
    (inference(v=1.7976931348623157e308), "number_out_of_range"),
    (inference(v=-1e301), "number_out_of_range"),
    # the canonical key text: lists, objects and floats are not ids
    (inference(u=[1, 2]), "bad_key"),
    (inference(u={"a": 1}), "bad_key"),
    (inference(u=1.5), "bad_key"),
    (inference(ctx={"org": [1]}), "bad_key"),
])
def test_outside_test_findings_are_refused_with_their_reason(record: dict[str, Any],
                                                             expected: str) -> None:
    decoder = behaviour if "user_id" in record else hostile_decoder
    result = decoder.decode(json.dumps(record).encode(), NOW)
    assert isinstance(result, DecodeError), result
    assert result.reason == expected, result
    assert expected in DOCUMENTED


def test_an_integer_of_thousands_of_digits_is_out_of_range_not_bad_json() -> None:
    raw = json.dumps(inference()).encode()[:-1] + b', "v": 1' + b"0" * 60_000 + b"}"
    assert reason(raw, hostile_decoder) == "number_out_of_range"


@pytest.mark.parametrize("record", [
    inference(v=2**63 - 1), inference(v=-(2**63)), inference(status=2**63 - 1),
    inference(v=1e300), inference(v=5e-324),
    inference(note="12345678901234567890123456 e+999"),  # digits in a string are no number
    inference(u=True), inference(u=7), inference(v=[1], ctx={"org": "o"}),
    inference(v={"a": [1]}),
])
def test_values_at_the_bounds_are_applied(record: dict[str, Any]) -> None:
    assert isinstance(decode_and_combine(record), Record)


def test_key_values_have_one_canonical_text() -> None:
    from eventpulse.tables.batch import BatchCombiner

    combiner = BatchCombiner("ep", HOSTILE_FEATURES, {"inf:0": None})
    for offset, (u, org) in enumerate([(True, "o"), (7, False), ("x", 12)]):
        result = hostile_decoder.decode(json.dumps(inference(u=u, w=1, ctx={"org": org})).encode(),
                                        NOW)
        assert isinstance(result, Record), result
        combiner.add("inf:0", "inf", offset, result)
    ids = {entity_id for shard in combiner.open for ops in (shard or ()) for entity_id in ops}
    assert {"true", "7", "x", "true|o", "7|false", "x|12"} <= ids, ids


def test_in_and_not_in_never_match_lists_or_objects() -> None:
    from eventpulse.tables.spec import compile_filter

    is_in = compile_filter({"v": {"in": [1, "a"]}})
    not_in = compile_filter({"v": {"not_in": [1, "a"]}})
    dotted = compile_filter({"v.a": {"in": [1]}})
    assert is_in is not None and not_in is not None and dotted is not None
    for value in ([1], {"a": 1}, [[1]]):
        assert not is_in({"v": value}) and not_in({"v": value})
        assert not dotted({"v": {"a": value}})
    assert is_in({"v": 1}) and not not_in({"v": "a"}) and dotted({"v": {"a": 1}})
    with pytest.raises(Exception, match="plain values"):
        parse_config({"topics": {"e": "behaviour"}, "features": [
            {"name": "n", "topic": "e", "entity": "u", "key": "user_id", "aggregation": "count",
             "where": {"v": {"in": [[1]]}}, "window": {"size": "1m"}}]})


def test_a_decoder_check_that_raises_becomes_internal_error() -> None:
    """The last guard: whatever a record's content makes a check raise is a refusal."""
    def broken(record: Record) -> list[object]:
        raise RuntimeError("a bug this record found")

    decoder = RecordDecoder(RecordKind.BEHAVIOUR, keys=broken)
    result = decoder.decode(event(), NOW)
    assert isinstance(result, DecodeError) and result.reason == "internal_error"
    assert "RuntimeError" in result.detail


@pytest.mark.parametrize("raw", [
    # found by the second outside test: each crashed the worker through the dead-letter path,
    # on a topic with a privacy policy, for good
    b'{"timestamp": 1, "user_id": "u", "action": "click", "x": ' + b"[" * 1000 + b"1"
    + b"]" * 1000 + b"}",
    b'{"timestamp": 1, "user_id": "u", "action": "view", "device_id": "\\udfff"}',
    b'{"timestamp": 1, "user_id": "u", "email": "' + "\udfff".encode("utf-8", "surrogatepass")
    + b'"}',
])
def test_a_refused_record_under_a_privacy_policy_always_makes_a_dead_letter(raw: bytes) -> None:
    from eventpulse.streams.deadletter import make_dead_letter
    from eventpulse.streams.privacy import Pseudonymiser

    privacy = Pseudonymiser(b"k", drop=["email"], hash_fields=["device_id"])
    decoder = RecordDecoder(RecordKind.BEHAVIOUR, DecodeLimits(check_clock=False), privacy)
    refused = decoder.decode(raw)
    assert isinstance(refused, DecodeError), refused
    letter = make_dead_letter(refused, raw, "events", 0, 7, privacy)
    assert letter.original_bytes == len(raw)
    # withheld or scrubbed, never the private field in clear
    assert letter.payload_b64 is None or b"device_id" not in raw or "udfff" not in str(letter)
    json.loads(letter.to_json())


def test_pseudonyms_hash_the_documented_key_text() -> None:
    from eventpulse.streams.privacy import Pseudonymiser

    privacy = Pseudonymiser(b"k", hash_fields=["device_id"])
    assert privacy.pseudonym(True) == privacy.pseudonym("true") != privacy.pseudonym("True")
    assert privacy.pseudonym(7) == privacy.pseudonym("7")
    assert privacy.pseudonym([1, 2]) == privacy.pseudonym([1, 2]) != privacy.pseudonym("[1, 2]")


def test_a_logged_read_holds_served_values_past_the_input_bound() -> None:
    """Found by an outside test: a read serving a sum of 9e301 (each input within 1e300) was
    refused when logged (``number_out_of_range``), and with it every feature of the read. A
    logged read's ``values`` hold any finite float; its extra fields, and every other kind's
    fields, keep the bound; a feature reading a nested value past it takes none."""
    now = int(time.time() * 1000)
    reads = RecordDecoder(RecordKind.FEATURE_READ)

    def read(value: Any, **extra: Any) -> bytes:
        return json.dumps({"timestamp": now, "entity": "user", "entity_id": "u1", "values": {
            "total": {"value": value, "status": "present"}}, **extra}).encode()

    decoded = reads.decode(read(9e301))
    assert not isinstance(decoded, DecodeError), decoded
    assert decoded.values["total"]["value"] == 9e301  # type: ignore[attr-defined]
    assert reads.decode(read(1.7976931348623157e308)).__class__ is not DecodeError
    for refused in (read(1.0, served_ms=9e301), read(float("inf"))):
        assert isinstance(reads.decode(refused), DecodeError)
    behaviour = RecordDecoder(RecordKind.BEHAVIOUR).decode(json.dumps(
        {"timestamp": now, "user_id": "u1", "action": "click", "meta": {"x": 9e301}}).encode())
    assert isinstance(behaviour, DecodeError) and behaviour.reason == "number_out_of_range"
    # a feature over the read log: the value past the inputs' bound is no value
    job = parse_config({"topics": {"reads": "feature_read"}, "features": [
        {"name": "served_total", "topic": "reads", "entity": "user", "key": "entity_id",
         "aggregation": "sum", "value": "values.total.value",
         "window": {"type": "tumbling", "size": "1m"}}]})
    feature = CompiledFeature(job.features[0], 0)
    assert feature.number({"values": {"total": {"value": 9e301}}}) is None
    assert feature.number({"values": {"total": {"value": 1e300}}}) == 1e300
