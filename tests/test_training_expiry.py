"""Key expiry in training sets: the live worker's keys expire ``ttl`` after it last wrote them, and
a training set says ``missing`` where the live read did, not the empty windows of a key that
lives for the build (eventpulse/offline/expiry.py).

Real worker, broker and Redis, TTLs of seconds: reads while the key lives, after it expired,
after a new record wrote it afresh (with one feature only), and for an entity not read in
between (its key expired between two writes); then training sets for exactly those reads."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import redis.asyncio as aioredis

from eventpulse.archive.store import ArchiveStore
from eventpulse.config import parse_config
from eventpulse.local.servers import TansuBroker
from eventpulse.offline import consistency, training
from eventpulse.offline.readlog import ServedReadLog
from eventpulse.tables.client import AsyncFeatureClient, FeatureValue
from eventpulse.tables.store import FeatureStore
from tests.archive_helpers import count_rows, produce_tracked
from tests.conftest import WorkerProcess, unique, wait_until

WINDOW = {"type": "tumbling", "size": "1s"}
#: the key lives as long as its longest TTL: 6 s while the sum has an entry
COUNT_TTL_S, SUM_TTL_S = 4, 6


def job_config(events: str, logins: str, reads: str) -> dict[str, Any]:
    return {"topics": {events: "behaviour", logins: "behaviour", reads: "feature_read"},
            "partitions": 2, "features": [
        {"name": "events_1s", "topic": events, "entity": "user", "key": "user_id",
         "aggregation": "count", "window": WINDOW, "ttl": f"{COUNT_TTL_S}s"},
        {"name": "watch_sum_1s", "topic": events, "entity": "user", "key": "user_id",
         "aggregation": "sum", "value": "watch_seconds", "window": WINDOW,
         "ttl": f"{SUM_TTL_S}s"},
        # never fed here: another topic's feature of the same keys
        {"name": "logins_1s", "topic": logins, "entity": "user", "key": "user_id",
         "aggregation": "count", "window": WINDOW, "ttl": "20s"},
    ]}


def event(user: str, watch: bool, age_ms: int = 0) -> dict[str, Any]:
    record: dict[str, Any] = {"timestamp": int(time.time() * 1000) - age_ms, "user_id": user,
                              "item_id": "i1", "action": "view", "device": "web"}
    if watch:
        record["watch_seconds"] = 30
    return record


@pytest.mark.slow
async def test_a_training_set_reads_missing_where_the_live_key_had_expired(
        kafka: TansuBroker, redis_url: str, tmp_path: Path,
        make_worker: Callable[..., WorkerProcess]) -> None:
    events, logins, reads = unique("events"), unique("logins"), unique("reads")
    group = unique("expiry")
    config = job_config(events, logins, reads)
    archive = tmp_path / "archive"
    worker = make_worker(config, group, EVENTPULSE_ARCHIVE_URL=str(archive),
                         EVENTPULSE_ARCHIVE_IDLE_FLUSH_MS="500").start()
    redis = aioredis.Redis.from_url(redis_url)
    feature_store = FeatureStore(redis, "ep", group)
    last: dict[str, int] = {}
    produced = 0
    logged: list[tuple[str, int, str, dict[str, FeatureValue]]] = []

    async def produce(items: list[dict[str, Any]], wait: bool = True) -> float:
        """Send ``items``; when the broker had them all (their broker times are earlier)."""
        nonlocal produced
        for topic, partition, offset in await produce_tracked(
                kafka.bootstrap, [(events, item) for item in items]):
            last[f"{topic}:{partition}"] = max(offset, last.get(f"{topic}:{partition}", -1))
        sent = time.time()
        produced += len(items)
        if wait:
            await wait_until(caught_up, timeout=60, message="the worker applying the records")
        return sent

    async def caught_up() -> bool:
        positions = await feature_store.positions(list(last))
        return all(p is not None and p.offset >= last[tp] for tp, p in positions.items())

    async def read(step: str, users: list[str], until: float | None = None) -> None:
        if until is not None:
            await asyncio.sleep(max(0.0, until - time.time()))
        at = int(time.time() * 1000)
        for user, values in (await client.get_many("user", users, at_ms=at)).items():
            logged.append((user, at, step, values))

    await produce([event("u0", watch=True)])  # the worker up and assigned its partitions
    client = await AsyncFeatureClient.connect(redis_url)
    log = ServedReadLog(kafka.bootstrap, reads, share=1.0)  # for the consistency report
    log.attach(client)
    since = int(time.time() * 1000)
    started = time.time()
    sent = await produce([event(u, watch=True) for u in ("u1", "u2", "u3") for _ in range(3)])
    applied = time.time()
    # the timings below need the broker and the worker quick (broker times within 0.8 s)
    assert sent - started < 0.8 and applied - started < 2.5, (sent - started, applied - started)
    await read("written", ["u1", "u2", "u3"])
    # 4.3-5.1 s after the records: past the count's TTL, within the sum's (the key's PX)
    await read("within the longest ttl", ["u1", "u2"], until=sent + 4.3)
    # at least 6.3 s after the worker applied them and 7-7.8 s after the broker had them:
    # every key gone
    await read("expired", ["u1", "u2"], until=max(sent + 7, applied + 6.3))
    # u1 and u3 come back without a value for the sum: a fresh key holds the count alone. u3's
    # key expired unread; its record's event time trails its broker time by 5 s, too little
    # for the write to drop the sum's old entry (older than its TTL in event time): the replay
    # must know the key expired (sent first: the partition's watermark is not yet u1's)
    await produce([event("u3", watch=False, age_ms=5_000), event("u1", watch=False)])
    await read("written again", ["u1", "u2", "u3"])
    # u4's records wait 1.5 s for a stopped worker: its key lives 1.5 s longer than its records'
    # broker times say, and a read in between is served from it
    assert worker.process is not None
    os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        late = await produce([event("u4", watch=True)], wait=False)
        await asyncio.sleep(1.5)
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    await wait_until(caught_up, timeout=60, message="the worker applying the records")
    for after in (0.5, 0.8, 1.1):  # past the TTL after the broker had them, not after the write
        await read("written late", ["u4"], until=late + SUM_TTL_S + after)
    # u2's key expired long ago; a record comes in and is read before the stopped worker
    # applies it: served missing
    os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        await produce([event("u2", watch=True)], wait=False)
        await read("not yet applied", ["u2"])
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    await wait_until(caught_up, timeout=60, message="the worker applying the records")
    # u5's second record comes 5 s after its first (within the 6 s TTL, by broker times) but
    # waits 3 s for a stopped worker: the live key expired before that write, which started a
    # fresh key with the count alone; a replay that writes it as the broker had it keeps the sum.
    # u6 the same, not read in between: the replay brings it up before the gap all the same
    # (u5's read is a moment between its records)
    first = await produce([event("u5", watch=True), event("u6", watch=True)])
    applied = time.time()
    await read("written", ["u5"])
    await asyncio.sleep(max(0.0, first + 5.0 - time.time()))
    os.kill(worker.process.pid, signal.SIGSTOP)
    try:
        await produce([event("u5", watch=False), event("u6", watch=False)], wait=False)
        await asyncio.sleep(3.0)
    finally:
        os.kill(worker.process.pid, signal.SIGCONT)
    await wait_until(caught_up, timeout=60, message="the worker applying the records")
    assert applied - first < 1.5, applied - first  # the first write within 1.5 s: 7.5 s < 8 s
    await read("renewed late", ["u5", "u6"])
    until = int(time.time() * 1000) + 1
    await client.aclose()
    log.close()
    await wait_until(lambda: count_rows(pafs.LocalFileSystem(), str(archive))
                     >= produced + len(logged), timeout=60,
                     message=f"every record archived ({produced} + {len(logged)})")
    worker.stop()

    both = {"events_1s", "watch_sum_1s"}
    statuses = {(user, step): {name: v.status for name, v in values.items() if name in both}
                for user, _, step, values in logged}
    assert {values["logins_1s"].status for *_, values in logged} == {"missing"}
    # what was served (the premise of the comparison below)
    assert statuses["u1", "written"] == dict.fromkeys(both, "present")
    assert statuses["u1", "within the longest ttl"] == dict.fromkeys(both, "present")
    assert statuses["u1", "expired"] == dict.fromkeys(both, "missing")
    assert statuses["u1", "written again"] == {"events_1s": "present", "watch_sum_1s": "missing"}
    assert statuses["u2", "written again"] == dict.fromkeys(both, "missing")
    assert statuses["u3", "written again"] == {"events_1s": "present", "watch_sum_1s": "missing"}
    assert statuses["u4", "written late"] == dict.fromkeys(both, "present")
    assert statuses["u2", "not yet applied"] == dict.fromkeys(both, "missing")
    for user in ("u5", "u6"):
        assert statuses[user, "renewed late"] == {"events_1s": "present",
                                                  "watch_sum_1s": "missing"}

    job = parse_config(config)
    labels = training.labels_of(pa.table({
        "entity": ["user"] * len(logged), "entity_id": [u for u, _, _, _ in logged],
        "timestamp": [at for _, at, _, _ in logged]}))
    store = ArchiveStore.open(str(archive))

    async def build(names: list[str] | None, settle_ms: int) -> list[dict[str, Any]]:
        specs = training.choose_features(job, labels, names)
        table, _ = await training.build(job, store, labels, specs, redis, settle_ms=settle_ms)
        return table.to_pylist()  # type: ignore[no-any-return]

    # no settle time: the worker wrote each record as the broker had it (u4's 1.5 s late)
    for (user, at, step, served), row in zip(logged, await build(None, 0), strict=True):
        if step == "not yet applied":  # a worker caught up had the record: a new key
            assert {row[n + training.STATUS_SUFFIX] for n in both} == {"present"}
            continue
        if step == "renewed late":  # the worker, 3 s late, found the key gone: not modelled
            assert {row[n + training.STATUS_SUFFIX] for n in both} == {"present"}
            continue
        for name, value in served.items():
            status = "missing" if step == "written late" else value.status
            assert (row[name], row[name + training.STATUS_SUFFIX]) == (value.value, status), (
                f"{user} {name} at {at} ({step})")

    # a worker up to 3 s behind may have written the last records 3 s later: 7-8.8 s after
    # them the key may live on (6 s TTL); nothing else is in doubt
    for (user, _, step, served), row in zip(logged, await build(None, 3_000), strict=True):
        got = {row[n + training.STATUS_SUFFIX] for n in both}
        if step in ("expired", "written late", "not yet applied"):
            # the last: a key the record created afresh within the settle time, which a
            # worker behind by that much had not: it read none
            assert got == {"lag_sensitive"}, f"{user} ({step})"
        elif step == "within the longest ttl":
            assert got == {"present"}, f"{user} ({step})"
        else:  # records of the last 3 s are in doubt too (settle), and so is u2's key
            assert got <= {v.status for v in served.values()} | {"lag_sensitive"}, user
        if (user, step) in (("u3", "written again"), ("u5", "renewed late"),
                            ("u6", "renewed late")):
            # 7-8 s between u3's writes: the live key may have expired before the second
            # (6 s TTL, 3 s settle) or not; the sum, not written since, may be gone
            assert row["watch_sum_1s" + training.STATUS_SUFFIX] == "lag_sensitive"

    # the count alone: the sum is replayed too (same topic, same keys: the key's TTL is the
    # longest of both), the logins' feature, of another topic, is not: writes the build cannot
    # see could have kept a key alive, or dropped an entry older than its TTL. Where that
    # matters the build cannot tell (lag_sensitive); elsewhere the count reads as served
    subset = await build(["events_1s"], 0)
    for (user, at, step, served), row in zip(logged, subset, strict=True):
        value = served["events_1s"]
        got = (row["events_1s"], row["events_1s" + training.STATUS_SUFFIX])
        if step in ("expired", "written late"):
            assert got == (value.value, "lag_sensitive"), f"{user} ({step})"
        elif step == "not yet applied":
            assert got[1] in ("present", "lag_sensitive"), user  # the record counted
        elif step == "written" or (step, user) == ("written again", "u1"):
            assert got == (value.value, value.status), f"{user} at {at} ({step})"
        else:  # u2: its key after it surely expired; u3: an entry older than the TTL
            assert got in ((value.value, value.status), (value.value, "lag_sensitive")), (
                f"{user} at {at} ({step})")
    assert "watch_sum_1s" not in subset[0] and "logins_1s" not in subset[0]

    # the consistency report: every logged read recomputed; u4's reads differ, attributed to
    # the worker's lag (its key outlived its records' broker times by the 1.5 s), and u5's and
    # u6's sums (a write at least 6 - 5 s late found the key expired), no other
    reports = await consistency.report(job, store, reads, since, until, redis)
    await redis.aclose()
    assert set(reports) == {*both, "logins_1s"}
    assert reports["logins_1s"].exact == reports["logins_1s"].rows == len(logged)  # no entry
    for name in both:
        rep = reports[name]
        differing = 4 if name == "events_1s" else 6
        assert rep.rows == len(logged)
        assert rep.exact == rep.rows - differing, (name, rep)
        assert rep.causes == {"not_yet_applied": differing, "applied_after_moment": 0,
                              "applied_order": 0, "archive_behind": 0, "archive_gap": 0,
                              "unexplained": 0}, (
            name, rep)
        assert 1_100 <= rep.max_lag_ms <= 1_500, (name, rep)
