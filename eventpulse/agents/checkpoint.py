"""Where each partition stands in Redis, and the fenced write (steps 1 and 4 of the batch step,
``agents/pipeline.py``: the ingest starts from these positions, the write moves them on).

A checkpoint in quix-streams' sense, made exact: Redis, not Kafka, is the source of truth for
positions. Per ``topic:partition`` every fence shard (and the control fence) holds the last
offset whose effect it has (docs/design.md, "Exactly once, whatever happens"). This object is
the one place that reads them, remembers them between batches, writes a plan's slices fenced by
them and, when another writer moved a partition on (a conflict), rebuilds the batch from what
Redis holds now. Every Redis call goes through the one retry policy (:mod:`eventpulse.redisretry`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Protocol

import redis.asyncio as aioredis

from eventpulse import metrics
from eventpulse.agents.ingest import Ingested, KafkaRecord
from eventpulse.redisretry import RedisRetry
from eventpulse.tables.batch import Fence, PartitionPosition, Slice, WritePlan
from eventpulse.tables.store import FeatureStore, LayoutError
from eventpulse.tables.writebounds import DEFAULT_SHARDS, SCRIPT_BUDGET_MS

log = logging.getLogger("eventpulse.pipeline")
#: how often, at most, a batch also moves on the fences of the shards it did not touch (and so
#: how far behind a restart may start reading again: every record since is skipped per shard)
ADVANCE_EVERY_S = 1.0


class Combine(Protocol):
    """What builds a batch from positions: :class:`~eventpulse.agents.ingest.Ingest`."""

    #: the fence shard count it cuts batches for
    shards: int

    def __call__(self, records: Sequence[KafkaRecord], positions: Mapping[str, Fence],
                 max_cost: float = ...,
                 fed: Mapping[str, PartitionPosition] | None = ...) -> Awaitable[Ingested]: ...


class Checkpoint:
    """Positions and the fence of one consumer group's writes; one per consumer loop."""

    def __init__(self, redis: aioredis.Redis, namespace: str, group: str, ingest: Combine,
                 retry: RedisRetry, *, shards: int | None = DEFAULT_SHARDS,
                 script_budget_ms: float = SCRIPT_BUDGET_MS) -> None:
        self.store = FeatureStore(redis, namespace, group, shards)
        self.ingest = ingest
        self.retry = retry
        self.script_budget_ms = script_budget_ms
        #: per partition, where the next batch expects the fences to stand: what Redis held
        #: when last read, moved on by every batch prepared since (optimistically: a conflict
        #: empties it)
        self._expected: dict[str, Fence] = {}
        #: when untouched shards' fences were last moved on (monotonic seconds)
        self._advanced_at = 0.0
        #: per partition, where the last prepared batch left it (its last offset and the
        #: watermark there): the next batch continues from there, and its watermark with it,
        #: whatever fence is lowest (a shard no batch touched lately: BatchCombiner.reset)
        self._fed: dict[str, PartitionPosition] = {}

    async def start(self) -> None:
        """Check the fences' layout and shard count against Redis (migrating old layouts)."""
        try:
            migrated = await self.retry.call(self.store.prepare_layout, "redis layout check")
        except LayoutError as exc:
            log.critical("%s", exc)
            raise
        self.ingest.shards = self.store.shards  # settled: adopted from Redis when not configured
        if migrated:
            log.info("migrated the applied offsets of %d partitions into %d fence shards",
                     migrated, self.store.shards)

    async def resume_points(self, tps: Iterable[str]) -> dict[str, PartitionPosition | None]:
        """Per partition, the lowest position over its fences (``None``: some shard never
        applied it): a consumer resumes reading after it, whatever Kafka has committed."""
        names = list(tps)
        return await self.retry.call(lambda: self.store.positions(names), "redis positions")

    async def prepare(self, records: Sequence[KafkaRecord]) -> Ingested:
        """Ingest ``records`` from the positions their partitions stand at.

        Positions come from memory (the previous prepare's outcome) when it knows every
        partition of the batch, else from Redis. The next batch then expects this one applied.
        """
        tps = {f"{topic}:{partition}" for topic, partition in
               {(r.topic, r.partition) for r in records}}
        # a snapshot: a conflict may empty the memory while the fences load (a stale position
        # only costs another conflict: the fence refuses it)
        known = dict(self._expected)
        if not tps <= known.keys():
            missing = sorted(tps - known.keys())
            loaded = await self.retry.call(lambda: self.store.fences(missing), "redis fences")
            self._expected.update(loaded)
            known.update(loaded)
        before = {tp: known[tp] for tp in tps}
        batch = await self.ingest(records, before,
                                  self.store.cost.max_cost(self.script_budget_ms), self._fed)
        plan = batch.plan
        self._fed.update(plan.positions)
        if plan.advances:
            now = time.monotonic()
            if self._advance_due(now) or _never_applied(before):
                self._advanced_at = now
            else:
                plan.advances = []
        self._expected.update(plan.fences_after(before))
        return batch

    async def advance_untouched(self, *, idle: bool = False) -> None:
        """Move the fences the recent batches skipped (shards none of their records touched)
        to where their partitions stand, when no batch is in flight: the worker is stopping or
        losing partitions, or (``idle``) a fetch came back empty, which then does it at most
        every ``ADVANCE_EVERY_S``: a trickle's fetches come back empty several times a second,
        and each time moved every shard the last few records did not touch (1024 shards at 200
        events/s: 6,000 scripts a second, a tenth of Redis' core).

        Why they lag: moving all ``shards`` fences costs a script each, and a trickle of small
        batches paid that per batch (256 scripts for a one-record batch: a quarter of Redis'
        CPU at 200 events/s). A shard left behind stays exact (no record between its fence and
        the partition's position is about its entities), and a worker resuming from the lowest
        fence skips, per shard, what each holds; batches move them every ``ADVANCE_EVERY_S``.
        """
        if idle and not self._advance_due(time.monotonic()):
            return
        advances: list[Slice] = []
        positions: dict[str, PartitionPosition] = {}
        for tp, fence in self._expected.items():
            if not isinstance(fence, list) or fence[-1] is None:
                continue
            top = positions[tp] = fence[-1]  # the control fence moves with every batch
            for shard, held in enumerate(fence[:-1]):
                if held is None or held.offset < top.offset:
                    moves = [(tp, held.encode() if held else "", top.encode())]
                    advances.append(Slice(shard, moves))
        if not advances:
            return
        shards = self.store.shards
        plan = WritePlan(Slice(shards, []), advances, [], positions, {}, shards=shards)
        before = dict(self._expected)
        if await self.apply(plan):
            self._expected.update(plan.fences_after(before))
            self._advanced_at = time.monotonic()

    def _advance_due(self, now: float) -> bool:
        """Whether untouched fences were last moved ``ADVANCE_EVERY_S`` or more ago."""
        return now - self._advanced_at >= ADVANCE_EVERY_S

    async def apply(self, plan: WritePlan) -> bool:
        """Write the plan's slices, each fenced by its shard's positions; False on a conflict
        (another writer moved a partition on: nothing more of the plan is written, and the
        batch must be :meth:`rebuild`-t). A retried apply resumes after the acknowledged
        slices; with ``wait_replicas`` it returns once replicas hold the writes."""
        conflict = await self.retry.call(lambda: self.store.apply(plan), "redis fenced write")
        if conflict is None:
            return True
        metrics.FENCE_CONFLICTS.inc()
        log.info("partition %s was moved on by another writer; rebuilding the batch",
                 conflict.tp)
        self.forget()
        return False

    async def rebuild(self, records: Sequence[KafkaRecord]) -> Ingested:
        """The same records again, from the positions Redis holds now (after a conflict)."""
        self.forget()
        return await self.prepare(records)

    def forget(self) -> None:
        """Positions must be read from Redis again (a conflict, a rebalance)."""
        self._expected.clear()
        self._fed.clear()


def _never_applied(fences: Mapping[str, Fence]) -> bool:
    """True when some shard never applied some partition: a batch then moves every fence, so
    that a resume point (the lowest fence) exists from the first batch on."""
    return any(held is None for fence in fences.values()
               for held in (fence if isinstance(fence, list) else [fence]))
