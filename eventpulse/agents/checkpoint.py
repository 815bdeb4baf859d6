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
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Protocol

import redis.asyncio as aioredis

from eventpulse import metrics
from eventpulse.agents.ingest import Ingested, RawRecord
from eventpulse.redisretry import RedisRetry
from eventpulse.tables.batch import Fence, PartitionPosition, WritePlan
from eventpulse.tables.store import FeatureStore, LayoutError
from eventpulse.tables.writebounds import DEFAULT_SHARDS, SCRIPT_BUDGET_MS

log = logging.getLogger("eventpulse.pipeline")


class Combine(Protocol):
    """What builds a batch from positions: :class:`~eventpulse.agents.ingest.Ingest`."""

    #: the fence shard count it cuts batches for
    shards: int

    def __call__(self, records: Sequence[RawRecord], positions: Mapping[str, Fence],
                 max_cost: float = ...) -> Awaitable[Ingested]: ...


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

    async def prepare(self, records: Sequence[RawRecord]) -> Ingested:
        """Ingest ``records`` from the positions their partitions stand at.

        Positions come from memory (the previous prepare's outcome) when it knows every
        partition of the batch, else from Redis. The next batch then expects this one applied.
        """
        tps = {f"{r.topic}:{r.partition}" for r in records}
        # a snapshot: a conflict may empty the memory while the fences load (a stale position
        # only costs another conflict: the fence refuses it)
        known = dict(self._expected)
        if not tps <= known.keys():
            missing = sorted(tps - known.keys())
            loaded = await self.retry.call(lambda: self.store.fences(missing), "redis fences")
            self._expected.update(loaded)
            known.update(loaded)
        batch = await self.ingest(records, {tp: known[tp] for tp in tps},
                                  self.store.cost.max_cost(self.script_budget_ms))
        self._expected.update(batch.plan.positions)
        return batch

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

    async def rebuild(self, records: Sequence[RawRecord]) -> Ingested:
        """The same records again, from the positions Redis holds now (after a conflict)."""
        self.forget()
        return await self.prepare(records)

    def forget(self) -> None:
        """Positions must be read from Redis again (a conflict, a rebalance)."""
        self._expected.clear()
