"""``eventpulse replay`` runs on the records' own clock: at the end of the accepted range (year
9999) it reads its features at the last moment a read can name instead of failing (its clock
ran a second past it), and an input whose every record is refused still reports them (found by
outside testing)."""

from __future__ import annotations

import json
from pathlib import Path

from eventpulse.agents.replay import replay
from eventpulse.config import parse_config
from eventpulse.durations import MAX_EPOCH_MS


async def test_a_replay_at_the_end_of_year_9999_reads_its_features(redis_url: str,
                                                                   tmp_path: Path) -> None:
    job = parse_config({
        "topics": {"events": "behaviour"},
        "limits": {"max_future": "1000000d"},
        "features": [{"name": "n", "topic": "events", "entity": "user", "key": "user_id",
                      "aggregation": "count", "window": {"size": "1m"}}]})
    first = MAX_EPOCH_MS - 80_999  # every 10 s, the last in the last second there is
    records = [{"topic": "events", "record": {"timestamp": first + i * 10_000, "user_id": "u",
                                              "action": "click"}} for i in range(9)]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    report = await replay(job, redis_url, path, extra_ms=1_000)
    assert report.dead_letters == {}
    value = report.features["user"]["u"]["n"]
    # read at the last moment there is: the latest minute closed by then ends 59.999 s before
    # it and holds the first three records
    end = MAX_EPOCH_MS - MAX_EPOCH_MS % 60_000
    assert (value.value, value.window_end_ms, value.status) == (3, end, "present")


async def test_a_replay_of_refused_records_only_reports_them(redis_url: str,
                                                             tmp_path: Path) -> None:
    job = parse_config({
        "topics": {"events": "behaviour"},
        "features": [{"name": "n", "topic": "events", "entity": "user", "key": "user_id",
                      "aggregation": "count", "window": {"size": "1m"}}]})
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps({"topic": "events", "record": r}) for r in [
        {"timestamp": -1, "user_id": "u", "action": "click"},
        {"timestamp": "yesterday", "user_id": "u", "action": "click"},
        {"user_id": "u", "action": "click"}]))
    report = await replay(job, redis_url, path)
    assert report.dead_letters == {"bad_timestamp": 2, "missing_timestamp": 1}
