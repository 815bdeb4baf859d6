"""The training set's reference replay: every archived record in offset order, applied at every
label moment, the way the worker applies a topic.

Slow: each label moment rewrites every entity the records since the previous moment touched
(about 12 entity writes per label row on the bench), which is why
:func:`eventpulse.offline.training.compute` brings an entity up to date only when one of its
label rows is read. Kept because it is plainly the worker's way, with real partitions,
positions, watermarks and batches: tests hold the fast path to it on random archives
(tests/test_training_equivalence.py).
"""

from __future__ import annotations

import bisect
import time
import uuid

import redis.asyncio as aioredis

from eventpulse.archive.store import ArchiveStore
from eventpulse.config import JobConfig
from eventpulse.offline import training
from eventpulse.offline.settle import RecentWrites
from eventpulse.offline.training import Labels, TrainingStats
from eventpulse.tables.batch import BatchCombiner, PartitionPosition
from eventpulse.tables.client import AsyncFeatureClient, FeatureValue
from eventpulse.tables.spec import CompiledFeature, FeatureSpec
from eventpulse.tables.store import FeatureStore


async def compute(job: JobConfig, store: ArchiveStore, labels: Labels, specs: list[FeatureSpec],
                  redis: aioredis.Redis, namespace: str | None = None, settle_ms: int = 0,
                  ) -> tuple[list[dict[str, FeatureValue] | None], TrainingStats]:
    """What :func:`eventpulse.offline.training.compute` returns, the slow way."""
    started = time.perf_counter()
    namespace = namespace or f"offline-{uuid.uuid4().hex[:8]}"
    stats = TrainingStats()
    compiled = [CompiledFeature(spec, i) for i, spec in enumerate(specs)]
    feature_store = FeatureStore(redis, namespace, "offline", shards=1)
    await feature_store.publish(specs, training.KEY_LEASE_MS)
    client = AsyncFeatureClient(redis, specs, namespace, shards=1)
    cutoffs = labels.cutoffs if labels.cutoffs is not None else labels.times
    # every record with every field, as the worker has them, applied at every moment
    streams = training.load_streams(job, store, specs, max(cutoffs, default=0))
    for stream in streams:
        stream.need()
    positions: dict[str, PartitionPosition | None] = {s.tp: None for s in streams}
    order = sorted(range(len(cutoffs)), key=cutoffs.__getitem__)
    cuts = training.cuts_of(cutoffs, settle_ms)
    recent = (RecentWrites(settle_ms, {spec.name: spec.entity for spec in specs})
              if settle_ms > 0 else None)
    out: list[dict[str, FeatureValue] | None] = [None] * len(order)
    at = 0
    batch = training.BATCH
    for cut in cuts:
        # everything the broker had by this moment, per partition in offset order
        combiner = BatchCombiner(namespace, compiled, positions, shards=1,
                                 lease_ms=training.KEY_LEASE_MS)
        fed = 0
        for stream in streams:
            end = bisect.bisect_right(stream.reach, cut)
            while stream.cursor < end:
                upto = min(end, stream.cursor + batch - fed)
                add, tp, topic = combiner.add, stream.tp, stream.topic
                if stream.cursor == 0 and stream.starts_at < stream.offsets[0]:
                    # the partition's first records were refused: the worker read their
                    # offsets (no rows), so the partition did not join mid-stream
                    add(tp, topic, stream.starts_at, None)
                for offset, record in zip(stream.offsets[stream.cursor:upto],
                                          stream.records[stream.cursor:upto], strict=True):
                    add(tp, topic, offset, record)
                fed += upto - stream.cursor
                stream.cursor = upto
                if fed >= batch:
                    positions = await training.apply(feature_store, combiner, stats, recent,
                                                     cut)
                    combiner = BatchCombiner(namespace, compiled, positions, shards=1,
                                             lease_ms=training.KEY_LEASE_MS)
                    stats.events += fed
                    fed = 0
        if fed:
            positions = await training.apply(feature_store, combiner, stats, recent, cut)
            stats.events += fed
        group = []
        while at < len(order) and cutoffs[order[at]] == cut:
            group.append(order[at])
            at += 1
        if group:
            await training.read(client, labels, specs, group, out)
            if recent is not None:
                stats.lag_sensitive += training.mark_lag_sensitive(labels, group, out, recent,
                                                                   cut - settle_ms)
                stats.lag_sensitive += training.mark_born(labels, group, out, cut - settle_ms,
                                                          recent)
    stats.rows = len(order)
    stats.seconds = time.perf_counter() - started
    return out, stats
