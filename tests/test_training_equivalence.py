"""The training set's per-entity replay gives exactly what the reference replay gives (every
record in offset order, applied at every label moment): on random archives with several
partitions (one joined mid-stream), late records, records the broker got late, event-time ties
between partitions, two key families of one entity type, a composite key, and label moments
both dense (many rows per moment, moments a few ms apart) and sparse."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import redis.asyncio as aioredis

from eventpulse.archive.layout import KindLayout
from eventpulse.archive.segment import CutRules, PartitionSegmenter
from eventpulse.archive.store import ArchiveStore
from eventpulse.archive.writer import encode
from eventpulse.config import parse_config
from eventpulse.offline import entityindex, reference, training
from eventpulse.offline.ties import ORDER_DEPENDENT
from eventpulse.streams.decode import RecordDecoder
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.batch import BatchCombiner
from eventpulse.tables.client import FeatureValue
from eventpulse.tables.spec import CompiledFeature

T0 = 1_796_000_000_000
USERS = [f"u{i}" for i in range(15)]
ITEMS = [f"i{i}" for i in range(8)]
WINDOW = {"type": "hopping", "size": "1m", "step": "5s", "lateness": "10s"}
HOUR = {"type": "hopping", "size": "10m", "step": "1m", "lateness": "30s"}


def job() -> Any:
    def f(name: str, entity: str, key: str | list[str], aggregation: str,
          window: dict[str, str] = WINDOW, **more: Any) -> dict[str, Any]:
        return {"name": name, "topic": "events", "entity": entity, "key": key,
                "aggregation": aggregation, "window": window, **more}

    return parse_config({"topics": {"events": "behaviour"}, "features": [
        f("clicks", "user", "user_id", "count", where={"action": "click"}),
        f("events_10m", "user", "user_id", "count", HOUR),
        f("watch_sum", "user", "user_id", "sum", value="watch"),
        f("watch_min", "user", "user_id", "min", value="watch"),
        f("last_device", "user", "user_id", "last", value="device"),
        # the same entity type keyed by another field: a second family writing the same maps
        f("sessions_seen", "user", "session_id", "count"),
        f("watch_mean", "item", "item_id", "mean", HOUR, value="watch"),
        f("watch_max", "item", "item_id", "max", value="watch"),
        f("viewers", "item", "item_id", "distinct", value="user_id"),
        f("watch_p95", "item", "item_id", "p95", value="watch"),
        f("click_rate", "item", "item_id", "ratio", numerator={"action": "click"}),
        # a field no other feature reads (the fast path builds records of the fields read)
        f("v1_views", "item", "item_id", "count",
          where={"schema_version": {"gte": 1}, "action": "view"}),
        f("pair_clicks", "pair", ["user_id", "item_id"], "count", where={"action": "click"}),
        # a composite key's `last`: its ties are found by event time alone, then row by row
        f("pair_device", "pair", ["user_id", "item_id"], "last", value="device"),
    ]})


def write_archive(root: Path, rng: random.Random, n: int) -> tuple[int, int]:
    """3 partitions (the last joined mid-stream: its offsets start at 40; the second's first
    two records refused: its archive starts at 0, its first row at 2) of random behaviour
    events; returns the span of broker times."""
    layout, decoder = KindLayout(RecordKind.BEHAVIOUR), RecordDecoder(RecordKind.BEHAVIOUR)
    store = ArchiveStore.open(str(root))
    clock = [T0, T0, T0]
    last_broker = T0
    segmenters = []
    for partition in range(3):
        first = 40 if partition == 2 else 0
        segmenter = PartitionSegmenter("events", partition, CutRules(max_records=n))
        segmenter.begin(first, None)
        segmenters.append((segmenter, first))
    offsets = [first + (2 if partition == 1 else 0)
               for partition, (_, first) in enumerate(segmenters)]
    for _ in range(n):
        partition = rng.randrange(3)
        # whole seconds: event-time ties within and between partitions (``last`` keeps the
        # later applied, so the order between partitions matters)
        clock[partition] += rng.choice([0, 1_000, 1_000, 2_000])
        ts = clock[partition] - rng.choice([0, 0, 0, 3_000, 8_000, 25_000, 90_000])  # late ones
        # mostly just after the event; some reached the broker much later
        broker = clock[partition] + rng.choice([5, 5, 5, 700, 30_000])
        last_broker = max(last_broker, broker)
        record: dict[str, Any] = {
            "timestamp": ts, "user_id": rng.choice(USERS), "item_id": rng.choice(ITEMS),
            "action": rng.choice(["click", "view", "watch"]),
            "device": rng.choice(["ios", "android", "web"]),
            "session_id": rng.choice([*USERS[:5], None]),  # shares ids with user_id
            "watch": rng.randint(1, 600)}  # integers: sums are exact whatever their order
        decoded = decoder.decode(json.dumps(record).encode(), broker)
        assert not hasattr(decoded, "reason"), decoded
        segmenter, _ = segmenters[partition]
        offset = offsets[partition]
        offsets[partition] += rng.choice([1, 1, 1, 2])  # gaps: refused records are not archived
        segmenter.append(offset, 10, ts, layout.row(decoded, partition, offset, broker))  # type: ignore[arg-type]
    for segmenter, _ in segmenters:
        if segmenter.is_open:
            for name, data, _ in encode(layout, segmenter.close()):
                store.put(name, data)
    return T0, last_broker


def labels(rng: random.Random, start: int, end: int, n: int) -> training.Labels:
    rows: list[tuple[str, str, int]] = []
    dense = [rng.randint(start, end) for _ in range(4)]
    while len(rows) < n:
        entity = rng.choice(["user", "user", "item", "pair", "device"])  # device: no feature
        entity_id = {"user": rng.choice(USERS), "item": rng.choice(ITEMS),
                     "pair": f"{rng.choice(USERS)}|{rng.choice(ITEMS)}",
                     "device": "ios"}[entity]
        if rng.random() < 0.5:  # dense: a few moments, many rows each, a few ms apart
            at = rng.choice(dense) + rng.choice([0, 0, 1, 2, 700])
        else:  # sparse: anywhere, and before the first record and after the last
            at = rng.randint(start - 60_000, end + 120_000)
        rows.append((entity, entity_id, at))
    table = pa.table({"entity": [r[0] for r in rows], "entity_id": [r[1] for r in rows],
                      "timestamp": [r[2] for r in rows]})
    return training.labels_of(table)


def random_case(root: Path, seed: int) -> tuple[ArchiveStore, Any, training.Labels]:
    """An archive of 3,000 random records under ``root``, the job, and 1,500 label rows."""
    rng = random.Random(seed)
    start, end = write_archive(root, rng, 3_000)
    return ArchiveStore.open(str(root)), job(), labels(rng, start, end, 1_500)


@pytest.mark.parametrize(("seed", "settle_ms"), [(1, 0), (2, 1_000), (3, 2_500), (4, 0)])
async def test_per_entity_replay_equals_the_reference(tmp_path: Path, redis_url: str,
                                                      seed: int, settle_ms: int) -> None:
    store, spec, chosen = random_case(tmp_path / "archive", seed)
    specs = list(spec.features)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        fast, fast_stats = await training.compute(spec, store, chosen, specs, redis,
                                                  settle_ms=settle_ms)
        slow, slow_stats = await reference.compute(spec, store, chosen, specs, redis,
                                                   settle_ms=settle_ms)
    finally:
        await redis.aclose()
    # the reference replays partitions in the fast path's order, and does not mark ties:
    # the values a tie decided, found here by brute force, are the ones the fast path marks
    decided = tie_decided(spec, store, chosen, slow, specs)
    for row, name in decided:
        slow[row][name] = slow[row][name]._replace(status=ORDER_DEPENDENT)  # type: ignore[index]
    assert fast == slow
    assert (fast_stats.events, fast_stats.rows, fast_stats.lag_sensitive,
            fast_stats.order_dependent) == (slow_stats.events, slow_stats.rows,
                                            slow_stats.lag_sensitive, len(decided))
    # ties between partitions that decided a value: the case is exercised (a composite key's
    # too, in the draw of seed 4)
    assert {name for _, name in decided} == ({"last_device", "pair_device"} if seed == 4
                                             else {"last_device"})
    # the data exercised what it is meant to
    statuses = {v.status for row in slow if row for v in row.values()}
    assert {"present", "missing", "partial"} <= statuses
    assert settle_ms == 0 or "lag_sensitive" in statuses
    assert sum(slow_stats.late.values()) > 0
    assert sum(1 for row in slow if row and row.get("last_device") is not None
               and row["last_device"].value is not None) > 100
    assert sum(1 for row in slow if row and row.get("v1_views") is not None
               and row["v1_views"].value) > 100


def tie_decided(spec: Any, store: ArchiveStore, chosen: training.Labels,
                out: list[dict[str, FeatureValue] | None], specs: list[Any],
                ) -> list[tuple[int, str]]:
    """(row, feature) of the `last` values read (``out``) that a tie decided, by brute force:
    of the records the broker had by the row's moment, those the feature takes in the window
    read; the newest event time among them; the value of each partition's last record at that
    time: more than one partition, different values."""
    cutoffs = chosen.cutoffs if chosen.cutoffs is not None else chosen.times
    streams = training.load_streams(spec, store, specs, max(cutoffs))
    for stream in streams:
        stream.need()
    found = []
    for feature in (CompiledFeature(s, i) for i, s in enumerate(specs)):
        if feature.aggregation != "last":
            continue
        for row, values in enumerate(out):
            value = values.get(feature.name) if values else None
            if value is None or value.status not in ("present", "stale", "partial"):
                continue
            taken: list[tuple[int, str, Any]] = []  # (event time, partition, value)
            for stream in streams:
                if stream.topic != feature.spec.topic:
                    continue
                for r, record in enumerate(stream.records):
                    view = record
                    ts = view["timestamp"]
                    if (stream.reach[r] <= cutoffs[row]
                            and feature.entity_id(view) == chosen.ids[row]
                            and value.window_start_ms <= ts < value.window_end_ms
                            and ts >= stream.watermarks[r] - feature.lateness
                            and (feature.is_match is None or feature.is_match(view))
                            and view.get(feature.spec.value) is not None):
                        taken.append((ts, stream.tp, view[feature.spec.value]))
            if not taken:
                continue
            newest = max(ts for ts, _, _ in taken)
            last_of = {tp: v for ts, tp, v in taken if ts == newest}  # offset order: the last
            if len(last_of) > 1 and len({repr(v) for v in last_of.values()}) > 1:
                found.append((row, feature.name))
    return found


def test_gaps_are_found_between_the_moments_an_entitys_records_count_from() -> None:
    """Where the replay splits an entity's bring-up (the live key may have expired in between):
    between cuts, from the highest reach before to the lowest after (within a cut, records are
    in partition order, not in time order)."""
    def records(cuts: list[int], reaches: list[int]) -> entityindex.EntityRecords:
        n = len(cuts)
        return entityindex.EntityRecords.of_lists(cuts, [None] * n, [0] * n, [""] * n, reaches)

    found = records([0, 0, 1, 3, 3, 4], [10, 5, 20, 100, 71, 90])
    assert entityindex.gaps(found, 50) == [1]  # 71 - 20; not 90 - 100
    assert entityindex.gaps(found, 52) == []
    assert entityindex.gaps(found, 10) == [0, 1]
    assert entityindex.gaps(records([2], [7]), 0) == []


async def test_the_replays_keys_live_for_the_build(tmp_path: Path, redis_url: str) -> None:
    """The worker's keys expire on Redis' clock; a build replays hours of archive in seconds and
    models the expiry on the archive's time (expiry.py), so its own keys live a lease that
    outlasts the build: a build slower than a TTL lost keys (found by an outside test: a 38 s
    build, TTLs of seconds)."""
    store, spec, chosen = random_case(tmp_path / "archive", 5)
    specs = list(spec.features)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        for replay in (training.compute, reference.compute):
            await replay(spec, store, chosen, specs, redis, namespace="kept")
            keys = [key async for key in redis.scan_iter("kept:*")]
            written = [key for key in keys if key.endswith(b":f") or b":hll:" in key]
            assert len(written) > 20
            # every key, fences and the feature registry too: a build killed before it drops
            # its namespace leaves nothing for longer (found by an outside test: three did)
            assert any(b":fence:" in key for key in keys) and b"kept:features" in keys
            ttls = {key: await redis.pttl(key) for key in keys}
            assert all(training.KEY_LEASE_MS - 60_000 < ttl <= training.KEY_LEASE_MS
                       for ttl in ttls.values()), ttls
            await training.drop_namespace(redis, "kept")
    finally:
        await redis.aclose()


async def test_a_composite_key_on_one_topic_beside_a_plain_key_on_another(
        tmp_path: Path, redis_url: str) -> None:
    """Records are made only for the rows some feature needs; a family indexed record by
    record (a composite key) reads only its own topic's records (found by an outside test:
    it read every topic's, and crashed on another topic's rows that had none)."""
    import shutil

    store, _, chosen = random_case(tmp_path / "archive", 8)
    shutil.copytree(tmp_path / "archive" / "topic=events", tmp_path / "archive" / "topic=mirror")
    spec = parse_config({"topics": {"events": "behaviour", "mirror": "behaviour"}, "features": [
        {"name": "pair_clicks", "topic": "events", "entity": "pair", "key": ["user_id", "item_id"],
         "aggregation": "count", "where": {"action": "click"}, "window": WINDOW},
        {"name": "item_views", "topic": "mirror", "entity": "item", "key": "item_id",
         "aggregation": "count", "where": {"action": "view"}, "window": WINDOW}]})
    specs = list(spec.features)
    redis = aioredis.Redis.from_url(redis_url)
    try:
        fast, _ = await training.compute(spec, store, chosen, specs, redis)
        slow, _ = await reference.compute(spec, store, chosen, specs, redis)
    finally:
        await redis.aclose()
    assert fast == slow
    assert sum(1 for row in fast if row and row.get("pair_clicks") is not None
               and row["pair_clicks"].value) > 20
    assert sum(1 for row in fast if row and row.get("item_views") is not None
               and row["item_views"].value) > 20


async def test_a_partition_whose_first_records_were_refused_is_read_from_its_start(
        tmp_path: Path, redis_url: str) -> None:
    """Refused records (dead letters) have offsets and no rows: a partition whose first records
    were refused is archived from offset 0 (its file's name says so) although its first row is
    later. The worker read it from its start and served ``present``; the build took it for a
    partition joined mid-stream and said ``partial`` (found by an outside test). An archive
    starting at offset 3 (joined mid-stream) is ``partial``, as the worker's values are."""
    layout, decoder = KindLayout(RecordKind.BEHAVIOUR), RecordDecoder(RecordKind.BEHAVIOUR)
    spec = job()
    specs = [f for f in spec.features if f.name == "clicks"]
    chosen = training.labels_of(pa.table({"entity": ["user"], "entity_id": ["u0"],
                                          "timestamp": [T0 + 10_000]}))
    redis = aioredis.Redis.from_url(redis_url)
    try:
        for begin, refused, status in ((0, 2, "present"), (3, 0, "partial")):
            # the worker's combiner: refused records advance the offset (a None record)
            combiner = BatchCombiner("ns", [CompiledFeature(f, 0) for f in specs],
                                     {"events:0": None}, shards=1)
            records: list[tuple[int, tuple[Any, ...] | None]] = []
            for k in range(refused + 5):
                offset, ts = begin + k, T0 + 1_000 * k
                record = None if k < refused else decoder.decode(json.dumps(
                    {"timestamp": ts, "user_id": "u0", "action": "click"}).encode(), ts + 5)
                combiner.add("events:0", "events", offset, record)
                records.append((offset, None if record is None else layout.row(
                    record, 0, offset, ts + 5)))  # type: ignore[arg-type]
            assert (combiner.observed_since is not None) == (status == "partial")
            # the archive of the same records
            store = ArchiveStore.open(str(tmp_path / f"archive-{begin}"))
            segmenter = PartitionSegmenter("events", 0, CutRules(max_records=100))
            segmenter.begin(begin, None)
            for offset, row in records:  # as the archive service does: refused ones too
                segmenter.append(offset, 10, None if row is None else row[0], row)
            for name, data, _ in encode(layout, segmenter.close()):
                store.put(name, data)
            for replay in (training.compute, reference.compute):
                out, _ = await replay(spec, store, chosen, specs, redis)
                found = out[0]
                assert found is not None
                assert (found["clicks"].value, found["clicks"].status) == (5, status), replay
    finally:
        await redis.aclose()
