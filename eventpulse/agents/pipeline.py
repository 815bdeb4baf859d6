"""The batch step: one fetched batch of Kafka records -> features, alert states, outbox and
offsets in Redis, in fenced writes. The record agent runs it per fetch, ``eventpulse replay`` per
second of a recorded file. Read top to bottom, it is one straight line:

1. **ingest** (:mod:`.ingest`): skip what Redis already holds, decode (privacy included),
   dead-letter the refusals, combine the rest into a write plan of cost-bounded slices; no I/O;
2. **dead letters** are produced and acknowledged;
3. **alerts fed** (:mod:`.alerting`): the batch's metric samples move the alert engine, whose
   changed states and outbox entries ride along in the plan's control slice;
4. **fenced write** (:mod:`.checkpoint`): every slice, each fenced by the positions its shard
   expected, so neither a crash between two of them nor a second writer (a zombie after a
   rebalance) applies anything twice; on a conflict the checkpoint rebuilds the batch from what
   Redis holds and the step runs again from 2;
5. **accounted**: metrics, then the rules over the features the batch updated;
6. only then may the caller **commit the offsets to Kafka** (``agents/records.py``).

``Pipeline`` only wires the pieces; each is usable and tested on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from eventpulse import metrics
from eventpulse.addresses import redis_client_address
from eventpulse.agents.alerting import AlertDriver
from eventpulse.agents.checkpoint import Checkpoint
from eventpulse.agents.ingest import Ingest, Ingested, KafkaRecord, RawRecord
from eventpulse.alerts.blind import InputView
from eventpulse.alerts.state import Transition
from eventpulse.config import JobConfig
from eventpulse.durations import wall_ms
from eventpulse.redisretry import RedisRetry
from eventpulse.streams.deadletter import DeadLetter
from eventpulse.streams.decode import RecordDecoder
from eventpulse.tables.client import AsyncFeatureClient
from eventpulse.tables.writebounds import DEFAULT_SHARDS, SCRIPT_BUDGET_MS

__all__ = ["BatchResult", "DeadLetterSink", "Pipeline", "RawRecord", "account"]
log = logging.getLogger("eventpulse.pipeline")


@dataclass
class BatchResult:
    transitions: list[Transition] = field(default_factory=list)
    #: newest offset applied per (topic, partition): what the caller may commit
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    watermark_ms: int | None = None
    #: feature name -> entity ids this batch updated
    touched: dict[str, set[str]] = field(default_factory=dict)


DeadLetterSink = Callable[[list[tuple[str, DeadLetter]]], Awaitable[None]]


def account(batch: Ingested) -> None:
    """The metrics of a written batch: one Prometheus update per topic and batch, not per
    record. Applied = consumed minus refused and already held (a replay)."""
    for topic, count in Counter(raw.topic for raw in batch.records).items():
        metrics.RECORDS.labels(topic).inc(count)
        if count > batch.not_applied[topic]:
            metrics.APPLIED.labels(topic).inc(count - batch.not_applied[topic])
    for name, count in batch.stats.late.items():
        metrics.LATE.labels(name).inc(count)
        log.debug("%d events too late for feature %s", count, name)
    if batch.stats.skipped_replayed:
        metrics.REPLAYED.inc(batch.stats.skipped_replayed)
    metrics.features_applied(batch.plan.newest)


class Pipeline:
    """The batch step over its three pieces. One per consumer loop."""

    def __init__(self, job: JobConfig, redis: aioredis.Redis, namespace: str, group: str,
                 privacy_secret: bytes | None = None, check_clock: bool = True,
                 clock: Callable[[], int] = wall_ms, *, shards: int | None = None,
                 script_budget_ms: float = SCRIPT_BUDGET_MS) -> None:
        self.job = job
        self.redis = redis
        self.stopping = False
        #: the one Redis retry policy of the worker's writes and alert calls
        self.retry = RedisRetry(stopping=lambda: self.stopping,
                                address=redis_client_address(redis))
        # shards=None: the count Redis holds, else the default, settled by start()
        self.ingest = Ingest(job, namespace, privacy_secret, check_clock,
                             shards=shards or DEFAULT_SHARDS)
        self.checkpoint = Checkpoint(redis, namespace, group, self.ingest, self.retry,
                                     shards=shards, script_budget_ms=script_budget_ms)
        self.reader = AsyncFeatureClient(redis, job.features, namespace,
                                         shards or DEFAULT_SHARDS)
        self.alerting = AlertDriver(job, redis, namespace, self.reader, self.retry, clock)
        # the pieces other code reaches for
        self.store = self.checkpoint.store
        self.alerts = self.alerting.alerts
        self.alert_store = self.alerting.store
        #: newest event-time watermark written (the event-time lag metric)
        self.watermark_ms: int | None = None

    @property
    def decoders(self) -> dict[str, RecordDecoder]:
        return self.ingest.decoders

    @property
    def lock(self) -> asyncio.Lock:
        return self.alerting.lock

    @property
    def on_outbox(self) -> Callable[[], None]:
        return self.alerting.on_outbox

    @on_outbox.setter
    def on_outbox(self, wake: Callable[[], None]) -> None:
        self.alerting.on_outbox = wake

    async def start(self) -> None:
        await self.checkpoint.start()
        self.reader.shards = self.store.shards
        await self.retry.call(lambda: self.store.publish(self.job.features), "redis registry")
        await self.alerting.reload()

    async def reload_alerts(self) -> None:
        """Alert states as Redis holds them (at start, after a rebalance)."""
        await self.alerting.reload()

    def forget_positions(self) -> None:
        """After a rebalance: positions must be read from Redis again."""
        self.checkpoint.forget()

    async def process(self, records: Sequence[KafkaRecord], send_dead_letters: DeadLetterSink,
                      ) -> BatchResult:
        """Prepare and commit one batch (the unpipelined path: replay, tests)."""
        return await self.commit(await self.prepare(records), send_dead_letters)

    async def prepare(self, records: Sequence[KafkaRecord]) -> Ingested:
        """Step 1, CPU work that may overlap the previous batch's commit. It does not touch
        the alert engine, so clock ticks may run between prepare and commit."""
        return await self.checkpoint.prepare(records)

    async def commit(self, batch: Ingested, send_dead_letters: DeadLetterSink) -> BatchResult:
        """Steps 2-5 (see the module's docstring)."""
        while (fed := await self._write(batch, send_dead_letters)) is None:
            batch = await self.checkpoint.rebuild(batch.records)  # another writer moved on
        transitions, outbox = fed
        self.alerting.written(outbox)
        account(batch)
        if batch.watermark_ms is not None:
            self.watermark_ms = max(self.watermark_ms or batch.watermark_ms, batch.watermark_ms)
        transitions += await self.alerting.on_features(batch.plan.touched)
        return BatchResult(transitions, batch.offsets, batch.watermark_ms, batch.plan.touched)

    async def _write(self, batch: Ingested, send_dead_letters: DeadLetterSink,
                     ) -> tuple[list[Transition], bool] | None:
        """Steps 2-4: dead letters acknowledged, alerts fed, the fenced write. Returns the fed
        transitions and whether they made outbox entries; None on a fence conflict."""
        if batch.dead:
            await send_dead_letters(batch.dead)
            batch.dead = []
        async with self.alerting.lock:
            fed = await self.alerting.feed(batch.samples, batch.plan)
            if await self.checkpoint.apply(batch.plan):
                return fed
            await self.alerting.reload_states()  # the fed samples' moves were not written
            return None

    async def tick(self, now_ms: int | None = None, owned: Sequence[str] | None = None,
                   view: Callable[[], InputView] | None = None) -> list[Transition]:
        """Time passes with no record (see :meth:`AlertDriver.tick`)."""
        return await self.alerting.tick(now_ms, owned, view)
