"""No value of any size or shape stops a partition (outside test of issue 10, F1-F5): a worker
on a real broker and Redis gets past each, and the pipeline's last line of defence turns a
record that still raises while being combined into a dead letter without half its effect."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from eventpulse.agents.pipeline import Pipeline, RawRecord
from eventpulse.config import parse_config
from eventpulse.local.servers import TansuBroker
from eventpulse.streams.deadletter import DeadLetter
from eventpulse.streams.decode import DecodeError, RecordDecoder
from eventpulse.streams.schemas import BehaviourEvent, Record
from eventpulse.streams.topics import RecordKind
from eventpulse.tables.client import AsyncFeatureClient
from tests.conftest import WorkerProcess, unique, wait_until
from tests.test_ingestion import read_all
from tests.test_poison_records import HOUR, hour_start, produce, reached


def values_job(events: str, dead: str) -> dict[str, Any]:
    """Features that read ``v`` and ``status`` every way: a filter (gte, in), sum, last, p95."""
    def feature(name: str, aggregation: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "topic": events, "entity": "user", "key": "user_id",
                "aggregation": aggregation, "window": {"size": "1h"}, **extra}

    return {"topics": {events: "behaviour"}, "dead_letter_topic": dead, "partitions": 1,
            "features": [feature("n", "count"), feature("ones", "count", where={"v": {"in": [1]}}),
                         feature("s", "sum", value="v", where={"status": {"gte": 500}}),
                         feature("l", "last", value="v"), feature("p", "p95", value="v")]}


async def read_features(redis_url: str, config: dict[str, Any], at: int) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        reader = AsyncFeatureClient(client, parse_config(config).features, "ep")
        return {name: value.value for name, value in (await reader.get("user", "u1",
                                                                       at_ms=at)).items()}
    finally:
        await client.aclose()


async def test_f1_to_f5_records_between_valid_ones_are_dead_lettered_and_the_worker_goes_on(
        kafka: TansuBroker, redis_url: str, make_worker: Callable[..., WorkerProcess]) -> None:
    events, dead = unique("events"), unique("dead")
    now = hour_start()

    def event(i: int, **fields: Any) -> bytes:
        record = {"timestamp": now + i, "user_id": "u1", "action": "view", "status": 500, "v": 1}
        return json.dumps({**record, **fields}).encode()

    big = "1" + "0" * 400
    bad = {  # offset -> (record, reason): the outside test's F1, F2, F4, F5
        1: (b'{"timestamp": -' + big.encode() + b', "user_id": "x", "action": "click"}',
            "bad_timestamp"),
        3: (event(3)[:-1] + b', "status": ' + big.encode() + b"}", "number_out_of_range"),
        5: (event(5, v=123456789012345678901234567890), "number_out_of_range"),
        7: (event(7, v=-9223372036854775809), "number_out_of_range"),
        9: (event(9, v=1.7976931348623157e308), "number_out_of_range"),
    }
    # F3: a list or an object where `in` filters: not in the list, and otherwise applied
    stream = [bad[i][0] if i in bad else event(i, v=[1] if i == 4 else {"a": 1} if i == 6 else 1)
              for i in range(11)]
    assert b'"status": 1000' in stream[3] and stream[3].endswith(b"}")
    group = unique("values")
    config = values_job(events, dead)
    worker = make_worker(config, group).start()
    await produce(kafka.bootstrap, events, stream)
    await wait_until(lambda: reached(redis_url, group, len(stream) - 1), timeout=60,
                     message="every record applied or dead-lettered")
    assert worker.process is not None and worker.process.poll() is None, worker.log()
    assert "Crashed" not in worker.log()

    got = await read_features(redis_url, config, now + HOUR)
    assert got["n"] == 6  # offsets 0, 2, 4, 6, 8, 10
    assert got["ones"] == 4 and got["s"] == 4.0  # v == 1 at 0, 2, 8, 10
    assert got["l"] == 1 and abs(got["p"] - 1.0) <= 0.02
    letters = [DeadLetter.from_json(raw) for raw in await read_all(kafka.bootstrap, dead,
                                                                    len(bad))]
    assert {letter.offset: letter.reason for letter in letters} == {
        offset: reason for offset, (_, reason) in bad.items()}
    assert all(letter.payload() == bad[letter.offset][0] for letter in letters)


class _UncheckedDecoder(RecordDecoder):
    """A decoder with a gap (no checks after pydantic): what reaches the combiner unchecked."""

    def decode(self, raw: bytes | None, now_ms: int | None = None) -> Record | DecodeError:
        assert raw is not None
        return BehaviourEvent.model_validate(json.loads(raw))


async def test_a_record_that_raises_in_the_combiner_is_dead_lettered_without_half_its_effect(
        aredis: aioredis.Redis, redis_url: str) -> None:
    events = unique("events")
    config = values_job(events, "dead")
    pipeline = Pipeline(parse_config(config), aredis, "ep", unique("g"))
    await pipeline.start()
    pipeline.decoders[events] = _UncheckedDecoder(RecordKind.BEHAVIOUR)
    now = hour_start()
    # v = 10**400 is counted by n and ones before s's float() of it overflows: no trace may
    # remain; after the first, the batch is combined again trying each record on its own
    records = [{"timestamp": now + i, "user_id": "u1", "action": "view", "status": 500,
                "v": 10**400 if i in (1, 3, 4) else 1} for i in range(6)]
    letters: list[tuple[str, DeadLetter]] = []

    async def sink(batch: list[tuple[str, DeadLetter]]) -> None:
        letters.extend(batch)

    passes: list[bool] = []
    combine_once = pipeline.ingest._combine_once

    async def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(kwargs.get("isolate", False))
        return await combine_once(*args, **kwargs)

    pipeline.ingest._combine_once = counted  # type: ignore[method-assign]
    result = await pipeline.process([RawRecord(events, 0, i, json.dumps(r).encode())
                                     for i, r in enumerate(records)], sink)
    assert result.offsets == {(events, 0): 5}
    assert passes == [False, True]  # two passes for three bad records, the second isolating
    assert [(letter.offset, letter.reason) for _, letter in letters] == [
        (1, "internal_error"), (3, "internal_error"), (4, "internal_error")]
    assert all("OverflowError while combining" in letter.detail for _, letter in letters)
    got = await read_features(redis_url, config, now + HOUR)
    assert got["n"] == 3 and got["ones"] == 3 and got["s"] == 3.0 and got["l"] == 1
