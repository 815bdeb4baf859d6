"""The two numbers that bound a batch's writes, in one place (settings, the combiner and the
checkpoint read them from here; docs/design.md, "Bounded writes: shards and slices").

Redis runs one script at a time: a reader arriving while a write script runs waits for it. A
batch is therefore written as many small scripts, each fenced by its own shard's positions, and
each cut to a time budget.
"""

#: fence shards the entities are spread over (EVENTPULSE_REDIS_SHARDS) when Redis holds none
#: yet; fixed once positions are held, since an entity's shard decides which fence guards it.
#: Enough that one shard's share of a 50k-record batch fits one small script: a share that
#: outgrows the budget is cut by offset, and every such slice rewrites the shard's hot entities
#: again (64 shards under a 5 ms budget tripled Redis' CPU per event on zipf traffic;
#: 256 shards cost the same as one unbounded script per shard, docs/performance.md).
DEFAULT_SHARDS = 256

#: longest one write script may keep Redis busy, in ms (EVENTPULSE_REDIS_SCRIPT_BUDGET_MS): what
#: a reader of the same Redis may have to wait behind the worker, so it bounds readers' tail.
#: 4 ms: a reader's p99 under a 1M-key catch-up went from 5.5-5.7 ms (5 ms) to 4.4-4.8, for 2%
#: of zipf throughput; 3 ms gave 3.8-4.3 but cost 28% (hot shards cut into more slices,
#: each rewriting their entities; docs/performance.md)
SCRIPT_BUDGET_MS = 4.0
