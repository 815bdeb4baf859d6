"""The record agent: Kafka fetch batches -> :class:`Pipeline`, committing only what Redis holds.

Why not a per-event ``@app.agent``: measured on this machine, Faust's per-message delivery
(consumer thread hand-off, one future per event) tops out near 11k events/s whatever the agent
does, while the job needs several times that with ten features. So the unit of work here is the
fetch batch: this agent is a service of the Faust app (started, supervised and stopped with it)
that consumes through aiokafka, Faust's own Kafka client, with ``getmany``. See
docs/performance.md for the measurements.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from eventpulse import metrics
from eventpulse.agents.pipeline import BatchResult, Pipeline, Prepared, RawRecord
from eventpulse.streams.deadletter import DeadLetter

log = logging.getLogger("eventpulse.agents.records")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, agent: RecordAgent) -> None:
        self.agent = agent

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Wait for the batch in flight: its offsets are committed before the partitions go.
        self.agent.rebalancing = True
        async with self.agent.batch_lock:
            await self.agent.drain()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # another worker may have moved these partitions' positions and alert states on
        self.agent.pipeline.forget_positions()
        await self.agent.pipeline.reload_alerts()
        await self.agent.resume_from_redis(assigned)
        self.agent.rebalancing = False


class RecordAgent(mode.Service):
    """Consumes the configured topics as one consumer group member."""

    def __init__(self, pipeline: Pipeline, bootstrap: Sequence[str], group: str,
                 topics: Sequence[str], dead_letter_topic: str, *, max_records: int = 20_000,
                 max_wait_ms: int = 100, session_timeout_ms: int = 10_000,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline
        self.bootstrap = list(bootstrap)
        self.group = group
        self.topics = list(topics)
        self.dead_letter_topic = dead_letter_topic
        self.max_records = max_records
        self.max_wait_ms = max_wait_ms
        self.session_timeout_ms = session_timeout_ms
        self.batch_lock = asyncio.Lock()
        self.rebalancing = True
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.next_offsets: dict[TopicPartition, int] = {}
        self.inflight: asyncio.Task[BatchResult] | None = None

    async def on_start(self) -> None:
        await self.pipeline.start()
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all",
                                         linger_ms=5, enable_idempotence=False)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.max_records,
            fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.session_timeout_ms // 6),
            rebalance_timeout_ms=max(self.session_timeout_ms, 10_000),
            max_poll_interval_ms=600_000,
        )
        self.consumer.subscribe(self.topics, listener=_Rebalance(self))
        await self.consumer.start()

    async def on_stop(self) -> None:
        async with self.batch_lock:
            await self.drain()
            self.pipeline.stopping = True
            if self.consumer is not None:
                await self.consumer.stop()
            if self.producer is not None:
                await self.producer.stop()

    async def resume_from_redis(self, assigned: list[TopicPartition]) -> None:
        """Start each partition after what Redis holds: Redis is the source of truth, ahead of
        Kafka's committed offset (a crash between the write and the commit) or behind it (a
        Redis failover lost acknowledged writes: they are read and applied again; the shard
        fences skip what survived)."""
        assert self.consumer is not None
        names = {f"{tp.topic}:{tp.partition}": tp for tp in assigned}
        positions = await self.pipeline.retrying(lambda: self.pipeline.store.positions(names))
        for name, tp in names.items():
            position = positions.get(name)
            committed = await self.consumer.committed(tp)
            if position is not None:
                if committed is not None and committed > position.offset + 1:
                    log.warning("%s: Kafka's committed offset %d is ahead of Redis (%d): "
                                "reading again from Redis's position", name, committed,
                                position.offset + 1)
                self.consumer.seek(tp, position.offset + 1)
                self.next_offsets[tp] = position.offset + 1
            elif committed is not None:
                # committed, yet no fence in Redis holds the partition: Redis lost it
                log.warning("%s: Kafka has a committed offset (%d) but Redis holds no position: "
                            "reading the partition from its beginning", name, committed)
                await self.consumer.seek_to_beginning(tp)
                self.next_offsets.pop(tp, None)
        log.info("assigned %s", sorted(names))

    @mode.Service.task
    async def _consume(self) -> None:
        """Fetch, prepare, commit; preparing batch N+1 overlaps the Redis write of batch N
        (Redis runs the write in its own process, so the two cores both work)."""
        assert self.consumer is not None
        consumer = self.consumer
        while not self.should_stop:
            try:
                batches = await consumer.getmany(timeout_ms=self.max_wait_ms,
                                                 max_records=self.max_records)
            except KafkaError as exc:
                log.warning("fetch failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if not batches and self.inflight is None:
                self._record_lag()
                continue
            async with self.batch_lock:
                prepared = None
                started = time.perf_counter()
                if batches:
                    records = [RawRecord(tp.topic, tp.partition, m.offset, m.value)
                               for tp, messages in batches.items() for m in messages]
                    prepared = await self.pipeline.prepare(records)
                    metrics.BATCH_RECORDS.observe(len(records))
                await self.drain()
                if prepared is not None:
                    self.inflight = asyncio.ensure_future(self._commit_timed(prepared, started))
        async with self.batch_lock:
            await self.drain()

    async def drain(self) -> None:
        """Wait for the batch being written and commit its offsets (call with batch_lock)."""
        if self.inflight is not None:
            inflight, self.inflight = self.inflight, None
            await self._finish(inflight)

    async def _commit_timed(self, prepared: Prepared, started: float) -> BatchResult:
        result = await self.pipeline.commit(prepared, self._send_dead_letters)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        return result

    async def _finish(self, inflight: asyncio.Task[BatchResult]) -> None:
        result = await inflight
        await self._commit(result)
        self._record_lag()

    async def _commit(self, result: BatchResult) -> None:
        assert self.consumer is not None
        offsets = {TopicPartition(t, p): o + 1 for (t, p), o in result.offsets.items()}
        if not offsets:
            return
        self.next_offsets.update(offsets)
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # Redis has the effect and the offset; whoever owns the partition next skips it.
            log.info("offset commit failed (%s); Redis holds the applied offsets", exc)

    async def _send_dead_letters(self, letters: list[tuple[str, DeadLetter]]) -> None:
        assert self.producer is not None
        futures = [await self.producer.send(self.dead_letter_topic, letter.to_json(),
                                            key=f"{letter.topic}:{letter.partition}".encode())
                   for _, letter in letters]
        await asyncio.gather(*futures)

    def lag_by_partition(self) -> dict[TopicPartition, int | None]:
        """Records between what we applied and the fetch high watermark (not end_offsets(),
        which some brokers under-report); None until the first fetch tells."""
        consumer = self.consumer
        if consumer is None:
            return {}
        lag: dict[TopicPartition, int | None] = {}
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            lag[tp] = None if high is None else max(0, high - self.next_offsets.get(tp, 0))
        return lag

    def _record_lag(self) -> None:
        for tp, lag in self.lag_by_partition().items():
            if lag is None:
                continue
            metrics.LAG_RECORDS.labels(tp.topic, str(tp.partition)).set(lag)
        if self.pipeline.watermark_ms is not None:
            metrics.EVENT_TIME_LAG.set(max(0.0, time.time() - self.pipeline.watermark_ms / 1000))

    def owned_partitions(self) -> list[str]:
        if self.consumer is None:
            return []
        return [f"{tp.topic}:{tp.partition}" for tp in self.consumer.assignment()]
