"""``eventpulse training-set`` end to end on a small archive written with the archive's writer:
CSV labels in, parquet out, values as the worker's code computes them; bad input refused
clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis.asyncio as aioredis
import yaml
from click.testing import CliRunner

from eventpulse.archive.layout import KindLayout, cut_path, data_name, encode_cut
from eventpulse.archive.segment import CutRules, PartitionSegmenter, Segment
from eventpulse.archive.store import ArchiveStore
from eventpulse.archive.writer import encode
from eventpulse.cli import main
from eventpulse.config import parse_config
from eventpulse.offline import parallel, reference, training
from eventpulse.streams.decode import RecordDecoder
from eventpulse.streams.topics import RecordKind

T0 = 1_796_000_000_000  # 2026-11-30


def write_archive(root: Path, records: list[tuple[int, dict[str, Any]]], topic: str = "events",
                  kind: RecordKind = RecordKind.BEHAVIOUR, per_file: int | None = None,
                  partition: int = 0) -> None:
    """(broker time, record) in offset order, one partition, one segment (or one per
    ``per_file`` records)."""
    layout, decoder = KindLayout(kind), RecordDecoder(kind)
    segmenter = PartitionSegmenter(topic, partition, CutRules(max_records=per_file or 100_000))
    store = ArchiveStore.open(str(root))
    for offset, (broker, record) in enumerate(records):
        if not segmenter.is_open:
            segmenter.begin(offset, None)
        decoded = decoder.decode(json.dumps(record).encode(), broker)
        assert not hasattr(decoded, "reason"), decoded
        if segmenter.append(offset, 10, record["timestamp"],
                            layout.row(decoded, partition, offset, broker)):  # type: ignore[arg-type]
            land(store, layout, segmenter.close())
    if segmenter.is_open:
        land(store, layout, segmenter.close())


def land(store: ArchiveStore, layout: KindLayout, segment: Segment) -> None:
    """A segment's cut marker, then its files, as the archive service lands them."""
    store.put(cut_path(segment.topic, segment.partition, segment.start), encode_cut(segment.end))
    for name, data, _ in encode(layout, segment):
        store.put(name, data)


async def logged_reads_report(job: Any, archive: Path, reads: list[tuple[int, dict[str, Any]]],
                              redis_url: str, until: int) -> dict[str, Any]:
    """Archive ``reads`` (broker time, logged read) as the topic ``reads``, then run the
    consistency report over them from T0 to ``until``."""
    from eventpulse.offline import consistency

    write_archive(archive, reads, topic="reads", kind=RecordKind.FEATURE_READ)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        return await consistency.report(job, ArchiveStore.open(str(archive)), "reads", T0,
                                        until, redis, drop=True)
    finally:
        await redis.aclose()


def test_training_set_command(tmp_path: Path, redis_url: str) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"topics": {"events": "behaviour"}, "features": [
        {"name": "clicks_1m", "topic": "events", "entity": "user", "key": "user_id",
         "where": {"action": "click"}, "aggregation": "count",
         "window": {"type": "hopping", "size": "1m", "step": "10s", "lateness": "5s"}}]}))
    # u1 clicks at T0, T0+1s, T0+2s (broker times +100 ms); a click at T0+3s reaches the broker
    # only at T0+30s; one 40 s late (refused by the lateness rule)
    records = [(T0 + i * 1000 + 100, {"timestamp": T0 + i * 1000, "user_id": "u1",
                                      "action": "click"}) for i in range(3)]
    records.append((T0 + 30_000, {"timestamp": T0 + 3000, "user_id": "u1", "action": "click"}))
    records.append((T0 + 31_000, {"timestamp": T0 + 25_000, "user_id": "u1", "action": "view"}))
    records.append((T0 + 32_000, {"timestamp": T0 - 20_000, "user_id": "u1", "action": "click"}))
    write_archive(tmp_path / "archive", records)
    labels = tmp_path / "labels.csv"
    labels.write_text("entity,entity_id,timestamp,label\n"
                      # window ending T0+20s: the 3 clicks the broker had; whole (not
                      # partial): the partition was read from its first offset, as live
                      f"user,u1,{T0 + 20_000},1\n"
                      f"user,u1,{T0 + 40_000},0\n"   # the 4th arrived; the late one never counts
                      f"user,u2,{T0 + 40_000},0\n")
    out = tmp_path / "out.parquet"
    runner = CliRunner()
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(labels), "--out", str(out), "--config",
                                  str(config), "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    assert "3 rows x 1 features from 6 archived events" in result.output
    rows = pq.read_table(out).to_pylist()
    assert [(r["entity_id"], r["label"], r["clicks_1m"], r["clicks_1m__status"]) for r in rows] \
        == [("u1", 1, 3, "present"), ("u1", 0, 4, "present"), ("u2", 0, 0, "missing")]

    # an entity type no feature has (a typo) is said, not only left as not_applicable columns
    typo = tmp_path / "typo.csv"
    typo.write_text(f"entity,entity_id,timestamp\nuser,u1,{T0}\nusr,u1,{T0}\nusr,u2,{T0}\n")
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(typo), "--out", str(out), "--config",
                                  str(config), "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    assert ("note: 2 label rows are of an entity type no chosen feature has: 'usr' (2)"
            in result.output), result.output
    assert [r["clicks_1m__status"] for r in pq.read_table(out).to_pylist()][1:] == [
        "not_applicable"] * 2
    # no job named: the bundled example's features, said (found by an outside test: its
    # columns came out without a word)
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(labels), "--out", str(out), "--redis-url",
                                  redis_url], env={"EVENTPULSE_CONFIG_PATH": None})
    assert "note: no --config and no EVENTPULSE_CONFIG_PATH: the features of the bundled " \
        "example job" in result.output, result.output

    bad = tmp_path / "bad.csv"
    bad.write_text("user,timestamp\nu1,5\n")
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(bad), "--out", str(out), "--config",
                                  str(config), "--redis-url", redis_url])
    assert result.exit_code != 0 and "needs columns entity" in result.output
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(labels), "--out", str(out), "--config",
                                  str(config), "--features", "nope", "--redis-url", redis_url])
    assert result.exit_code != 0 and "no feature named ['nope']" in result.output
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(labels), "--out", str(out), "--config",
                                  str(config), "--settle", "soon", "--redis-url", redis_url])
    assert result.exit_code != 0 and "--settle" in result.output, result.output
    # found by an outside test: an archive that is not there read as one of nothing (exit 0,
    # every value missing); a header without rows as "no feature has entity []"
    for archive in (tmp_path / "nowhere", labels):
        result = runner.invoke(main, ["training-set", "--archive", str(archive), "--labels",
                                      str(labels), "--out", str(out), "--config", str(config),
                                      "--redis-url", redis_url])
        assert result.exit_code == 1 and "no archived file of events under" in result.output
        assert "check --archive" in result.output
        assert ("(no such directory)" in result.output) is (archive != labels), result.output
    # found by an outside test: a features' topic the archive does not store (other topics' files
    # there) read as a topic without records, every value missing, exit 0
    both = tmp_path / "both.yaml"
    both.write_text(yaml.safe_dump({"topics": {"events": "behaviour", "inference": "inference"},
                                    "features": [
        *yaml.safe_load(config.read_text())["features"],
        {"name": "user_calls", "topic": "inference", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "tumbling", "size": "1m"}}]}))
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(labels), "--out", str(out), "--config",
                                  str(both), "--redis-url", redis_url])
    assert result.exit_code == 1, result.output
    assert "no archived file of topic inference under" in result.output
    assert "where events has files" in result.output and "--features" in result.output
    # its features left out: built
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(labels), "--out", str(out), "--config",
                                  str(both), "--features", "clicks_1m", "--redis-url", redis_url])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["consistency", "--since", "1h", "--archive",
                                  str(tmp_path / "archive"), "--config", str(config),
                                  "--redis-url", redis_url])
    assert result.exit_code == 1, result.output
    assert "no archived file of eventpulse-feature-reads under" in result.output
    assert "the logged reads' topic is --topic" in result.output
    # --redis-url: one Redis that answers, or one sentence naming the option (not a hint at
    # EVENTPULSE_REDIS_URL, which these commands do not use, and never the password)
    for command in (["training-set", "--labels", str(labels), "--out", str(out)],
                    ["consistency", "--since", "1h", "--topic", "events"]):
        for url, said in (("redis+cluster://127.0.0.1:7000", "not a cluster"),
                          ("redis://:s3cret@127.0.0.1:1/2", "cannot reach Redis at 127.0.0.1:1/2 "
                                                            "(connection refused)"),
                          ("http://127.0.0.1:1", "Redis URL must specify")):
            result = runner.invoke(main, [*command, "--archive", str(tmp_path / "archive"),
                                          "--config", str(config), "--redis-url", url])
            assert result.exit_code == 1, result.output
            assert "Error: --redis-url: " in result.output and said in result.output
            assert "s3cret" not in result.output and "report it" not in result.output
    headed = tmp_path / "header.csv"
    headed.write_text("entity,entity_id,timestamp\n")
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(headed), "--out", str(out), "--config",
                                  str(config), "--redis-url", redis_url])
    assert result.exit_code == 1 and "no label rows" in result.output, result.output
    headed.write_text(f"entity,entity_type,entity_id,timestamp\nuser,item,u1,{T0}\n")
    result = runner.invoke(main, ["training-set", "--archive", str(tmp_path / "archive"),
                                  "--labels", str(headed), "--out", str(out), "--config",
                                  str(config), "--redis-url", redis_url])
    assert result.exit_code == 1 and "both entity and entity_type" in result.output


async def test_a_row_counts_from_when_the_broker_had_every_row_before_it(
        tmp_path: Path, redis_url: str) -> None:
    """Broker times (CreateTime) can go back within a partition. A record after one the broker
    had later counts only from that later time, whatever other label rows there are (found by an
    outside test: the archive was read up to the last label moment row by row, so with no later
    label the records after a later one counted early)."""
    job = parse_config({"topics": {"events": "behaviour"}, "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count",
         "window": {"type": "hopping", "size": "1m", "step": "1s", "lateness": "5s"}}]})
    click = {"user_id": "u1", "action": "click"}
    write_archive(tmp_path / "archive", [  # (broker time, record), one partition
        (T0 + 1_000, {**click, "timestamp": T0}),
        (T0 + 9_000, {**click, "timestamp": T0 + 1}),  # the broker had this one late
        (T0 + 2_000, {**click, "timestamp": T0 + 2}),  # so this one counts from T0+9s too
        (T0 + 3_000, {**click, "timestamp": T0 + 3})])
    store = ArchiveStore.open(str(tmp_path / "archive"))
    client = aioredis.Redis.from_url(redis_url)
    try:
        # at T0+5s the broker had only the first click in order: the third and fourth come
        # after the second, which it had at T0+9s; later label rows or none, the same answer
        for later, expected in (([], [1]), ([("user", "u1", T0 + 10_000)], [1, 4]),
                                ([("user", "u2", T0 + 20_000)], [1, 0])):
            rows = [("user", "u1", T0 + 5_000), *later]
            labels = training.labels_of(pa.table({
                "entity": [r[0] for r in rows], "entity_id": [r[1] for r in rows],
                "timestamp": [r[2] for r in rows]}))
            for jobs in (1, 2):
                table, _ = await parallel.build(job, store, labels, list(job.features),
                                                redis_url, jobs)
                assert table.column("clicks").to_pylist() == expected, (later, jobs)
    finally:
        await client.aclose()


async def test_values_counting_records_the_broker_just_had_are_lag_sensitive(
        tmp_path: Path, redis_url: str) -> None:
    """A worker lagging at the label's moment had not applied what the broker received just
    before it: values counting such records say so; values of other features and entities, and
    rows with nothing that recent, keep the client's status."""
    job = parse_config({"topics": {"events": "behaviour"}, "features": [
        {"name": name, "topic": "events", "entity": "user", "key": "user_id",
         "where": {"action": action}, "aggregation": "count",
         "window": {"type": "hopping", "size": "1m", "step": "10s", "lateness": "5s"}}
        for name, action in (("clicks_1m", "click"), ("views_1m", "view"))]})
    # (broker time, record): u1 views at T0, clicks at T0+1s and T0+2s, u2 clicks at T0+2.9s;
    # read at T0+11s (the window ending T0+10s): u1's last click reached the broker 400 ms
    # before, u2's 50 ms before; at T0+17s (the same window) none is that recent
    records = [(T0 + 100, {"timestamp": T0, "user_id": "u1", "action": "view"}),
               (T0 + 1_100, {"timestamp": T0 + 1_000, "user_id": "u1", "action": "click"}),
               (T0 + 10_600, {"timestamp": T0 + 2_000, "user_id": "u1", "action": "click"}),
               (T0 + 10_950, {"timestamp": T0 + 2_900, "user_id": "u2", "action": "click"})]
    write_archive(tmp_path / "archive", records)
    store = ArchiveStore.open(str(tmp_path / "archive"))
    labels = training.labels_of(pa.table({"entity": ["user"] * 4,
                                          "entity_id": ["u1", "u2", "u1", "u2"],
                                          "timestamp": [T0 + 11_000] * 2 + [T0 + 17_000] * 2}))
    specs = list(job.features)
    client = aioredis.Redis.from_url(redis_url)
    try:
        results = {settle: await training.build(job, store, labels, specs, client,
                                                settle_ms=settle)
                   for settle in (0, 100, 1_000, 12_000)}
    finally:
        await client.aclose()

    def cells(settle: int) -> list[tuple[object, ...]]:
        return [(r["entity_id"], r["clicks_1m"], r["clicks_1m__status"], r["views_1m"],
                 r["views_1m__status"]) for r in results[settle][0].to_pylist()]

    # no settle time: what a caught-up worker served
    assert cells(0) == [("u1", 2, "present", 1, "present"), ("u2", 1, "present", 0, "missing"),
                        ("u1", 2, "present", 1, "present"), ("u2", 1, "present", 0, "missing")]
    # 100 ms: only u2's click is that recent at T0+11s
    assert cells(100) == [("u1", 2, "present", 1, "present"),
                          ("u2", 1, "lag_sensitive", 0, "missing"),
                          ("u1", 2, "present", 1, "present"), ("u2", 1, "present", 0, "missing")]
    # 1 s: u1's second click too; its views are older; nothing is that recent at T0+17s
    assert cells(1_000) == [("u1", 2, "lag_sensitive", 1, "present"),
                            ("u2", 1, "lag_sensitive", 0, "missing"),
                            ("u1", 2, "present", 1, "present"), ("u2", 1, "present", 0, "missing")]
    assert results[1_000][1].lag_sensitive == 2
    # 12 s: u1's view too at T0+11s, but no longer at T0+17s; values stay a caught-up worker's
    assert cells(12_000) == [("u1", 2, "lag_sensitive", 1, "lag_sensitive"),
                             ("u2", 1, "lag_sensitive", 0, "missing"),
                             ("u1", 2, "lag_sensitive", 1, "present"),
                             ("u2", 1, "lag_sensitive", 0, "missing")]


async def test_a_recent_record_after_the_window_read_marks_nothing(
        tmp_path: Path, redis_url: str) -> None:
    """A record the broker had just before the moment counts only in windows holding its event
    time: the latest closed window of a hopping feature, read at the moment, ends before it
    (found by an outside test: most marks were of values such a record could not change)."""
    job = parse_config({"topics": {"events": "behaviour"}, "features": [
        {"name": "clicks_1m", "topic": "events", "entity": "user", "key": "user_id",
         "where": {"action": "click"}, "aggregation": "count",
         "window": {"type": "hopping", "size": "1m", "step": "10s", "lateness": "5s"}}]})
    # u1 clicks at T0+2s (broker T0+10.6s): in the window ending T0+10s, read at T0+11s;
    # u3 clicks at T0+10.5s (broker T0+10.7s): after that window's end, so not in its value
    records = [(T0 + 2_100, {"timestamp": T0 + 1_000, "user_id": "u3", "action": "click"}),
               (T0 + 10_600, {"timestamp": T0 + 2_000, "user_id": "u1", "action": "click"}),
               (T0 + 10_700, {"timestamp": T0 + 10_500, "user_id": "u3", "action": "click"})]
    write_archive(tmp_path / "archive", records)
    store = ArchiveStore.open(str(tmp_path / "archive"))
    labels = training.labels_of(pa.table({"entity": ["user"] * 2, "entity_id": ["u1", "u3"],
                                          "timestamp": [T0 + 11_000] * 2}))
    client = aioredis.Redis.from_url(redis_url)
    try:
        table, stats = await training.build(job, store, labels, list(job.features), client,
                                            settle_ms=1_000)
        slow, slow_stats = await reference.compute(job, store, labels, list(job.features),
                                                   client, settle_ms=1_000)
    finally:
        await client.aclose()
    rows = [(r["entity_id"], r["clicks_1m"], r["clicks_1m__status"]) for r in table.to_pylist()]
    assert rows == [("u1", 1, "lag_sensitive"), ("u3", 1, "present")]
    assert stats.lag_sensitive == slow_stats.lag_sensitive == 1
    assert [row["clicks_1m"].status for row in slow if row] == ["lag_sensitive", "present"]


def test_awkward_labels_outputs_and_windows_are_refused_in_one_sentence(
        tmp_path: Path, redis_url: str) -> None:
    """Found by an outside test: each of these ended in "unexpected ... please report it",
    wrote a file readers refuse, or read ids as other ids without a word."""
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({"topics": {"events": "behaviour",
                                                 "reads": "feature_read"}, "features": [
        {"name": "clicks_1m", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"size": "1m"}}]}))
    archive = tmp_path / "archive"
    write_archive(archive, [(T0 + 100, {"timestamp": T0, "user_id": "7", "action": "click"})])
    write_archive(archive, [(T0 + 200, {"timestamp": T0 + 100, "entity": "user",
                                        "entity_id": "7", "values": {"clicks_1m": {
                                            "value": 1, "status": "present"}}})],
                  topic="reads", kind=RecordKind.FEATURE_READ)
    runner = CliRunner()

    def build(labels: Path | pa.Table, out: Path, *more: str) -> Any:
        if isinstance(labels, pa.Table):
            pq.write_table(labels, tmp_path / "labels.pq")  # parquet by its content
            labels = tmp_path / "labels.pq"
        return runner.invoke(main, ["training-set", "--archive", str(archive), "--labels",
                                    str(labels), "--out", str(out), "--config", str(config),
                                    "--redis-url", redis_url, *more])

    def refused(result: Any, *said: str) -> None:
        assert result.exit_code == 1, result.output
        assert all(s in result.output for s in said), result.output
        assert "report it" not in result.output and "Traceback" not in result.output

    at = [T0 + 50_000] * 3  # the window closed by then holds the click
    out = tmp_path / "out.parquet"
    # ids of a float column (pandas' integers with a gap) are the integers; a gap is refused
    result = build(pa.table({"entity": ["user"] * 2, "entity_id": [7.0, 8.0],
                             "timestamp": at[:2]}), out)
    assert result.exit_code == 0, result.output
    assert [(r["entity_id"], r["clicks_1m"], r["clicks_1m__status"])
            for r in pq.read_table(out).to_pylist()] == [(7.0, 1, "present"), (8.0, 0, "missing")]
    refused(build(pa.table({"entity": ["user"] * 3, "entity_id": [7.0, 8.0, None],
                            "timestamp": at}), out), "row 3: no entity_id")
    refused(build(pa.table({"entity": ["user"], "entity_id": [7.5], "timestamp": at[:1]}), out),
            "row 1: entity_id 7.5 is not an entity id")
    refused(build(pa.table({"entity": ["user", None], "entity_id": ["7", "8"],
                            "timestamp": at[:2]}), out), "row 2: no entity")
    empty_id = tmp_path / "empty.csv"
    empty_id.write_text(f"entity,entity_id,timestamp\nuser,,{T0}\n")
    refused(build(empty_id, out), "row 1: no entity_id")
    doubled = tmp_path / "doubled.csv"
    for header, row in (("entity,entity_id,timestamp,timestamp", f"user,7,{T0},{T0}"),
                        ("entity,entity_id,timestamp,y,y", f"user,7,{T0},1,2")):
        doubled.write_text(f"{header}\n{row}\n")
        refused(build(doubled, out), "appear more than once")
    semicolons = tmp_path / "semicolons.csv"
    semicolons.write_text(f"entity;entity_id;timestamp\nuser;7;{T0}\n")
    refused(build(semicolons, out), "missing ['entity', 'entity_id', 'timestamp']",
            "separated by commas")
    # outputs: checked before any work; a failed write leaves nothing
    listed = pa.table({"entity": ["user"], "entity_id": ["7"], "timestamp": at[:1],
                       "tags": [[1, 2]]})
    refused(build(listed, tmp_path / "o.csv"), "CSV cannot hold the label columns ['tags']")
    assert not (tmp_path / "o.csv").exists()
    refused(build(listed, tmp_path / "nowhere" / "o.parquet"), "no directory")
    result = build(listed, tmp_path / "OUT.PARQUET", "--features", " clicks_1m , ")
    assert result.exit_code == 0, result.output
    assert pq.read_table(tmp_path / "OUT.PARQUET").column("tags").to_pylist() == [[1, 2]]
    refused(build(listed, out, "--features", ""), "--features: name at least one feature")
    (tmp_path / "dir.parquet").mkdir()
    refused(build(listed, tmp_path / "dir.parquet"), "is a directory")
    result = build(listed, out, "--features", "clicks_1m,clicks_1m")  # once in the output
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).column_names == ["entity", "entity_id", "timestamp", "tags",
                                               "clicks_1m", "clicks_1m__status"]
    twice = pa.Table.from_arrays([pa.array(["user"]), pa.array(["7"]), pa.array(at[:1]),
                                  pa.array([1]), pa.array([2])],
                                 names=["entity", "entity_id", "timestamp", "x", "x"])
    refused(build(twice, out), "the column names ['x'] appear more than once")

    def report(*more: str) -> Any:
        return runner.invoke(main, ["consistency", "--archive", str(archive), "--config",
                                    str(config), "--redis-url", redis_url, *more])

    result = report("--since", str(T0), "--topic", "reads")
    assert result.exit_code == 0 and "clicks_1m" in result.output, result.output
    # seconds, as in records and label files: the same moment
    assert report("--since", str(T0 // 1000), "--topic", "reads").output == result.output
    refused(report("--since", str(T0), "--topic", "events"),
            "'events' holds no logged reads", "--topic")
    refused(report("--since", str(T0 + 1000), "--topic", "reads"), "no logged reads of this job")
    result = report("--since", str(T0), "--until", str(T0 - 1000), "--topic", "reads")
    assert result.exit_code == 2, result.output  # a bad option value (found by an outside test)
    assert ("Invalid value for --until: 2026-11-30T00:53:19Z must be after --since "
            "(2026-11-30T00:53:20Z)") in result.output
    refused(report("--since", str(T0), "--topic", "reads", "--metrics-file",
                   str(tmp_path / "nowhere" / "c.prom")), "--metrics-file", "no directory")
    refused(report("--since", str(T0), "--topic", "reads", "--metrics-file", str(tmp_path)),
            "--metrics-file", "is a directory")


def test_label_times_in_any_unit_and_as_written_by_pandas(tmp_path: Path) -> None:
    """Found by an outside test: parquet timestamps finer than a millisecond (pandas writes
    nanoseconds) ended in "unexpected ArrowInvalid"; a CSV's fractional epoch numbers (a float
    column with a gap) were refused where parquet's were taken; a CSV's epoch column came out
    as text. A finer time is floored to its millisecond."""
    nanos = pa.array([1_796_308_121_077_123_456, 1_796_308_121_077_999_999],
                     pa.timestamp("ns", tz="America/New_York"))
    pq.write_table(pa.table({"entity": ["user"] * 2, "entity_id": ["u1", "u2"],
                             "timestamp": nanos}), tmp_path / "labels.parquet")
    assert training.read_labels(tmp_path / "labels.parquet").times == [1_796_308_121_077] * 2
    csv = tmp_path / "labels.csv"
    csv.write_text("entity,entity_id,timestamp\nuser,u1,1796308467055.0\nuser,u2,1700000000.5\n"
                   "user,u3,1.7963084670559e12\nuser,u4,1796308467055\n")
    assert training.read_labels(csv).times == [1_796_308_467_055, 1_700_000_000_500,
                                               1_796_308_467_055, 1_796_308_467_055]
    csv.write_text("entity,entity_id,timestamp\nuser,u1,1796308467055\nuser,u2,1700000000\n")
    labels = training.read_labels(csv)
    assert labels.table.column("timestamp").type == pa.int64()  # as written, a number
    assert labels.times == [1_796_308_467_055, 1_700_000_000_000]
    csv.write_text("entity,entity_id,timestamp\nuser,u1,2026-12-03T10:00:00Z\nuser,u2,17\n")
    assert training.read_labels(csv).table.column("timestamp").type == pa.string()
    for bad in ("1e400", "nan", "1_000", "12.5.1"):
        csv.write_text(f"entity,entity_id,timestamp\nuser,u1,{bad}\n")
        with pytest.raises(training.TrainingSetError, match="row 1: timestamp"):
            training.read_labels(csv)
    # out of range: said so, not "not ISO-8601" (found by an outside test)
    csv.write_text("entity,entity_id,timestamp\nuser,u1,253402300800000\n")  # year 10000
    with pytest.raises(training.TrainingSetError, match=r"row 1: timestamp .*out of range"):
        training.read_labels(csv)
    pq.write_table(pa.table({"entity": ["user"], "entity_id": ["u1"], "timestamp": pa.array(
        [253_402_300_800_000], pa.timestamp("ms", tz="UTC"))}), tmp_path / "late.parquet")
    with pytest.raises(training.TrainingSetError, match=r"row 1: timestamp .*out of range"):
        training.read_labels(tmp_path / "late.parquet")


def test_values_of_several_types_are_json_and_label_columns_may_not_take_output_names(
        ) -> None:
    job = parse_config({"topics": {"events": "behaviour"}, "features": [
        {"name": "last_tier", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "last", "value": "tier", "window": {"size": "1m"}}]})
    labels = training.labels_of(pa.table({"entity": ["user"] * 5, "entity_id": list("abcde"),
                                          "timestamp": [T0] * 5}))
    specs = training.choose_features(job, labels, None)
    served = [True, 7, {"o": 1}, "gold", None]
    table = training.table_of(labels, specs, {"last_tier": (served, ["present"] * 5)})
    texts = table.column("last_tier").to_pylist()
    assert texts[4] is None
    assert [json.loads(t) for t in texts[:4]] == served[:4]  # what was served, not its repr
    # a boolean after a float, in any order and in lists (found by an outside test: arrow took
    # true for 1.0 where a float came first), in one process's column or joined from shares
    for served in ([2.5, True], [True, 2.5], [2.5, None, False], [[2.5], [True]], [[True], [2.5]]):
        shares = [served[:1], served[1:]]  # one share's values, then the other's
        joined = parallel._join(specs, len(served), [[0], list(range(1, len(served)))],
                                [training.typed_columns({"last_tier": (part, ["present"] *
                                                                       len(part))})
                                 for part in shares])["last_tier"][0]
        for column in (training.value_array(served), training.value_array(joined)):
            assert column.type == pa.string(), (served, column)
            assert [None if t is None else json.loads(t) for t in column.to_pylist()] == served
    # ints and floats make one column of doubles, as numbers in a dataframe
    assert training.value_array([1, 2.5]).to_pylist() == [1.0, 2.5]
    # ... but a share whose values arrow makes doubles sends them as they are: joined with
    # another share's of another type, the JSON text is one process's (found by an outside
    # test: "[1.0, 2.5]" with three processes, "[1, 2.5]" with one or two)
    for served in ([[1, 2.5], "x"], ["x", [1, 2.5]], [1, 2.5, "x"], [[1, 2], [2.5]]):
        split = [[0], list(range(1, len(served)))]
        joined = parallel._join(specs, len(served), split, [
            training.typed_columns({"last_tier": ([served[r] for r in rows],
                                                  ["present"] * len(rows))})
            for rows in split])["last_tier"][0]
        assert (training.value_array(joined).to_pylist()
                == training.value_array(served).to_pylist()), served
    for clash in ("last_tier", "last_tier__status"):
        named = training.labels_of(pa.table({"entity": ["user"], "entity_id": ["a"],
                                             "timestamp": [T0], clash: [1]}))
        try:
            training.choose_features(job, named, None)
        except training.TrainingSetError as exc:
            assert clash in str(exc) and "--features" in str(exc)
        else:
            raise AssertionError(f"a label column named {clash} was accepted")


async def test_values_that_may_count_records_of_a_lost_file_are_incomplete(
        tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an outside test: a partition's middle file removed gave smaller values marked
    present. The values that may count its records (read after the broker had the row before
    the gap, over a window that can hold their event times) are now ``incomplete``, of every
    entity (which entities the lost records were of is lost with them); the others keep their
    status. The consistency report attributes such differences to ``archive_gap``."""
    job = parse_config({"topics": {"events": "behaviour"}, "limits": {"max_future": "1m"},
                        "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "hopping", "size": "1m", "step": "10s"}}]})
    click = {"action": "click"}

    def clicks(user: str, start: int) -> list[tuple[int, dict[str, Any]]]:
        return [(start + i * 1000 + 100, {**click, "user_id": user, "timestamp": start + i * 1000})
                for i in range(3)]

    archive = tmp_path / "archive"
    write_archive(archive, [*clicks("u1", T0), *clicks("u2", T0 + 10_000),
                            *clicks("u1", T0 + 300_000), *clicks("u1", T0 + 480_000)], per_file=3)
    store = ArchiveStore.open(str(archive))
    (lost,) = archive.rglob(data_name(0, 3, 5))
    lost.unlink()
    rows = [("u1", T0 + 1_500),     # before the broker had the row before the gap: exact
            ("u1", T0 + 30_000),    # the lost clicks may be u1's: incomplete
            ("u2", T0 + 30_000),    # ... or u2's (served 3, here missing): incomplete
            ("u1", T0 + 330_000),   # a window up to 1 min (max_future) after the gap's end
            ("u1", T0 + 520_000),   # a window starting after anything of the gap: exact
            # missing, within the key's TTL (1 h) of the row after the gap: the lost clicks,
            # if u2's last, kept its key alive that long; after it, missing for sure
            ("u2", T0 + 3_900_099), ("u2", T0 + 3_900_100)]
    labels = training.labels_of(pa.table({"entity": ["user"] * len(rows),
                                          "entity_id": [r[0] for r in rows],
                                          "timestamp": [r[1] for r in rows]}))
    for jobs in (1, 2):
        with caplog.at_level("WARNING", logger="eventpulse.archive"):
            table, stats = await parallel.build(job, store, labels, list(job.features),
                                                redis_url, jobs)
        assert list(zip(table.column("clicks").to_pylist(),
                        table.column("clicks__status").to_pylist(), strict=True)) == [
            (0, "present"), (3, "incomplete"), (0, "incomplete"), (3, "incomplete"),
            (3, "present"), (0, "incomplete"), (0, "missing")], jobs
        assert stats.incomplete == 4
    # with --settle, a worker that late kept the key alive that much longer (an outside test
    # found lag_sensitive from the whole archive read a firm missing here, unmarked)
    late = training.labels_of(pa.table({"entity": ["user"] * 2, "entity_id": ["u2"] * 2,
                                        "timestamp": [T0 + 3_901_099, T0 + 3_901_100]}))
    table, _ = await parallel.build(job, store, late, list(job.features), redis_url, 1, 1000)
    assert table.column("clicks__status").to_pylist() == ["incomplete", "missing"]
    # one warning, though both the names and the segment's marker say so
    assert [r.getMessage() for r in caplog.records if "3-5" in r.getMessage()] == [
        f"the archive of topic events under {archive} has no file for offsets 3-5 of partition "
        "0: values that may count those records get the status incomplete (was a file "
        "removed?)"]


async def test_a_key_in_doubt_after_a_gap_is_incomplete(tmp_path: Path, redis_url: str) -> None:
    """Found by an outside test: with ``--settle``, a read near the key TTL of the entity's last
    archived records is ``lag_sensitive`` (its key may have expired), where the worker, which
    also applied the entity's later records the archive lost, read a live key: that value is
    ``incomplete`` too, while the lost records' write may have kept the key alive."""
    job = parse_config({"topics": {"events": "behaviour"}, "limits": {"max_future": "1m"},
                        "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "ttl": "1h",
         "window": {"type": "hopping", "size": "1m", "step": "10s"}}]})

    def clicks(user: str, start: int) -> list[tuple[int, dict[str, Any]]]:
        return [(start + i * 1000 + 100, {"action": "click", "user_id": user,
                                          "timestamp": start + i * 1000}) for i in range(3)]

    intact, gapped = tmp_path / "intact", tmp_path / "gapped"
    records = [*clicks("u1", T0), *clicks("u1", T0 + 10_000), *clicks("u2", T0 + 20_000)]
    for root in (intact, gapped):
        write_archive(root, records, per_file=3)
    (lost,) = gapped.rglob(data_name(0, 3, 5))  # u1's last clicks
    lost.unlink()
    # half the settle time after u1's archived clicks' key TTL: in doubt without the lost ones
    labels = training.labels_of(pa.table({"entity": ["user"], "entity_id": ["u1"],
                                          "timestamp": [T0 + 2_100 + 3_600_000 + 500]}))
    found = {}
    for root in (intact, gapped):
        table, _ = await parallel.build(job, ArchiveStore.open(str(root)), labels,
                                        list(job.features), redis_url, 1, 1000)
        found[root] = table.column("clicks__status").to_pylist()
    assert found == {intact: ["present"], gapped: ["incomplete"]}


def test_a_gap_bounds_the_values_it_may_have_changed() -> None:
    """The rule of eventpulse/offline/gaps.py, edge by edge: the lost records reached the broker
    after the row before the gap (``after_ms``), by the row after it (``by_ms``), with event
    times up to ``by_ms`` plus ``max_future``; a logged read counts them only if its positions
    reach the gap."""
    from eventpulse.offline.gaps import Gap, may_count
    from eventpulse.tables.client import FeatureValue

    spec = parse_config({"topics": {"events": "behaviour"}, "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count",
         "window": {"type": "hopping", "size": "1m", "step": "10s", "lateness": "5s"}}]}
                        ).features[0]
    gap = Gap("events", "events:0", 3, 5, after_ms=T0 + 2_000, by_ms=T0 + 10_000)

    def window(start: int, end: int) -> FeatureValue:
        return FeatureValue(1, start, end, None, None, "present")

    inside = window(T0 - 30_000, T0 + 30_000)
    assert may_count(gap, spec, 60_000, 3_600_000, T0 + 2_000, inside)          # had by the row before it
    assert not may_count(gap, spec, 60_000, 3_600_000, T0 + 1_999, inside)      # read before that
    # a window that ends before their event times can: their write moved the entity's ring
    # forward, which changes how older windows read (found by an outside test)
    assert may_count(gap, spec, 60_000, 3_600_000, T0 + 90_000, window(T0 - 600_000, T0 - 540_000))
    # ... to T0 + 10 s + max_future: a window starting after cannot
    assert may_count(gap, spec, 60_000, 3_600_000, T0 + 90_000, window(T0 + 70_000, T0 + 130_000))
    assert not may_count(gap, spec, 60_000, 3_600_000, T0 + 90_000, window(T0 + 70_001, T0 + 130_001))
    # a read that logged the offsets it held: counts them only if those reach the gap
    assert not may_count(gap, spec, 60_000, 3_600_000, T0 + 90_000, inside, {"events:0": 2})
    assert not may_count(gap, spec, 60_000, 3_600_000, T0 + 90_000, inside, {"events:1": 9})
    assert may_count(gap, spec, 60_000, 3_600_000, T0 + 90_000, inside, {"events:0": 3})
    # another topic's gap, and a gap with no row after it read (no upper bound)
    assert not may_count(Gap("other", "other:0", 3, 5, None, None), spec, 60_000,
                         3_600_000, T0, inside)
    assert may_count(Gap("events", "events:0", 3, 5, T0, None), spec, 60_000, 3_600_000,
                     T0 + 1, window(T0 + 10**9, T0 + 10**9 + 60_000))
    # missing for lack of them: the lost records may have kept the entity's key alive up to a
    # key TTL after the broker had them (found by an outside test)
    gone = FeatureValue(0, T0 + 7_000_000, T0 + 7_060_000, None, None, "missing")
    assert may_count(gap, spec, 60_000, 3_600_000, T0 + 3_609_999, gone)
    assert not may_count(gap, spec, 60_000, 3_600_000, T0 + 3_610_000, gone)
    assert not may_count(gap, spec, 60_000, 3_600_000, T0 + 3_609_999,
                         gone._replace(status="present"))
    # ... and so may one in doubt whether its key had expired (lag_sensitive, with --settle)
    assert may_count(gap, spec, 60_000, 3_600_000, T0 + 3_609_999,
                     gone._replace(status="lag_sensitive"))


async def test_the_consistency_report_puts_a_lost_files_differences_to_archive_gap(
        tmp_path: Path, redis_url: str) -> None:
    """A served read that differs from its recomputation because the archive lost records
    (a middle file removed) is ``archive_gap``, not ``unexplained``; a read the lost records
    did not change is still exact (the status is not marked in the report)."""

    job = parse_config({"topics": {"events": "behaviour", "reads": "feature_read"},
                        "limits": {"max_future": "1m"}, "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "hopping", "size": "1m", "step": "10s"}}]})
    archive = tmp_path / "archive"
    users = ("u1", "u2", "u3")  # three clicks each, a second apart, one user after the other
    write_archive(archive, [(T0 + k * 1000 + 100, {"action": "click", "user_id": users[k // 3],
                                                   "timestamp": T0 + k * 1000})
                            for k in range(9)], per_file=3)
    (archive_file,) = archive.rglob(data_name(0, 3, 5))  # u2's clicks
    archive_file.unlink()

    def served(k: int, user: str) -> tuple[int, dict[str, Any]]:
        value = {"value": 3, "status": "present", "newest_event_ms": T0 + k * 3000 + 2000,
                 "event_count": 3}
        return (T0 + 30_100, {"timestamp": T0 + 30_000, "entity": "user", "entity_id": user,
                              "values": {"clicks": value}})

    reports = await logged_reads_report(job, archive, [served(k, user) for k, user
                                                       in enumerate(users)], redis_url, T0 + 60_000)
    rep = reports["clicks"]
    assert (rep.rows, rep.exact, rep.missing) == (3, 2, 1), rep
    assert {k: v for k, v in rep.causes.items() if v} == {"archive_gap": 1}


async def test_the_consistency_report_recomputes_a_read_of_a_past_moment_as_served(
        tmp_path: Path, redis_url: str) -> None:
    """A read of a past moment (``at_ms`` well before it was served: a backfill reading old
    windows from Redis) reads that moment's window as the worker held it when served, with
    records the broker had after ``at`` (found by an outside test: such reads landed in
    ``unexplained``, here in ``archive_behind``). The report takes a read served more than a
    minute after its ``at`` (the log's ``served_ms``, else when the broker had the log) as
    served then, and recomputes it so."""

    job = parse_config({"topics": {"events": "behaviour", "reads": "feature_read"},
                        "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "hopping", "size": "1m", "step": "10s"}}]})
    archive = tmp_path / "archive"
    # u1 clicks at T0, T0+1s, T0+2s; one of T0+3s reaches the broker only at T0+70s
    clicks = [(T0 + k * 1000 + 100, T0 + k * 1000) for k in range(3)] + [(T0 + 70_000, T0 + 3000)]
    write_archive(archive, [(broker, {"action": "click", "user_id": "u1", "timestamp": at})
                            for broker, at in clicks])

    def served(at: int, logged: int, count: int, newest: int, **extra: int,
               ) -> tuple[int, dict[str, Any]]:
        return (logged, {"timestamp": at, "entity": "user", "entity_id": "u1", "values": {
            "clicks": {"value": count, "status": "present", "newest_event_ms": newest,
                       "event_count": count}}, **extra})

    reports = await logged_reads_report(job, archive, [
        served(T0 + 10_000, T0 + 10_100, 3, T0 + 2000),   # read then: three clicks
        # the same moment read at T0+80s: its log says when (served_ms), or its broker time
        served(T0 + 10_000, T0 + 80_100, 4, T0 + 3000),
        served(T0 + 10_000, T0 + 300_000, 4, T0 + 3000, served_ms=T0 + 80_000),
        # a read of the present whose log reached the broker late (a Kafka outage): served_ms
        served(T0 + 20_000, T0 + 300_000, 3, T0 + 2000, served_ms=T0 + 20_005),
        served(T0 + 80_000, T0 + 80_100, 0, T0 + 3000),   # the present then: outside the window
    ], redis_url, T0 + 120_000)
    rep = reports["clicks"]
    assert (rep.rows, rep.exact) == (5, 5), rep


async def test_the_consistency_report_puts_a_sums_rounding_to_applied_order(
        tmp_path: Path, redis_url: str) -> None:
    """Found by outside tests: a float sum the worker added up in other batches than the
    recomputation differs in its last bits, or more where its terms cancel (1e16 + 1 + 1 -
    1e16: 0.0 or 2.0); such reads went to ``not_yet_applied`` (a lag whose grouping happened to
    match) or ``unexplained``. Recomputed with the read's logged positions, a difference no
    larger than adding those very records up in another order can make is ``applied_order``;
    a record the worker had not applied is still ``not_yet_applied`` (a rule of relative
    closeness hid it), a larger difference ``unexplained``. Without positions, a mean of the
    same count, close to the last bits, is ``applied_order`` too."""

    window = {"type": "tumbling", "size": "1m"}
    job = parse_config({"topics": {"events": "behaviour", "reads": "feature_read"},
                        "features": [
        {"name": "watched", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "sum", "value": "watch", "window": window},
        {"name": "watch_mean", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "mean", "value": "watch", "window": window}]})
    archive = tmp_path / "archive"
    # u1: 0.1, 0.2, 0.3 (added in order, as the recomputation does: 0.6000000000000001);
    # u2: terms that cancel (in order: 0.0); u3: 1e12; u4: as u2; then a late record each of
    # u3 and u4 the worker had not applied when read (the broker had them at T0+44s)
    watches = [("u1", 0.1), ("u1", 0.2), ("u1", 0.3), ("u2", 1e16), ("u2", 1.0), ("u2", 1.0),
               ("u2", -1e16), ("u3", 1e12), ("u4", 1e16), ("u4", 1.0), ("u4", 1.0),
               ("u4", -1e16)]
    rows = [(T0 + k * 100 + 100, {"action": "watch", "user_id": user, "timestamp": T0 + k * 100,
                                  "watch": w}) for k, (user, w) in enumerate(watches)]
    rows += [(T0 + 44_000, {"action": "watch", "user_id": user, "timestamp": T0 + 2000,
                            "watch": w}) for user, w in (("u3", 1.0), ("u4", 5.0))]
    write_archive(archive, rows)
    total = 0.1 + (0.2 + 0.3)  # the worker's batches: 0.6
    assert total != (0.1 + 0.2) + 0.3 and total / 3 != ((0.1 + 0.2) + 0.3) / 3

    def served(user: str, value: float, count: int, upto: int | None,
               newest: int) -> tuple[int, dict[str, Any]]:
        # read at T0+45s: the closed minute from T0-20s holds the watches
        present = {"status": "present", "newest_event_ms": newest}
        return (T0 + 45_100, {"timestamp": T0 + 45_000, "entity": "user", "entity_id": user,
                              "values": {"watched": {"value": value, **present},
                                         "watch_mean": {"value": value / count,
                                                        "event_count": count, **present}},
                              **({"applied": {"events:0": [upto, upto]}} if upto else {})})

    reports = await logged_reads_report(job, archive, [
        served("u1", total, 3, 13, T0 + 200),     # applied_order, both
        served("u1", total, 3, None, T0 + 200),   # no positions: the mean's count says so
        served("u1", 0.61, 3, 13, T0 + 200),      # unexplained, both
        served("u2", 2.0, 4, 13, T0 + 600),       # the cancelling terms: applied_order, both
        served("u2", 30.0, 4, 13, T0 + 600),      # beyond any order of them: unexplained
        served("u3", 1e12, 1, 11, T0 + 700),      # the late 1.0 not applied yet
        served("u4", 2.0, 4, 11, T0 + 1100),      # rounded otherwise, and the late 5.0 too
    ], redis_url, T0 + 60_000)
    causes = {name: {k: v for k, v in rep.causes.items() if v} for name, rep in reports.items()}
    assert causes["watch_mean"] == {"applied_order": 3, "unexplained": 2,
                                    "not_yet_applied": 2}, causes
    # the sum without positions: no rule tells its rounding from a record left out
    assert causes["watched"] == {"applied_order": 2, "unexplained": 3,
                                 "not_yet_applied": 2}, causes
    assert (reports["watched"].rows, reports["watched"].exact) == (7, 0)


def test_csv_ids_pandas_wrote_as_floats_are_their_integers(tmp_path: Path) -> None:
    """Found by an outside test: a CSV whose ids pandas wrote from a float column (``7.0``)
    read the id "7.0", and every value came back missing without a word; parquet's float ids
    were read as integers already. Other text stays as written."""
    csv = tmp_path / "labels.csv"
    for written, read in ((["7.0", "8.0", "", "-0.0", "9"], ["7", "8", "", "0", "9"]),
                          (["7.0", "abc"], ["7.0", "abc"]),   # a text column: ids as written
                          (["007", "1.50"], ["007", "1.50"])):
        csv.write_text("entity,entity_id,timestamp\n" + "".join(
            f"user,{i},{T0}\n" for i in written))
        table = pacsv_read(csv)
        assert table.column("entity_id").to_pylist() == read, written
    csv.write_text(f"entity,entity_id,timestamp\nuser,7.0,{T0}\nuser,8,{T0}\n")
    assert training.read_labels(csv).ids == ["7", "8"]


def pacsv_read(path: Path) -> pa.Table:
    """The label table :func:`training.read_labels` reads (before its rows are checked)."""
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
        column_types={"entity_id": pa.string(), "timestamp": pa.string()}))
    return training._whole_number_ids(table)


async def test_a_segments_lost_hour_file_makes_its_values_incomplete(
        tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an outside test: a segment spanning two event-time hours is a file of one name
    in each hour's directory; with one hour's directory removed, the other's name still covered
    the offsets, and values lacking its rows read ``present`` without a word. Each file lists
    the segment's hours in its footer: the lost one is named, and the values that may count
    the segment's records are ``incomplete``."""
    job = parse_config({"topics": {"events": "behaviour"}, "limits": {"max_future": "1m"},
                        "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "hopping", "size": "1m", "step": "10s"}}]})
    hour = T0 - T0 % 3_600_000 + 3_600_000
    times = [hour - 2_000, hour - 1_000, hour, hour + 1_000,  # one segment, two hours
             *(hour + 600_000 + i * 1000 for i in range(4)),
             *(hour + 700_000 + i * 1000 for i in range(4))]
    archive = tmp_path / "archive"
    write_archive(archive, [(t + 100, {"action": "click", "user_id": "u1", "timestamp": t})
                            for t in times], per_file=4)
    before, _ = sorted(archive.rglob(data_name(0, 0, 3)))  # hour=<h-1>, hour=<h>
    before.unlink()
    store = ArchiveStore.open(str(archive))
    labels = training.labels_of(pa.table({"entity": ["user"] * 2, "entity_id": ["u1"] * 2,
                                          "timestamp": [hour + 30_000, hour + 730_000]}))
    with caplog.at_level("WARNING", logger="eventpulse.archive"):
        table, stats = await parallel.build(job, store, labels, list(job.features), redis_url,
                                            1)
    assert list(zip(table.column("clicks").to_pylist(),
                    table.column("clicks__status").to_pylist(), strict=True)) == [
        (2, "incomplete"), (4, "present")]
    assert stats.incomplete == 1
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "no file of offsets 0-3 of partition 0 in date=" in warned, warned
    assert f"hour={(hour - 1) // 3_600_000 % 24:02d}" in warned, warned


@pytest.mark.parametrize("lost", ["first", "last"])
async def test_a_partitions_first_or_last_file_lost_is_found_by_its_marker(
        tmp_path: Path, redis_url: str, lost: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an outside test: a partition's first or last file removed leaves no hole
    between files, and its values read ``present`` without a word. The archive writes a cut
    marker for every segment before its files (``_cuts/``): a marker without files is a lost
    segment (or an upload in flight), named in a warning, its values ``incomplete``."""
    job = parse_config({"topics": {"events": "behaviour"}, "limits": {"max_future": "1m"},
                        "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "hopping", "size": "1m", "step": "10s"}}]})
    archive = tmp_path / "archive"
    starts = (0, 10_000, 300_000, 480_000)  # u1's three clicks from each (u2's from 10 s)
    write_archive(archive, [(T0 + s + i * 1000 + 100, {"action": "click", "timestamp":
                                                         T0 + s + i * 1000,
                                                         "user_id": "u2" if s == 10_000 else "u1"})
                            for s in starts for i in range(3)], per_file=3)
    (gone,) = archive.rglob(data_name(0, 0, 2) if lost == "first" else data_name(0, 9, 11))
    gone.unlink()
    store = ArchiveStore.open(str(archive))
    moments = [T0 + 1_500, T0 + 200_000, T0 + 330_000, T0 + 520_000]
    labels = training.labels_of(pa.table({"entity": ["user"] * 4, "entity_id": ["u1"] * 4,
                                          "timestamp": moments}))
    with caplog.at_level("WARNING", logger="eventpulse.archive"):
        table, _ = await parallel.build(job, store, labels, list(job.features), redis_url, 1)
    got = list(zip(table.column("clicks").to_pylist(),
                   table.column("clicks__status").to_pylist(), strict=True))
    if lost == "first":  # the windows around u1's lost clicks, and its key (missing here,
        # present live) up to a TTL on; once its key holds later clicks, exact
        assert got == [(0, "incomplete"), (0, "incomplete"), (3, "present"), (3, "present")]
    else:  # read once the broker had the row before it, over windows it can reach
        assert got == [(0, "present"), (0, "present"), (3, "incomplete"), (0, "incomplete")]
        # read alone, the early moment reads the archive up to it: the rows after it are left
        # out, and the gap after those came later still (no mark)
        early = training.labels_of(pa.table({"entity": ["user"], "entity_id": ["u1"],
                                             "timestamp": [T0 + 200_000]}))
        table, _ = await parallel.build(job, store, early, list(job.features), redis_url, 1)
        assert table.column("clicks__status").to_pylist() == ["present"]
    span = "0-2" if lost == "first" else "9-11"
    assert any(f"cut offsets {span} of partition 0" in r.getMessage()
               for r in caplog.records), caplog.text


async def test_a_partition_whose_only_file_is_lost_marks_every_value(
        tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Found by an outside test: a partition whose every file was removed (its cut marker
    kept) had no rows to hang its gap on, and the values it may have changed read
    ``present``. Nothing bounds when the broker had its records: every value of the topic's
    features is ``incomplete``."""
    job = parse_config({"topics": {"events": "behaviour"}, "limits": {"max_future": "1m"},
                        "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "hopping", "size": "1m", "step": "10s"}}]})
    archive = tmp_path / "archive"

    def clicks(user: str, start: int) -> list[tuple[int, dict[str, Any]]]:
        return [(start + i * 1000 + 100, {"action": "click", "user_id": user,
                                          "timestamp": start + i * 1000}) for i in range(3)]

    write_archive(archive, [*clicks("u1", T0), *clicks("u1", T0 + 300_000)], per_file=3)
    write_archive(archive, clicks("u2", T0 + 10_000), partition=1)
    (gone,) = archive.rglob(data_name(1, 0, 2))
    gone.unlink()
    labels = training.labels_of(pa.table({"entity": ["user"] * 2, "entity_id": ["u1", "u2"],
                                          "timestamp": [T0 + 330_000, T0 + 30_000]}))
    with caplog.at_level("WARNING", logger="eventpulse.archive"):
        table, stats = await parallel.build(job, ArchiveStore.open(str(archive)), labels,
                                            list(job.features), redis_url, 1)
    assert list(zip(table.column("clicks").to_pylist(),
                    table.column("clicks__status").to_pylist(), strict=True)) == [
        (3, "incomplete"), (0, "incomplete")]
    assert stats.incomplete == 2
    assert any("cut offsets 0-2 of partition 1" in r.getMessage() for r in caplog.records)


async def test_lost_records_ahead_of_a_read_mark_its_older_window(
        tmp_path: Path, redis_url: str) -> None:
    """Found by an outside test: lost records with event times ahead of a read's moment (a
    producer's clock ahead, within ``limits.max_future``) cannot be counted by its window, but
    their write moved the entity's ring forward, so the worker's read of that older window
    differed (``missing``) from the build's (``present``). Such values are ``incomplete``."""
    job = parse_config({"topics": {"events": "behaviour"}, "limits": {"max_future": "15m"},
                        "features": [
        {"name": "clicks", "topic": "events", "entity": "user", "key": "user_id",
         "aggregation": "count", "window": {"type": "hopping", "size": "1m", "step": "10s"}}]})
    clicks = [(T0 + 100, "u1", T0 + 30_000),      # u1, in the window read below
              (T0 + 200, "u2", T0 + 600_000),     # the partition's watermark moves ahead
              (T0 + 300, "u2", T0 + 601_000),
              (T0 + 400, "u1", T0 + 700_000)]     # lost: u1's ring moves to T0 + 700 s
    archive = tmp_path / "archive"
    write_archive(archive, [(broker, {"action": "click", "user_id": user, "timestamp": event})
                            for broker, user, event in clicks], per_file=3)
    (archive_file,) = archive.rglob(data_name(0, 3, 3))
    archive_file.unlink()
    labels = training.labels_of(pa.table({"entity": ["user"], "entity_id": ["u1"],
                                          "timestamp": [T0 + 60_000]}))
    table, _ = await parallel.build(job, ArchiveStore.open(str(archive)), labels,
                                    list(job.features), redis_url, 1)
    assert table.column("clicks").to_pylist() == [1]
    assert table.column("clicks__status").to_pylist() == ["incomplete"]
