"""A training set split over processes (:mod:`eventpulse.offline.parallel`) is the one built in
one process, cell for cell, statuses and counts included: on the random archives of
test_training_equivalence (a partition joined mid-stream, late records, records the broker got
late, two key families of one entity type, a composite key, dense and sparse label moments)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import redis.asyncio as aioredis

from eventpulse.offline import parallel, training
from tests.test_training_equivalence import labels, random_case


@pytest.mark.parametrize(("seed", "settle_ms", "jobs"), [(5, 1_000, 3), (6, 0, 2), (4, 0, 2)])
async def test_shares_in_processes_give_what_one_process_gives(
        tmp_path: Path, redis_url: str, aredis: aioredis.Redis, seed: int, settle_ms: int,
        jobs: int) -> None:
    store, spec, chosen = random_case(tmp_path / "archive", seed)
    specs = list(spec.features)
    alone, alone_stats = await training.build(spec, store, chosen, specs, aredis,
                                              settle_ms=settle_ms)
    split, split_stats = await parallel.build(spec, store, chosen, specs, redis_url, jobs,
                                              settle_ms=settle_ms)
    assert len(parallel.shares(chosen, jobs)) == jobs == split_stats.processes
    assert split.to_pylist() == alone.to_pylist()
    assert (split_stats.events, split_stats.rows, split_stats.lag_sensitive,
            split_stats.order_dependent, split_stats.applied, split_stats.late) == (
        alone_stats.events, alone_stats.rows, alone_stats.lag_sensitive,
        alone_stats.order_dependent, alone_stats.applied, alone_stats.late)
    # the data exercised what it is meant to (partial: the partition joined mid-stream)
    statuses = set(alone.column("clicks__status").to_pylist()) | set(
        alone.column("watch_p95__status").to_pylist())
    assert {"present", "missing", "not_applicable"} <= statuses
    assert seed == 4 or "partial" in statuses
    assert settle_ms == 0 or alone_stats.lag_sensitive > 0
    # seed 4 draws ties between partitions: each share looks for its own entities' only
    assert seed != 4 or alone_stats.order_dependent > 0


def test_an_entity_is_in_one_share_and_every_row_in_some_share() -> None:
    rng = random.Random(7)
    chosen = labels(rng, 100_000, 200_000, 2_000)
    parts = parallel.shares(chosen, 4)
    assert sorted(row for part in parts for row in part) == list(range(2_000))
    owner: dict[tuple[str, str], int] = {}
    for k, part in enumerate(parts):
        for row in part:
            assert owner.setdefault((chosen.entities[row], chosen.ids[row]), k) == k
    assert parts == parallel.shares(chosen, 4)  # the same split every run
    # more processes than entities: no empty share
    one = training.labels_of(chosen.table.slice(0, 1))
    assert parallel.shares(one, 8) == [[0]]
    assert parallel.default_jobs() >= 1


def test_shares_even_out_the_records_to_replay() -> None:
    # one entity with as many records as a hundred others together: alone in its share, the
    # others spread evenly over the rest (a hash split ignores how much each one costs)
    ids = ["hot", *(f"u{i}" for i in range(100))]
    chosen = training.labels_of(pa.table({"entity": ["user"] * len(ids), "entity_id": ids,
                                          "timestamp": [1_000] * len(ids)}))
    counts = {("user", "hot"): 10_000, **{("user", f"u{i}"): 100 for i in range(100)}}
    table = pa.table({"entity": [e for e, _ in counts], "entity_id": [i for _, i in counts],
                      "records": list(counts.values())})
    parts = parallel.shares(chosen, 3, table)
    loads = sorted(sum(counts[("user", ids[row])] + parallel.ROW_WEIGHT for row in part)
                   for part in parts)
    assert [ids[row] for part in parts for row in part if len(part) == 1] == ["hot"]
    assert loads == [5_500, 5_500, 10_000 + parallel.ROW_WEIGHT]
    assert all(part == sorted(part) for part in parts)
    assert parts == parallel.shares(chosen, 3, table)  # the same split every run


def test_record_counts_are_the_archived_records_per_entity(tmp_path: Path) -> None:
    store, spec, _ = random_case(tmp_path / "archive", 8)
    specs = list(spec.features)
    archive = training.read_archive(spec, store, specs, 2**62)
    found = parallel.record_counts(spec, specs, archive)
    counts = {(e, i): n for e, i, n in zip(*(found.column(c).to_pylist() for c in (
        "entity", "entity_id", "records")), strict=True)}
    assert len(counts) == found.num_rows  # one row per entity
    expected: Counter[tuple[str, str]] = Counter()
    for _, _, rows, _ in archive:
        for row in rows.table.select(["user_id", "item_id", "session_id"]).to_pylist():
            expected[("item", row["item_id"])] += 1
            # two families key users: by user_id and by session_id, both replayed
            expected[("user", row["user_id"])] += 1
            if row["session_id"]:
                expected[("user", row["session_id"])] += 1
    assert counts == dict(expected)  # the composite-key family ("pair") is not counted
    assert sum(counts.values()) > 3_000


def test_a_shares_failure_is_raised_with_its_traceback_as_the_cause() -> None:
    import multiprocessing

    import pytest

    mine, theirs = multiprocessing.Pipe()
    theirs.send(("error", ValueError("bad value"), "Traceback (most recent call last):\n  ..."))
    with pytest.raises(ValueError, match="bad value") as raised:
        parallel._receive(mine, 2)
    assert isinstance(raised.value.__cause__, parallel.RemoteTraceback)
    assert "most recent call last" in str(raised.value.__cause__)
    theirs.close()
    with pytest.raises(training.TrainingSetError, match="stopped unexpectedly"):
        parallel._receive(mine, 2)


def test_shares_columns_join_as_one_list_of_the_values_would(tmp_path: Path) -> None:
    """Each share types its own values; joined, the column is what typing every value at once
    gives: one type taken as is, a share of nulls alone taking the others' type, and values
    typed differently by two shares (ints here, floats there; text here, numbers there) typed
    together, those of several types as JSON text."""
    rows = [[0, 3, 4], [1, 2]]
    per_share = {
        "count": ([5, 0, 2], [1, 7]),
        "none_here": ([None, None, None], [1.5, None]),
        "ints_and_floats": ([1, 2, 3], [0.5, 4.0]),
        "text_and_numbers": (["a", "b", None], [1, 2]),
        "mixed_in_one": ([1, "x", None], [2.0, None]),
        # objects of several shapes: arrow would give each the others' members, as nulls
        "objects_and_text": ([{"k": 1}, {"a": 2}, None], ["x", 3]),
        "objects_only": ([{"k": 1}, None, {"a": [1, {"b": None}]}], [{"k": 2, "z": "y"}, None]),
        "lists": ([[1, 2], [3], None], [[4], []]),
    }
    specs = [training.FeatureSpec.model_validate(
        {"name": name, "topic": "t", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "tumbling", "size": "1m"}})
        for name in per_share]
    shares = [training.typed_columns({name: (list(values[k]), ["present"] * len(values[k]))
                                      for name, values in per_share.items()})
              for k in range(2)]
    joined = parallel._join(specs, 5, rows, shares)
    labels = training.labels_of(pa.table({"entity": ["user"] * 5, "entity_id": list("abcde"),
                                          "timestamp": [1_000] * 5}))
    expected: training.Columns = {}
    for name, values in per_share.items():
        python: list[object] = [None] * 5
        for part, share_values in zip(rows, values, strict=True):
            for row, value in zip(part, share_values, strict=True):
                python[row] = value
        expected[name] = (python, ["present"] * 5)
    assert training.table_of(labels, specs, joined).equals(
        training.table_of(labels, specs, expected))
    table = training.table_of(labels, specs, joined)
    assert table.column("ints_and_floats").to_pylist() == [1.0, 0.5, 4.0, 2.0, 3.0]
    assert table.column("text_and_numbers").type == pa.string()
    assert table.column("none_here").to_pylist() == [None, 1.5, None, None, None]
    for name in ("objects_and_text", "objects_only"):  # JSON text of exactly what was served
        assert table.column(name).type == pa.string()
        assert [None if v is None else json.loads(v) for v in table.column(name).to_pylist()
                ] == expected[name][0]
    assert table.column("lists").to_pylist() == [[1, 2], [4], [], [3], None]
    # CSV holds no lists: a feature's lists are JSON text there
    training.write(table, tmp_path / "out.csv")
    text = pacsv.read_csv(tmp_path / "out.csv", convert_options=pacsv.ConvertOptions(
        column_types={"lists": pa.string()}, strings_can_be_null=True))
    assert text.column("lists").to_pylist() == ["[1, 2]", "[4]", "[]", "[3]", None]
