"""One batch of Kafka records -> features, alert states, outbox and offsets, in fenced writes.

This is the unit the feature agent runs per fetch and ``eventpulse replay`` runs per file chunk.
The order of effects is what makes it exact:

1. skip records whose offset Redis already holds (a replay after a crash);
2. decode; refused records become dead letters, which are produced and acknowledged first;
3. combine the rest in memory, feed metric samples to the alert engine;
4. fenced Lua calls write features, alert states, outbox entries and the new offsets: one per
   fence shard and cost-bounded slice (so Redis is never blocked longer than the script budget),
   each fenced by the positions its shard expected, so neither a crash between two of them nor
   a second writer (a zombie after a rebalance) applies anything twice (docs/design.md);
5. only then, every slice applied, may the caller commit the offsets to Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis.asyncio as aioredis

from eventpulse import metrics
from eventpulse.addresses import redis_client_address
from eventpulse.alerts.blind import InputView
from eventpulse.alerts.evaluate import AlertEvaluator
from eventpulse.alerts.outbox import AlertStore, encode_changes
from eventpulse.alerts.rules import AbsenceRule, RatioRule, SpikeRule
from eventpulse.alerts.state import Transition
from eventpulse.config import JobConfig
from eventpulse.redisretry import RedisRetry
from eventpulse.streams.deadletter import DeadLetter, make_dead_letter
from eventpulse.streams.decode import DecodeError
from eventpulse.streams.schemas import MetricSample
from eventpulse.tables.batch import (
    DEFAULT_SHARDS,
    BatchCombiner,
    BatchStats,
    Fence,
    WritePlan,
)
from eventpulse.tables.client import AsyncFeatureClient
from eventpulse.tables.spec import CompiledFeature
from eventpulse.tables.store import FeatureStore, LayoutError

log = logging.getLogger("eventpulse.pipeline")
#: records combined between two turns of the event loop: the previous batch's slices are written
#: meanwhile, each waiting for a turn to send the next (100 records: about 1 ms)
YIELD_EVERY = 100
#: longest a write script may keep Redis busy, by default (EVENTPULSE_REDIS_SCRIPT_BUDGET_MS)
SCRIPT_BUDGET_MS = 5.0


@dataclass(slots=True)
class RawRecord:
    topic: str
    partition: int
    offset: int
    value: bytes | None


@dataclass
class BatchResult:
    transitions: list[Transition] = field(default_factory=list)
    #: newest offset applied per (topic, partition): what the caller may commit
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    watermark_ms: int | None = None
    #: feature name -> entity ids this batch updated
    touched: dict[str, set[str]] = field(default_factory=dict)


DeadLetterSink = Callable[[list[tuple[str, DeadLetter]]], Awaitable[None]]


@dataclass
class Prepared:
    """A decoded and combined batch, not yet written."""

    records: Sequence[RawRecord]
    result: BatchResult
    plan: WritePlan
    dead: list[tuple[str, DeadLetter]]
    #: metric samples to feed the alert engine at commit time, with their partition
    samples: list[tuple[str, MetricSample]]
    stats: BatchStats
    #: per topic, records not applied: refused, or applied before (a replay)
    not_applied: Counter[str] = field(default_factory=Counter)


class _RecordFailed(Exception):
    """One record raised while being combined: where it is and the refusal it becomes."""

    def __init__(self, at: tuple[str, int, int], error: DecodeError) -> None:
        super().__init__(error.detail)
        self.at = at
        self.error = error


def _trial(scratch: BatchCombiner | None, tp: str, raw: RawRecord, record: Any,
           ) -> DecodeError | None:
    """Fold ``record`` into an empty scratch combiner: the refusal it earns if that raises."""
    assert scratch is not None
    scratch.reset({tp: None})
    try:
        scratch.add(tp, raw.topic, raw.offset, record)
    except Exception as exc:  # the record's own fault: the scratch combiner does no I/O
        return DecodeError("internal_error", f"{type(exc).__name__} while combining: "
                           f"{str(exc)[:300]}")
    return None


def wall_ms() -> int:
    return int(time.time() * 1000)


class Pipeline:
    """Everything between a fetched batch and Redis. One per consumer loop."""

    def __init__(self, job: JobConfig, redis: aioredis.Redis, namespace: str, group: str,
                 privacy_secret: bytes | None = None, check_clock: bool = True,
                 clock: Callable[[], int] = wall_ms, *, shards: int = DEFAULT_SHARDS,
                 script_budget_ms: float = SCRIPT_BUDGET_MS) -> None:
        self.job = job
        self.redis = redis
        self.namespace = namespace
        self.clock = clock
        self.features = [CompiledFeature(spec, i) for i, spec in enumerate(job.features)]
        self.pseudonymisers = job.pseudonymisers(privacy_secret)
        self.decoders = job.decoders(self.pseudonymisers, check_clock)
        self.kinds = dict(job.topics)
        self.store = FeatureStore(redis, namespace, group, shards)
        self.script_budget_ms = script_budget_ms
        self._positions: dict[str, Fence] = {}
        self.reader = AsyncFeatureClient(redis, job.features, namespace, shards)
        extensive = [f.name for f in job.features if f.aggregation in ("count", "sum")]
        self.alerts = AlertEvaluator.build(job.alerts, {f.name: f.window.size for f in job.features},
                                           extensive)
        self.alert_store = AlertStore(redis, namespace)
        self._alert_features = self._features_watched_by_alerts(job)
        #: how long an entity stays under watch for feature-driven rules after its last update
        self._watch_horizon_ms = max(
            [f.window.size + f.window.lateness for f in job.features] + [0]) + 60_000
        self.watermark_ms: int | None = None
        self.stopping = False
        self.retry = RedisRetry(stopping=lambda: self.stopping,
                                address=redis_client_address(redis))
        self._silences_loaded = 0.0
        #: batches and clock ticks both move alert states; one at a time
        self.lock = asyncio.Lock()
        self.on_outbox: Callable[[], None] = lambda: None

    @staticmethod
    def _features_watched_by_alerts(job: JobConfig) -> dict[str, list[str]]:
        """entity -> feature names that feature-driven alert rules read."""
        names: set[str] = set()
        for rule in job.alerts.rules:
            if isinstance(rule, RatioRule | AbsenceRule) and rule.feature is not None:
                names.add(rule.feature)
            if isinstance(rule, SpikeRule):
                names.update((rule.feature, rule.baseline))
        out: dict[str, list[str]] = {}
        for spec in job.features:
            if spec.name in names:
                out.setdefault(spec.entity, []).append(spec.name)
        return out

    async def start(self) -> None:
        try:
            migrated = await self.retrying(self.store.prepare_layout)
        except LayoutError as exc:
            log.critical("%s", exc)
            raise
        if migrated:
            log.info("migrated the applied offsets of %d partitions into %d fence shards",
                     migrated, self.store.shards)
        await self.retrying(lambda: self.store.publish(self.job.features))
        await self.reload_alerts()

    async def reload_alerts(self) -> None:
        """Alert states as Redis holds them (at start, after a rebalance or a fence conflict)."""
        async with self.lock:
            states = await self.retrying(self.alert_store.load_states)
            self.alerts.engine.states = states
        await self._refresh_silences(max_age_s=0)

    async def _refresh_silences(self, max_age_s: float = 1.0) -> None:
        """Silences change from the CLI at any time; decide with ones at most a second old."""
        now = time.monotonic()
        if now - self._silences_loaded < max_age_s:
            return
        self.alerts.engine.silences = await self.retrying(self.alert_store.silences)
        self._silences_loaded = now

    async def retrying(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """``call`` under the one Redis retry policy (:class:`RedisRetry`): transient states
        are waited out for as long as it takes (unless stopping), the rest raised."""
        return await self.retry.call(call, "redis")

    async def process(self, records: Sequence[RawRecord], send_dead_letters: DeadLetterSink,
                      ) -> BatchResult:
        """Prepare and commit one batch (the unpipelined path: replay, tests)."""
        return await self.commit(await self.prepare(records), send_dead_letters)

    async def prepare(self, records: Sequence[RawRecord]) -> Prepared:
        """Decode and combine: CPU work that may overlap the previous batch's commit.

        It does not touch the alert engine, so clock ticks may run between prepare and commit.
        Positions come from the cache (the previous prepare's outcome) when it knows every
        partition of the batch, else from Redis.
        """
        partitions = {(r.topic, r.partition) for r in records}
        tps = {f"{topic}:{partition}" for topic, partition in partitions}
        # a snapshot: a commit's conflict may clear the cache while the fences load (a stale
        # position only costs another conflict: the fence refuses it)
        known = dict(self._positions)
        if not tps <= known.keys():
            missing = sorted(tps - known.keys())
            loaded = await self.retrying(lambda: self.store.fences(missing))
            self._positions.update(loaded)
            known.update(loaded)
        positions = {tp: known[tp] for tp in tps}
        prepared = await self._combine(records, positions)
        # optimistic: the next batch expects this one to be applied
        self._positions.update(prepared.plan.positions)
        return prepared

    async def commit(self, prepared: Prepared, send_dead_letters: DeadLetterSink) -> BatchResult:
        """Dead letters first, then the fenced slices; rebuilds itself on a fence conflict."""
        while True:
            if prepared.dead:
                await send_dead_letters(prepared.dead)
                prepared.dead = []
            async with self.lock:
                result, plan = prepared.result, prepared.plan
                if prepared.samples:
                    await self._refresh_silences()
                for tp, sample in prepared.samples:
                    result.transitions += self.alerts.on_metric(
                        sample.name, sample.value, sample.labels, sample.timestamp, tp)
                entries = self.alerts.entries(result.transitions, wall_ms())
                for op in encode_changes(self.alert_store.keys, self.alerts.engine.take_dirty(),
                                         entries):
                    plan.add_write(*op)
                conflict = await self.retrying(lambda: self.store.apply(plan))  # noqa: B023
                if conflict is None:
                    break
                metrics.FENCE_CONFLICTS.inc()
                log.info("partition %s was moved on by another writer; rebuilding the batch",
                         conflict.tp)
                self.alerts.engine.states = await self.retrying(self.alert_store.load_states)
            self._positions.clear()
            prepared = await self.prepare(prepared.records)
        if entries:
            self.on_outbox()
        self._account(result, prepared)
        result.touched = plan.touched
        result.transitions += await self._feature_alerts(plan.touched)
        return result

    def forget_positions(self) -> None:
        """After a rebalance: positions must be read from Redis again."""
        self._positions.clear()

    async def _combine(self, records: Sequence[RawRecord],
                       positions: dict[str, Fence]) -> Prepared:
        """Decode and combine a batch. A record that still raises while being combined (the
        decoder bounds what reaches the combiner, so this is the last line of defence) becomes
        a dead letter ``internal_error`` and the batch is combined again without it: a record
        half-folded in must not leave half its effect. The combiner does no I/O, so whatever
        it raises comes from the record. The combining again tries each record on a scratch
        combiner first, so a batch full of such records costs two passes, not one per record.
        """
        poisoned: dict[tuple[str, int, int], DecodeError] = {}
        while True:
            try:
                prepared = await self._combine_once(records, positions, poisoned,
                                                    isolate=bool(poisoned))
            except _RecordFailed as failed:
                poisoned[failed.at] = failed.error
                continue
            for at, error in poisoned.items():
                log.error("record %s:%s@%s could not be combined, dead-lettered: %s", *at,
                          error.detail)
            for topic, letter in prepared.dead:
                metrics.DEAD_LETTERS.labels(topic, letter.reason).inc()
            return prepared

    async def _combine_once(self, records: Sequence[RawRecord],
                            positions: dict[str, Fence],
                            poisoned: dict[tuple[str, int, int], DecodeError],
                            isolate: bool = False) -> Prepared:
        # a combiner per batch: a batch rebuilt after a fence conflict may be combined while the
        # next one is (both yield to the event loop)
        combiner = BatchCombiner(self.namespace, self.features, positions,
                                 shards=self.store.shards,
                                 max_cost=self.store.cost.max_cost(self.script_budget_ms))
        scratch = (BatchCombiner(self.namespace, self.features, shards=self.store.shards)
                   if isolate else None)
        result = BatchResult()
        dead: list[tuple[str, DeadLetter]] = []
        samples: list[tuple[str, MetricSample]] = []
        not_applied: Counter[str] = Counter()
        now = wall_ms()
        tp_names: dict[tuple[str, int], str] = {}
        for index, raw in enumerate(records):
            if index % YIELD_EVERY == 0:
                # let the event loop run between slices of a long batch: the Kafka fetcher then
                # sends the next fetch while this one is combined, and heartbeats keep going
                await asyncio.sleep(0)
            tp = tp_names.get((raw.topic, raw.partition))
            if tp is None:
                tp = tp_names[(raw.topic, raw.partition)] = f"{raw.topic}:{raw.partition}"
            if not combiner.is_new(tp, raw.offset):
                not_applied[raw.topic] += 1
                continue
            decoder = self.decoders.get(raw.topic)
            if decoder is None:
                not_applied[raw.topic] += 1
                continue
            record = decoder.decode(raw.value, now)
            if poisoned and (raw.topic, raw.partition, raw.offset) in poisoned:
                record = poisoned[(raw.topic, raw.partition, raw.offset)]
            elif isolate and not isinstance(record, DecodeError):
                failure = _trial(scratch, tp, raw, record)
                if failure is not None:
                    record = poisoned[(raw.topic, raw.partition, raw.offset)] = failure
            if isinstance(record, DecodeError):
                combiner.add(tp, raw.topic, raw.offset, None)
                letter = make_dead_letter(record, raw.value, raw.topic, raw.partition, raw.offset,
                                          self.pseudonymisers.get(raw.topic))
                dead.append((raw.topic, letter))
                not_applied[raw.topic] += 1
                log.debug("dead letter %s:%s@%s: %s", raw.topic, raw.partition, raw.offset,
                          record.reason)
                continue
            try:
                combiner.add(tp, raw.topic, raw.offset, record)
            except Exception as exc:  # see _combine: the record's own fault
                raise _RecordFailed((raw.topic, raw.partition, raw.offset), DecodeError(
                    "internal_error", f"{type(exc).__name__} while combining: "
                    f"{str(exc)[:300]}")) from exc
            # a sample the control fence holds already moved the alert states Redis has
            if isinstance(record, MetricSample) and not combiner.control_holds(tp, raw.offset):
                samples.append((tp, record))
        for tp, position in combiner.positions.items():
            topic, _, partition = tp.rpartition(":")
            if position.offset >= 0:
                result.offsets[(topic, int(partition))] = position.offset
            if position.watermark > (result.watermark_ms or -(2**62)):
                result.watermark_ms = position.watermark
        return Prepared(records, result, combiner.plan(), dead, samples, combiner.stats,
                        not_applied)

    def _account(self, result: BatchResult, prepared: Prepared) -> None:
        # one Prometheus update per topic and batch, not per record
        for topic, count in Counter(raw.topic for raw in prepared.records).items():
            metrics.RECORDS.labels(topic).inc(count)
            if count > prepared.not_applied[topic]:
                metrics.APPLIED.labels(topic).inc(count - prepared.not_applied[topic])
        for name, count in prepared.stats.late.items():
            metrics.LATE.labels(name).inc(count)
            log.debug("%d events too late for feature %s", count, name)
        if prepared.stats.skipped_replayed:
            metrics.REPLAYED.inc(prepared.stats.skipped_replayed)
        metrics.features_applied(prepared.plan.newest)
        if result.watermark_ms is not None:
            self.watermark_ms = max(self.watermark_ms or result.watermark_ms, result.watermark_ms)

    async def _feature_alerts(self, touched: dict[str, set[str]]) -> list[Transition]:
        """Rules over features (error rate, spike, absence per entity) for entities just updated.

        Every worker records what it touched in a shared sorted set; one worker, the holder of
        the alert lease, evaluates them, so two workers never announce the same alert.
        """
        now = self.clock()
        seen_until = self.alerts.seen_until(now)
        watched: dict[str, set[str]] = {}
        for entity, names in self._alert_features.items():
            ids = {i for name in names for i in touched.get(name, ())}
            if ids:
                watched[entity] = ids
        if not watched:
            return []
        await self.retrying(partial(self.alert_store.watch, watched, now))
        if not await self.retrying(self.alert_store.hold_lease):
            return []
        transitions = await self._evaluate_features(seen_until, watched)
        await self._save_alerts(transitions)
        return transitions

    async def _evaluate_features(self, at: int, only: dict[str, set[str]] | None = None,
                                 ) -> list[Transition]:
        """Read watched entities' features at ``at`` and feed the feature-driven rules.

        Windows close as time passes, so the clock tick calls this too (``only`` None: every
        entity updated within the longest window): an error rate falls back under its threshold
        without any new event.
        """
        transitions: list[Transition] = []
        for entity, names in self._alert_features.items():
            if only is not None:
                ids = sorted(only.get(entity, ()))
            else:
                ids = await self.retrying(partial(self.alert_store.watched, entity,
                                                  at - self._watch_horizon_ms))
            if not ids:
                continue
            readings = await self.retrying(partial(self.reader.get_many, entity, ids, names, at))
            transitions += self.alerts.on_features(entity, readings, at)
        return transitions

    async def tick(self, now_ms: int | None = None, owned: Sequence[str] | None = None,
                   view: Callable[[], InputView] | None = None) -> list[Transition]:
        """Time passes with no record: ``for`` elapses, absences appear, silences end.

        ``view``: what the worker has seen of its input, measured once the batch lock is held
        (so no batch is half-fed meanwhile); None: everything (replay).
        """
        async with self.lock:
            now = self.clock() if now_ms is None else now_ms
            return await self._tick(now, owned, None if view is None else view())

    async def _tick(self, now: int, owned: Sequence[str] | None,
                    view: InputView | None) -> list[Transition]:
        await self._refresh_silences(max_age_s=0)
        transitions: list[Transition] = []
        if view is not None:
            transitions += self.alerts.see(view, now)
        leader = await self.retrying(self.alert_store.hold_lease)
        if leader and self._alert_features:
            transitions += await self._evaluate_features(self.alerts.seen_until(now))
        transitions += self.alerts.tick(now, owned, include_unowned=leader)
        await self._save_alerts(transitions)
        return transitions

    async def _save_alerts(self, transitions: list[Transition]) -> None:
        entries = self.alerts.entries(transitions, wall_ms())
        changed = self.alerts.engine.take_dirty()
        if changed or entries:
            await self.retrying(lambda: self.alert_store.save(changed, entries))
        if entries:
            self.on_outbox()
        for state, count in self.alerts.engine.summary().items():
            metrics.ALERTS.labels(state).set(count)
