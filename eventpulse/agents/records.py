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
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from eventpulse import metrics
from eventpulse.agents.deadletters import DeadLetterProducer
from eventpulse.agents.ingest import Ingested
from eventpulse.agents.pipeline import BatchResult, Pipeline
from eventpulse.agents.reachable import until_reachable
from eventpulse.agents.sight import PartitionFetch
from eventpulse.streams.deadletter import DEFAULT_MAX_MESSAGE_BYTES, DeadLetter

log = logging.getLogger("eventpulse.agents.records")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, agent: RecordAgent) -> None:
        self.agent = agent

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Wait for the batch in flight: its offsets are committed before the partitions go.
        self.agent.rebalancing = True
        async with self.agent.batch_lock:
            await self.agent.drain()
            await self.agent.pipeline.checkpoint.advance_untouched()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # another worker may have moved these partitions' positions and alert states on
        self.agent.pipeline.forget_positions()
        await self.agent.pipeline.reload_alerts()
        await self.agent.resume_from_redis(assigned)
        self.agent.rebalancing = False


async def _started(client: Any) -> None:
    """Start an aiokafka client, or stop it again: a failed start leaves it half open."""
    try:
        await client.start()
    except BaseException:
        await client.stop()
        raise


class RecordAgent(mode.Service):
    """Consumes the configured topics as one consumer group member."""

    def __init__(self, pipeline: Pipeline, bootstrap: Sequence[str], group: str,
                 topics: Sequence[str], dead_letter_topic: str, *, max_records: int = 20_000,
                 max_wait_ms: int = 100, session_timeout_ms: int = 10_000,
                 kafka_options: dict[str, Any] | None = None,
                 dead_letter_max_request_size: int = 1_048_576,
                 dead_letter_max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
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
        #: TLS / SASL options (eventpulse.connections), for both clients
        self.kafka_options = kafka_options or {}
        self.batch_lock = asyncio.Lock()
        self.rebalancing = True
        self.consumer: AIOKafkaConsumer | None = None
        self.dead_letters = DeadLetterProducer(
            self.bootstrap, dead_letter_topic, max_request_size=dead_letter_max_request_size,
            topic_max_bytes=dead_letter_max_bytes, stopping=lambda: self.should_stop,
            kafka_options=self.kafka_options)
        self.next_offsets: dict[TopicPartition, int] = {}
        self.inflight: asyncio.Task[BatchResult] | None = None

    async def on_start(self) -> None:
        await self.pipeline.start()
        await self.dead_letters.start()
        self.consumer = await until_reachable(self._start_consumer, self.bootstrap, "consumer",
                                              lambda: self.should_stop)

    async def _start_consumer(self) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest", max_poll_records=self.max_records,
            fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=16 * 1024 * 1024,
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=max(500, self.session_timeout_ms // 6),
            rebalance_timeout_ms=max(self.session_timeout_ms, 10_000),
            max_poll_interval_ms=600_000, **self.kafka_options,
        )
        consumer.subscribe(self.topics, listener=_Rebalance(self))
        await _started(consumer)
        return consumer

    async def on_stop(self) -> None:
        # stopping first, before waiting for the lock: a batch waiting on an unreachable Redis
        # or broker is abandoned uncommitted (the partition's next owner reads it again)
        self.pipeline.stopping = True
        async with self.batch_lock:
            try:
                await self.drain()
                await self.pipeline.checkpoint.advance_untouched()
            except Exception as exc:
                log.warning("batch in flight abandoned at shutdown, not committed: %r", exc)
            if self.consumer is not None:
                await self.consumer.stop()
            await self.dead_letters.stop()

    async def resume_from_redis(self, assigned: list[TopicPartition]) -> None:
        """Start each partition after what Redis holds: Redis is the source of truth, ahead of
        Kafka's committed offset (a crash between the write and the commit) or behind it (a
        Redis failover lost acknowledged writes: they are read and applied again; the shard
        fences skip what survived)."""
        assert self.consumer is not None
        names = {f"{tp.topic}:{tp.partition}": tp for tp in assigned}
        positions = await self.pipeline.checkpoint.resume_points(names)
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
                self._learn_start_offsets()
                self._record_lag()
                try:
                    async with self.batch_lock:  # idle: the fences batches skipped catch up
                        await self.pipeline.checkpoint.advance_untouched(idle=True)
                except Exception:
                    if not self.pipeline.stopping:
                        raise
                    return
                continue
            try:
                async with self.batch_lock:
                    prepared = None
                    started = time.perf_counter()
                    if batches:
                        records = [m for messages in batches.values() for m in messages]
                        prepared = await self.pipeline.prepare(records)
                        metrics.BATCH_RECORDS.observe(len(records))
                    await self.drain()
                    if prepared is not None:
                        self.inflight = asyncio.ensure_future(
                            self._commit_timed(prepared, started))
            except Exception as exc:
                if not self.pipeline.stopping:
                    raise
                # the stop gave up waiting on Redis or the broker: nothing of this batch is
                # committed, and the partition's next owner reads it again
                log.warning("batch abandoned at stop, not committed: %s", exc)
                return
        async with self.batch_lock:
            await self.drain()

    async def drain(self) -> None:
        """Wait for the batch being written and commit its offsets (call with batch_lock)."""
        if self.inflight is not None:
            inflight, self.inflight = self.inflight, None
            await self._finish(inflight)

    async def _commit_timed(self, prepared: Ingested, started: float) -> BatchResult:
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
        await self.dead_letters.send(letters)

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

    def fetch_states(self) -> dict[str, PartitionFetch]:
        """Per assigned partition: the last successful fetch (its high watermark and when it
        answered) and the next offset not yet applied: what ``InputSight`` judges blindness by."""
        consumer = self.consumer
        if consumer is None:
            return {}
        return {f"{tp.topic}:{tp.partition}": PartitionFetch(
                    consumer.highwater(tp), consumer.last_poll_timestamp(tp),
                    self.next_offsets.get(tp, 0))
                for tp in consumer.assignment()}

    def _learn_start_offsets(self) -> None:
        """A partition nothing was ever applied from (a new group; all its records expired)
        has no next offset, so it would look behind forever: once a fetch returned nothing and
        no batch is in flight, everything the consumer returned is applied, and its position is
        the next offset. (aiokafka's position is sync only in its private state.)"""
        consumer = self.consumer
        if consumer is None:
            return
        for tp in consumer.assignment():
            if tp in self.next_offsets:
                continue
            try:
                state = consumer._subscription.subscription.assignment.state_value(tp)
                if state is not None and state.has_valid_position:
                    self.next_offsets[tp] = int(state.position)
            except AttributeError:  # another aiokafka layout: stay conservative (behind)
                return

    def coordinator_known(self) -> bool:
        """False while aiokafka has marked the group coordinator dead (not found or not
        answering); it has no public call for this, so an unknown layout counts as known."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        return coordinator is None or getattr(coordinator, "coordinator_id", 0) is not None

    def _record_lag(self) -> None:
        metrics.LAG_RECORDS.clear()  # partitions revoked by a rebalance are another worker's now
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
