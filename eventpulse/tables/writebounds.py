"""The two numbers that bound a batch's writes, in one place (settings, the combiner and the
checkpoint read them from here; docs/design.md, "Bounded writes: shards and slices").

Redis runs one script at a time: a reader arriving while a write script runs waits for it. A
batch is therefore written as many small scripts, each fenced by its own shard's positions, and
each cut to a time budget.
"""

#: fence shards the entities are spread over (EVENTPULSE_REDIS_SHARDS) when Redis holds none
#: yet; fixed once positions are held, since an entity's shard decides which fence guards it.
#: Enough that one shard's share of a 50k-record batch fits one small script even while the
#: machine runs slow: a share that outgrows the budget is cut by offset, and every such slice
#: rewrites the shard's hot entities again (64 shards under a 5 ms budget tripled Redis' CPU
#: per event on zipf traffic; 256 under 4 ms were cut whenever Redis ran slow, 414 scripts a
#: batch instead of 257 and 10-12 us of Redis CPU per event instead of 7; 1024 are not cut,
#: docs/performance.md).
DEFAULT_SHARDS = 1024

#: longest one write script may keep Redis busy, in ms (EVENTPULSE_REDIS_SCRIPT_BUDGET_MS): what
#: a reader of the same Redis may have to wait behind the worker, so it bounds readers' tail.
#: 3 ms: with 1024 shards a reader's p99 under a 1M-key catch-up is 3.8-3.9 ms against
#: 4.3-4.5 at 4 ms, for no measurable zipf throughput and a sixth of the catch-up rate (with
#: 256 shards 3 ms cost 28% of zipf throughput: hot shards cut into more slices, each
#: rewriting their entities; docs/performance.md)
SCRIPT_BUDGET_MS = 3.0
