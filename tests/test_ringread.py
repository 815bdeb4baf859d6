"""The compiled read loop (``_ringread.pyx``) against its Python twin, on random entries.

Reads go through the compiled twin wherever ``pip install`` found a C compiler; every other test
of reads exercises it against real Redis. These hold it to the Python reference on inputs real
Redis rarely shows: every window position, empty slots, foreign keys, broken maps and entries.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eventpulse.config import parse_config
from eventpulse.tables import ring, ringread
from eventpulse.tables.client import FeatureValue, _Feature

STEP = 60_000
SIZE = 5 * STEP
SLOTS = 7
NOW = 1_800_000_000_000
KINDS = ["I", "F", "M", "R", "<", ">"]


AGGREGATIONS = {"I": "count", "F": "sum", "M": "mean", "R": "ratio", "<": "min", ">": "max",
                "L": "last"}


def feature(name: str, kind: str, end: int, max_age: str | None = None) -> Any:
    """The ringread.RingRead a client read makes of a feature of this kind, at ``end``."""
    declared: dict[str, Any] = {
        "name": name, "topic": "events", "entity": "user", "key": "user_id",
        "aggregation": AGGREGATIONS[kind], "max_age": max_age,
        "window": {"type": "hopping", "size": "5m", "step": "1m", "lateness": "30s"}}
    if kind == "R":
        declared["numerator"] = {"action": "click"}
    elif kind != "I":
        declared["value"] = "watch"
    config = parse_config({"topics": {"events": "behaviour"}, "features": [declared]})
    return _Feature(config.features[0], end)


def entry(kind: str, newest: int, head: int, slots: list[float]) -> bytes:
    header = ring.HEADER.pack(STEP, kind.encode(), newest, head, 3_600_000)
    if kind == "L":
        return header + msgpack.packb(slots)
    return header + struct.pack(f"<{len(slots)}d", *slots)


counts = st.integers(0, 10_000).map(float)
numbers = st.floats(allow_nan=False, allow_infinity=False, width=64)
heads = st.integers(-3, 12).map(lambda k: NOW - NOW % STEP + k * STEP)


@st.composite
def ring_entries(draw: Any, kind: str) -> bytes:
    head = draw(heads)
    newest = head - draw(st.integers(1, STEP))
    if kind in ("I",):
        slots = draw(st.lists(counts, min_size=SLOTS, max_size=SLOTS))
    elif kind == "F":
        slots = draw(st.lists(numbers, min_size=SLOTS, max_size=SLOTS))
    else:  # pairs: (sum, events) for M and R, (events, extreme) for < and >
        pairs = draw(st.lists(st.tuples(numbers, counts), min_size=SLOTS, max_size=SLOTS))
        slots = [x for a, b in pairs for x in ((a, b) if kind in "MR" else (b, a))]
    # now and then a broken one: cut short, another signature, another window, a count or an
    # event time eventpulse would not write
    damage = draw(st.sampled_from(["none"] * 6 + ["cut", "kind", "step", "short", "count",
                                                  "time"]))
    if damage == "count" and kind != "F":
        slot = draw(st.integers(0, SLOTS - 1))
        at = slot if kind == "I" else 2 * slot + (1 if kind in "MR" else 0)
        slots[at] = draw(st.sampled_from([float("nan"), float("inf"), -1.0, 2.0**53, 2.0**63]))
    elif damage == "time":
        extreme = draw(st.sampled_from([2**53, -(2**53), 2**53 - 1, 2**62, -(2**63)]))
        newest, head = (extreme, head) if draw(st.booleans()) else (newest, extreme)
    raw = entry(kind, newest, head, slots)
    if damage == "cut":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif damage == "kind":
        raw = raw[:8] + b"?" + raw[9:]
    elif damage == "step":
        raw = struct.pack("<q", STEP * 2) + raw[8:]
    elif damage == "short":
        raw = raw[: ring.HEADER.size + 8]
    return raw


last_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), numbers, st.text(max_size=40),
    st.binary(max_size=20), st.lists(st.integers(-9, 9), max_size=3))  # lists: left to msgpack


@st.composite
def last_entries(draw: Any) -> bytes:
    head = draw(heads)
    newest = head - draw(st.integers(1, STEP))
    times = st.one_of(st.just(0), st.integers(1, 2**62), st.just(0.0), st.floats(1, 2**50))
    slots = [x for _ in range(SLOTS) for x in (draw(times), draw(last_values))]
    damage = draw(st.sampled_from(["none"] * 6 + ["cut", "utf8", "garbage", "time"]))
    if damage == "time":
        head = draw(st.sampled_from([2**53, -(2**53), 2**62]))
    raw = entry("L", newest, head, slots)
    if damage == "cut":
        raw = raw[: draw(st.integers(ring.HEADER.size, len(raw) - 1))]
    elif damage == "utf8":
        raw = raw[: ring.HEADER.size] + msgpack.packb([1, b"x"])[:-2] + b"\xa1\xff"
    elif damage == "garbage":
        raw = raw[: ring.HEADER.size] + draw(st.binary(max_size=30))
    return raw


@st.composite
def replies(draw: Any, kinds: list[str]) -> list[bytes | None]:
    """MGET replies for entities holding some of the features, as the writer leaves them,
    with now and then a key that is not eventpulse's."""
    out: list[bytes | None] = []
    for _ in range(draw(st.integers(0, 12))):
        shape = draw(st.sampled_from(["map"] * 8 + ["none", "garbage", "foreign", "trailing"]))
        if shape == "none":
            out.append(None)
            continue
        if shape == "garbage":
            out.append(draw(st.binary(max_size=40)))
            continue
        fields: dict[Any, Any] = {}
        for i, kind in enumerate(kinds):
            if draw(st.booleans()):
                fields[f"f{i}".encode()] = draw(
                    last_entries() if kind == "L" else ring_entries(kind))
        if draw(st.booleans()):
            fields[b"other"] = b"x" * draw(st.integers(0, 300))
        if shape == "foreign":
            fields[draw(st.sampled_from([b"f0", b"zz"]))] = draw(
                st.one_of(st.integers(-9, 9), st.lists(st.integers(-9, 9), max_size=2), st.none()))
        # str keys and values, as Lua's cmsgpack writes them, or bin, as Python's msgpack does
        raw = msgpack.packb(fields, use_bin_type=draw(st.booleans()))
        out.append(raw + (b"\x00" if shape == "trailing" else b""))
    return out


def read_both(kinds: list[str], raws: list[bytes | None], end: int, at: int,
              max_age: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    keys = [f"f{i}".encode() for i in range(len(kinds))]
    results = []
    for entries_type, reader in (
            (ringread.EntityEntriesPython, ringread.read_column_python),
            (ringread.EntityEntries, ringread.read_column)):
        entries = entries_type(raws, keys)
        rows: list[dict[str, Any]] = [{} for _ in raws]
        for k, kind in enumerate(kinds):
            reader(FeatureValue, feature(f"f{k}", kind, end, max_age), entries, k, rows, at,
                   "present")
        results.append(rows)
    return results[0], results[1]


def test_the_compiled_reader_is_the_one_that_runs() -> None:
    assert ringread.ACCELERATED, (
        "eventpulse.tables._ringread is not built: reads fall back to Python. Install a C "
        "compiler and the Python headers, then `pip install -e .` again.")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from([*KINDS, "L"]), min_size=1, max_size=4), data=st.data(),
       end_step=st.integers(-4, 14), age=st.integers(-STEP, 30 * STEP),
       max_age=st.sampled_from([None, "1m", "1ms"]))
def test_compiled_and_python_reads_agree(kinds: list[str], data: Any, end_step: int, age: int,
                                         max_age: str | None) -> None:
    raws = data.draw(replies(kinds))
    end = NOW - NOW % STEP + end_step * STEP
    python, compiled = read_both(kinds, raws, end, end + age, max_age)
    assert compiled == python
    for p_row, c_row in zip(python, compiled, strict=True):
        for name in p_row:  # equal values of equal types (1 == 1.0 == True in Python)
            assert [type(x) for x in c_row[name]] == [type(x) for x in p_row[name]]
            assert type(c_row[name]) is FeatureValue


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_compiled_and_python_entries_agree(data: Any) -> None:
    kinds = data.draw(st.lists(st.sampled_from([*KINDS, "L"]), min_size=1, max_size=3))
    raws = data.draw(replies(kinds))
    keys = [f"f{i}".encode() for i in range(len(kinds))] + [b"other", b"zz"]
    python = ringread.EntityEntriesPython(raws, keys)
    compiled = ringread.EntityEntries(raws, keys)
    for i in range(len(raws)):
        for k in range(len(keys)):
            assert compiled.entry(i, k) == python.entry(i, k)


def test_a_duplicated_key_reads_its_last_value_as_msgpack_does() -> None:
    # a map with a key twice: msgpack keeps the last, and so must the compiled walk
    first, second = entry("I", NOW, NOW, [1.0] * SLOTS), entry("I", NOW, NOW, [2.0] * SLOTS)
    raw = b"\x82" + msgpack.packb(b"f0") + msgpack.packb(first) + msgpack.packb(b"f0") + \
        msgpack.packb(second)
    assert msgpack.unpackb(raw)[b"f0"] == second
    assert ringread.EntityEntries([raw], [b"f0"]).entry(0, 0) == second
    assert ringread.EntityEntriesPython([raw], [b"f0"]).entry(0, 0) == second


def test_values_of_atomic_types_are_left_to_reference_counting() -> None:
    import gc

    raws = [msgpack.packb({b"f0": entry("I", NOW, NOW, [3.0] * SLOTS),
                           b"f1": entry("L", NOW, NOW, [NOW, [1, 2]] * SLOTS)})]
    entries = ringread.EntityEntries(raws, [b"f0", b"f1"])
    rows: list[dict[str, Any]] = [{}]
    for k, kind in enumerate("IL"):
        ringread.read_column(FeatureValue, feature(f"f{k}", kind, NOW), entries, k, rows, NOW,
                             "present")
    assert rows[0]["f0"].value == 3 and not gc.is_tracked(rows[0]["f0"])
    # a value that holds other objects stays tracked: it could be part of a cycle
    assert rows[0]["f1"].value == [1, 2] and gc.is_tracked(rows[0]["f1"])


def _outcome(read: Any, replies: list[Any], q: float) -> Any:
    """What a quantile read gives, or the kind of error it raises (the client reads those as a
    missing value)."""
    try:
        return read(replies, q)
    except Exception as exc:  # the type is what is compared
        return type(exc)


#: bucket hash fields: what eventpulse writes (bin keys, the zero bin, negatives) and what
#: something else might have (junk, unicode, numbers Python's int reads but C does not)
_FIELDS = st.one_of(
    st.integers(-600, 600).map(lambda k: str(k).encode()),
    st.integers(-600, 600).map(lambda k: b"n" + str(k).encode()),
    st.just(b"z"), st.just(b"05"), st.just(b"-0"), st.just(b"+7"), st.just(b" 3"), st.just(b"1_0"),
    st.just(b"n"), st.just(b""), st.just(b"x"), st.just(b"\xff"), st.just("3"),
    st.just(b"9" * 19), st.just(b"n" + b"1" * 20))
#: counts: what HINCRBY leaves (also 0 and negative) and what it never does
_COUNTS = st.one_of(
    st.integers(-3, 1000).map(lambda c: str(c).encode()),
    st.just(str(2**62).encode()), st.just(str(2**53).encode()), st.just(b"1e3"), st.just(b"x"),
    st.just(b"+2"), st.just(b" 4"), st.just(5))


@settings(max_examples=600, deadline=None)
@given(replies=st.lists(st.one_of(
    st.dictionaries(_FIELDS, _COUNTS, max_size=12),  # RESP3: a map
    st.lists(st.tuples(_FIELDS, _COUNTS), max_size=12).map(  # RESP2: field, count, ...
        lambda pairs: [x for pair in pairs for x in pair]),
    st.lists(_COUNTS, max_size=3),  # an odd array, or one of counts only
    st.just(b"not a hash")), max_size=6),
       q=st.sampled_from([0.0, 0.5, 0.9, 0.95, 0.99, 1.0]))
def test_compiled_and_python_quantile_bins_agree(replies: list[Any], q: float) -> None:
    assert _outcome(ringread.quantile_bin, replies, q) == _outcome(
        ringread.quantile_bin_python, replies, q)


def test_a_percentile_read_merges_the_buckets_as_ddsketch_would() -> None:
    from ddsketch import DDSketch

    from eventpulse.tables import sketch

    values = [0.0, -2.5, 0.001, 3.0, 7.5, 7.5, 120.0, 1e6, -1e-4]
    buckets: list[dict[bytes, bytes]] = [{}, {}]
    for n, value in enumerate(values):
        field = sketch.bin_of(value).encode()
        bins = buckets[n % 2]
        bins[field] = str(int(bins.get(field, b"0")) + 1).encode()
    reference = DDSketch(sketch.RELATIVE_ACCURACY)
    for value in values:
        reference.add(value)
    for q in (0.0, 0.25, 0.5, 0.75, 0.95, 1.0):
        found = ringread.quantile_bin(buckets, q)
        assert found is not None
        assert sketch.bin_value(*found) == pytest.approx(reference.get_quantile_value(q),
                                                         rel=1e-12)
