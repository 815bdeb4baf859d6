"""``eventpulse replay``: the worker's pipeline over a recorded file, in event time.

It runs the same :class:`Pipeline` (decoding, features in Redis, the alert engine) as the live
worker, against a private throw-away Redis, so that on-call can tune thresholds on real data before
deploying. Time is the records' event time: each second of it is one batch followed by one clock
tick, as the live worker ticks once per wall second.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from eventpulse.agents.pipeline import Pipeline, RawRecord
from eventpulse.alerts import message
from eventpulse.alerts.state import Transition
from eventpulse.config import JobConfig
from eventpulse.durations import MAX_EPOCH_MS, MIN_EPOCH_MS
from eventpulse.redisconn import connect_async
from eventpulse.streams.deadletter import DeadLetter
from eventpulse.streams.schemas import to_epoch_ms
from eventpulse.tables.client import FeatureValue

TICK_MS = 1000


class ReplayInputError(ValueError):
    """A line of the input file is not a ``{"topic": ..., "record": ...}`` object; the message
    names the file and the line."""


def read_records(path: Path) -> Iterator[tuple[str, bytes, int | None]]:
    """Lines of ``{"topic": "events", "record": {...}}`` -> (topic, raw bytes, event time)."""
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                wrapper = json.loads(line)
                topic, record = wrapper["topic"], wrapper["record"]
            except (ValueError, KeyError, TypeError):
                raise ReplayInputError(f"{path}:{number}: expected a JSON object "
                                       '{"topic": ..., "record": {...}} on each line') from None
            if not isinstance(topic, str):
                raise ReplayInputError(f"{path}:{number}: \"topic\" must be a string")
            raw = record.encode() if isinstance(record, str) else json.dumps(record).encode()
            ts = None
            if isinstance(record, dict) and "timestamp" in record:
                try:
                    ts = to_epoch_ms(record["timestamp"])
                except ValueError:
                    ts = None
            yield topic, raw, ts


class ReplayReport:
    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.dead_letters: dict[str, int] = {}
        self.entities: dict[str, set[str]] = {}
        self.features: dict[str, dict[str, dict[str, FeatureValue]]] = {}


async def replay(job: JobConfig, redis_url: str, path: Path, extra_ms: int = 0,
                 namespace: str = "replay") -> ReplayReport:
    report = ReplayReport()
    client = connect_async(redis_url)
    # the replay's clock: the records' own time, never past the last moment a read or an alert
    # can be stamped with
    clock_ms = MIN_EPOCH_MS
    pipeline = Pipeline(job, client, namespace, "replay", check_clock=False,
                        clock=lambda: clock_ms)
    await pipeline.start()
    entity_of = {f.name: f.entity for f in job.features}

    async def dead(letters: list[tuple[str, DeadLetter]]) -> None:
        for _, letter in letters:
            report.dead_letters[letter.reason] = report.dead_letters.get(letter.reason, 0) + 1

    async def run_batch(batch: list[RawRecord], batch_clock: int) -> None:
        nonlocal clock_ms
        clock_ms = min(batch_clock, MAX_EPOCH_MS)
        result = await pipeline.process(batch, dead)
        report.transitions += result.transitions
        for name, ids in result.touched.items():
            report.entities.setdefault(entity_of[name], set()).update(ids)
        report.transitions += await pipeline.tick(batch_clock)

    batch: list[RawRecord] = []
    second: int | None = None
    offset = -1
    for topic, raw, ts in read_records(path):
        offset += 1
        if ts is not None and second is not None and ts // TICK_MS > second and batch:
            await run_batch(batch, max(clock_ms, (second + 1) * TICK_MS))
            batch = []
        if ts is not None:
            second = max(second or 0, ts // TICK_MS)
        batch.append(RawRecord(topic, 0, offset, raw))
    if batch:  # records with no usable time too: refused, they are counted as dead letters
        await run_batch(batch, clock_ms if second is None
                        else max(clock_ms, (second + 1) * TICK_MS))
    end = min(clock_ms + extra_ms, MAX_EPOCH_MS)
    while clock_ms < end:
        clock_ms = min(end, clock_ms + TICK_MS)
        report.transitions += await pipeline.tick(clock_ms)
    for entity, ids in report.entities.items():
        report.features[entity] = await pipeline.reader.get_many(
            entity, sorted(ids), [f.name for f in job.features if f.entity == entity], clock_ms)
    await client.aclose()
    return report


def run_replay(job: JobConfig, path: Path, extra_ms: int, echo: Callable[[str], None],
               redis_url: str | None = None) -> ReplayReport:
    """Run on a private Redis (started here unless one is given) and print the report."""
    if redis_url is not None:
        report = asyncio.run(replay(job, redis_url, path, extra_ms))
    else:
        from eventpulse.local.servers import LocalRedis  # only here: replay's private Redis

        with LocalRedis() as redis:
            report = asyncio.run(replay(job, redis.url, path, extra_ms))
    print_report(job, report, echo)
    return report


def print_report(job: JobConfig, report: ReplayReport, echo: Callable[[str], None]) -> None:
    rules = {rule.name: rule for rule in job.alerts.rules}
    echo("== alert timeline (event time) ==")
    # in time order (decided batch by batch, then by the clock's ticks); ties keep their order
    for t in sorted(report.transitions, key=lambda t: t.at_ms):
        rule = rules.get(t.rule)
        if rule is None:
            echo(f"{_iso(t.at_ms)} {t.kind.value:<8} {t.rule} {t.labels}")
            continue
        sent = "not sent (silenced)" if t.silenced_until else "would send"
        echo(f"{_iso(t.at_ms)} {t.kind.value:<8} {t.rule} {_labels(t.labels)} value={t.value} "
             f"[{sent} to {job.alerts.channel_for(rule.severity, t.labels)}]")
        for line in message.unescape(message.plain_text(rule, [t])).splitlines():
            echo("    | " + line)
    if not report.transitions:
        echo("(no alert transitions)")
    echo("== dead letters ==")
    echo(json.dumps(report.dead_letters) if report.dead_letters else "(none)")
    echo("== features at the end of the input ==")
    out: dict[str, Any] = {
        entity: {i: {n: v.value for n, v in values.items()} for i, values in table.items()}
        for entity, table in report.features.items()}
    echo(json.dumps(out, indent=2, sort_keys=True))


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "alertname")
