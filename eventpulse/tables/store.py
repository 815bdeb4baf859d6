"""Writes feature batches to Redis, slice by slice, each slice fenced by its shard's positions.

docs/design.md ("Bounded writes: shards and slices") explains why a batch is several scripts and
why that stays exactly once; docs/redis-layout.md lists the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, TryAgainError

from eventpulse.redisconn import RedisModeError, check_mode, is_cluster
from eventpulse.tables import kinds, relayout, wire
from eventpulse.tables.batch import PartitionPosition, Slice, WritePlan
from eventpulse.tables.client import registry_key
from eventpulse.tables.keys import fence_key, meta_key, offsets_key
from eventpulse.tables.spec import FeatureSpec
from eventpulse.tables.writebounds import DEFAULT_SHARDS

APPLY_LUA = kinds.with_lua_prologue(
    (resources.files("eventpulse.tables") / "lua" / "apply.lua").read_text())
#: the key layout this code writes (docs/redis-layout.md); kept in the meta hash
LAYOUT = 4

# Layout 2 -> 3, atomically: the single offsets hash becomes every shard's fence (so that all
# shards start where the partition stood) and goes away. A fence already there wins (another
# worker migrated first). Refuses another shard count than the one the fences were made for.
MIGRATE_LUA = """
local shards = ARGV[1]
local held = redis.call('HGET', KEYS[2], 'shards')
if held and held ~= shards then return {'shards', held} end
local old = redis.call('HGETALL', KEYS[1])
for k = 3, #KEYS do
  for j = 1, #old, 2 do redis.call('HSETNX', KEYS[k], old[j], old[j + 1]) end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'shards', shards, 'layout', ARGV[2])
return {'ok', #old / 2}
"""


async def held_shards(client: aioredis.Redis, namespace: str) -> int | None:
    """The fence shard count Redis holds for ``namespace`` (``None``: no worker wrote yet)."""
    held = await client.hget(meta_key(namespace), "shards")
    return int(held) if held is not None else None


def shard_mismatch(configured: int, held: int, namespace: str) -> str:
    """What to tell a user whose EVENTPULSE_REDIS_SHARDS contradicts the fences Redis holds."""
    return (f"EVENTPULSE_REDIS_SHARDS is {configured} but Redis holds fences for {held} shards "
            f"under namespace {namespace!r}: set EVENTPULSE_REDIS_SHARDS={held} or leave it unset "
            "(the shard count cannot change while positions are held)")


class ReplicaLag(TryAgainError):
    """Fewer replicas than asked acknowledged a batch's writes in time: its Kafka offsets wait
    (a transient error: the retry policy waits it out, docs/design.md)."""


class LayoutError(RuntimeError):
    """Redis holds fences this worker cannot use as configured; waiting will not help."""


#: times in a row a write may find the script gone again, right after loading it, before it
#: gives up: a Redis whose scripts are flushed in a loop (SCRIPT FLUSH every 50 ms, found by
#: outside testing) still lets each load through some waves; one that never keeps it is broken
SCRIPT_RELOADS = 10


@dataclass(frozen=True, slots=True)
class Conflict:
    """Another writer moved ``tp`` on in some shard: reload positions and rebuild the batch."""

    tp: str
    current: PartitionPosition


class CostModel:
    """How many milliseconds of Redis time one cost unit of a slice takes, learnt from the
    slices written (each script reports its own run time, as Redis' clock saw it): the 90th
    percentile of the last ``window`` slices of at least ``min_fill`` of the largest slice
    allowed (smaller ones, a shard's remainder at a batch's end, are mostly fixed cost and
    noise). Slices are planned at ``headroom`` of the budget: the same units cost more on
    entities that already hold data than on new ones, and a loaded machine deschedules Redis
    mid-script. (The highest recent time instead of a percentile made slices 3-4 times smaller
    than needed on zipf traffic: less combining, more round trips, about a third of the
    throughput lost on a noisy machine. A fixed floor of 100 units instead of a fraction of the
    allowed size left the model blind under small budgets, where no slice reaches 100 units:
    it kept its conservative starting value and cut slices about 5 times smaller than the
    budget allowed. The starting estimate, 0.01 ms per unit, is about what the zipf and the
    distinct-key workloads of bench/ settle at: a pessimistic start cut the first batches into
    five times more slices than needed, which a short catch-up never recovered.)"""

    def __init__(self, ms_per_unit: float = 0.01, window: int = 128, min_fill: float = 0.5,
                 headroom: float = 0.5) -> None:
        self.headroom = headroom
        self.min_fill = min_fill
        self.recent: deque[float] = deque(maxlen=window)
        self._estimate = ms_per_unit
        #: the largest slice last allowed (units): what "full" means for ``min_fill``
        self._allowed = 0.0

    @property
    def ms_per_unit(self) -> float:
        return self._estimate

    def observe(self, cost: float, seconds: float) -> None:
        if cost <= 0 or cost < self.min_fill * self._allowed:
            return
        self.recent.append(min(1.0, seconds * 1000 / cost))
        ordered = sorted(self.recent)
        self._estimate = ordered[int(len(ordered) * 0.9)]

    def max_cost(self, budget_ms: float) -> float:
        """Cost units one slice may hold to run within ``budget_ms``."""
        self._allowed = max(1.0, budget_ms * self.headroom / self._estimate)
        return self._allowed


class FeatureStore:
    """The write side of the feature tables."""

    def __init__(self, client: aioredis.Redis, namespace: str, group: str,
                 shards: int | None = None, wait_replicas: int = 0,
                 wait_timeout_ms: int = 1000) -> None:
        """``shards``: ``None`` takes the count Redis holds, else the default (settled by the
        first call that needs it), so that a worker upgraded from a smaller default keeps using
        the keys it wrote, and tools read whatever the writers use."""
        self.client = client
        self.namespace = namespace
        self.group = group
        #: the shard count is still to be read from Redis (``shards=None``)
        self.unsettled = shards is None
        self._set_shards(DEFAULT_SHARDS if shards is None else shards)
        self.meta_key = meta_key(namespace)
        self.cluster = is_cluster(client)
        #: replicas that must hold a batch's writes before :meth:`apply` returns (0: none)
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.cost = CostModel()
        self._apply: AsyncScript = client.register_script(APPLY_LUA)
        self._migrate: AsyncScript = client.register_script(MIGRATE_LUA)

    def _set_shards(self, shards: int) -> None:
        self.shards = shards
        #: one per shard, the control fence last
        self.fence_keys = [fence_key(self.namespace, self.group, s, shards)
                           for s in range(shards + 1)]

    async def settle_shards(self) -> int:
        """The shard count, read from Redis once when it was not given."""
        if self.unsettled:
            self._set_shards(await held_shards(self.client, self.namespace) or DEFAULT_SHARDS)
            self.unsettled = False
        return self.shards

    async def prepare_layout(self) -> int:
        """Settle the shard count (adopting what Redis holds when asked to), check it against
        Redis and migrate layout 2's offsets hash into the fences; returns how many partitions
        were migrated."""
        try:
            await check_mode(self.client)
        except RedisModeError as exc:
            raise LayoutError(str(exc)) from None
        await self.settle_shards()
        await relayout.from_layout3(self.client, self.namespace, self.shards)
        # A cluster never held layout 2 (its script spanned slots): the same script checks and
        # records the shard count over the meta hash alone, in its slot (the offsets key given
        # is one that never exists, under the meta's tag).
        keys = ([self.meta_key + ":layout2-offsets-none", self.meta_key]
                if is_cluster(self.client) else
                [offsets_key(self.namespace, self.group), self.meta_key, *self.fence_keys])
        result = await self._migrate(keys=keys, args=[self.shards, LAYOUT])
        if _text(result[0]) == "shards":
            raise LayoutError(shard_mismatch(self.shards, int(result[1]), self.namespace))
        return int(result[1])

    async def fences(self, tps: Iterable[str]) -> dict[str, list[PartitionPosition | None]]:
        """Every shard's position (the control fence last) of each partition."""
        names = list(tps)
        if not names:
            return {}
        await self.settle_shards()
        async with self.client.pipeline(transaction=False) as pipe:
            for key in self.fence_keys:
                pipe.hmget(key, names)
            rows = await pipe.execute()
        return {tp: [PartitionPosition.decode(row[k]) if row[k] is not None else None
                     for row in rows] for k, tp in enumerate(names)}

    async def positions(self, tps: Iterable[str]) -> dict[str, PartitionPosition | None]:
        """Where each partition stands for every shard: the lowest of its fences (``None``
        while some shard never applied it). A worker resumes reading after it."""
        out: dict[str, PartitionPosition | None] = {}
        for tp, each in (await self.fences(tps)).items():
            out[tp] = None if None in each else min(
                each, key=lambda p: p.offset if p else -1)
        return out

    async def all_positions(self) -> dict[str, PartitionPosition | None]:
        """:meth:`positions` of every partition the group ever applied (tools, tests, benches)."""
        await self.settle_shards()
        names = await self.client.hkeys(self.fence_keys[-1])
        return await self.positions(sorted(_text(n) for n in names))

    async def publish(self, specs: Iterable[FeatureSpec], lease_ms: int = 0) -> None:
        """Publish feature definitions so that readers need no copy of the YAML (``lease_ms``:
        see :attr:`WritePlan.lease_ms`)."""
        mapping: dict[Any, Any] = {s.name: s.model_dump_json() for s in specs}
        key = registry_key(self.namespace)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            if mapping:
                pipe.hset(key, mapping=mapping)
                if lease_ms:
                    pipe.pexpire(key, lease_ms)
            await pipe.execute()

    async def apply(self, plan: WritePlan) -> Conflict | None:
        """Write the plan's slices, resuming after those an earlier attempt had acknowledged.

        The control slice and the fence-only moves are tiny: one pipeline. Entity slices go in
        waves: consecutive slices whose costs add up to at most one slice's budget share a
        pipeline (Redis may run a pipeline's scripts back to back from one socket read, so a
        wave, not a slice, is what must fit the budget); a slice at the budget goes alone.
        Waves are half a budget, and the next goes out while what is unanswered stays within
        one budget: while Redis runs one wave, the next is already there, so Redis is not left
        idle until this event loop, busy combining the next batch, gets round to reading a
        reply, and a reader still finds at most one budget of work ahead of it.
        """
        await self.settle_shards()
        if plan.shards != self.shards:
            raise ValueError(f"a plan cut for {plan.shards} shards, a store of {self.shards}")
        if plan.is_empty:
            return None
        stalled = 0
        while True:
            applied = plan.applied
            try:
                conflict = await self._write(plan)
                break
            except NoScriptError:  # a Redis without the script (restarted, flushed, a promoted
                # replica or a new node of a cluster): load it, resume after the last
                # acknowledged slice (a slice that did run answers 'again' and writes nothing),
                # as long as each load gets some slices through
                stalled = 0 if plan.applied > applied else stalled + 1
                if stalled > SCRIPT_RELOADS:
                    raise
                await self.load_script()
        if conflict is not None:
            return conflict
        await self.replicated(plan)
        return None

    async def _write(self, plan: WritePlan) -> Conflict | None:
        """The slices after ``plan.applied``: the heads in one round trip, then the waves."""
        if plan.applied == 0:
            heads = [plan.control, *plan.advances]
            conflict = self._acknowledge(plan, heads, await self._send(heads, plan))
            if conflict is not None:
                return conflict
        if self.cluster:
            return await self._write_cluster_waves(plan)
        return await self._stream_waves(plan)

    async def _stream_waves(self, plan: WritePlan) -> Conflict | None:
        """One Redis: the waves go out in order on one connection, each as soon as what is
        unanswered leaves room for it, and the replies are read as they come.

        One connection's order is the order Redis runs them in, so a shard's slices need no
        wait for each other; and the next wave is written by the task that read the reply, in
        the same turn of the event loop. With a wave per pooled connection, each wave a task
        of its own, a reply took four or five turns (the socket read, the reader's task, the
        waiting task, the new wave's task) to become the next wave on the wire: Redis sat idle
        between waves while the combiner held the loop, a 50k batch's write took 0.7-1.0 s for
        0.3-0.4 s of Redis time and the worker waited for it (docs/performance.md)."""
        conflict: Conflict | None = None
        unanswered: deque[tuple[list[Slice], float]] = deque()
        cost_unanswered = 0.0
        async with wire.pooled(self.client) as conn:

            async def answer() -> None:
                nonlocal conflict, cost_unanswered
                sent, cost = unanswered.popleft()
                cost_unanswered -= cost
                replies = await wire.read_replies_async(conn, len(sent))
                if conflict is None:  # past a conflict, the replies are read and not counted
                    conflict = self._acknowledge(plan, sent, replies)

            for wave in self._waves(plan):
                cost = sum(piece.cost for piece in wave)
                while unanswered and cost + cost_unanswered > plan.max_cost:
                    await answer()
                if conflict is not None:
                    break
                await wire.send(conn, self._commands_of(wave, plan))
                unanswered.append((wave, cost))
                cost_unanswered += cost
            while unanswered:  # a connection goes back to the pool with nothing unread
                await answer()
        return conflict

    async def _write_cluster_waves(self, plan: WritePlan) -> Conflict | None:
        """A Redis Cluster: each wave is one cluster pipeline (every primary its share, all at
        once); more go out while what is unanswered stays within one budget, never beside an
        unanswered one holding a slice of the same shard (its fence expects that one applied
        first: two pipelines may reach a primary on different connections)."""
        inflight: deque[tuple[list[Slice], asyncio.Future[list[Any]]]] = deque()
        try:
            for wave in self._waves(plan):
                shards = {piece.shard for piece in wave}
                cost = sum(piece.cost for piece in wave)
                while inflight and (
                        cost + sum(p.cost for sent, _ in inflight for p in sent) > plan.max_cost
                        or any(p.shard in shards for sent, _ in inflight for p in sent)):
                    sent, replies = inflight.popleft()
                    conflict = self._acknowledge(plan, sent, await replies)
                    if conflict is not None:
                        return conflict
                inflight.append((wave, asyncio.ensure_future(self._send(wave, plan))))
                await asyncio.sleep(0)  # the request goes out now, before the next is packed
            while inflight:
                sent, replies = inflight.popleft()
                conflict = self._acknowledge(plan, sent, await replies)
                if conflict is not None:
                    return conflict
        finally:
            # a conflict or an error leaves the later wave to finish on its own: wait for it
            # (what it wrote is fenced like any slice; a retry or rebuild finds it applied)
            for _, replies in inflight:
                with contextlib.suppress(Exception):
                    await replies
        return None

    @staticmethod
    def _waves(plan: WritePlan) -> list[list[Slice]]:
        """The slices still to write (after ``plan.applied``), in waves of at most half the
        budget (a larger slice goes alone)."""
        pieces = plan.all_slices
        waves: list[list[Slice]] = []
        at = plan.applied
        while at < len(pieces):
            wave = [pieces[at]]
            cost = wave[0].cost
            for piece in pieces[at + 1:]:
                if cost + piece.cost > plan.max_cost / 2:
                    break
                wave.append(piece)
                cost += piece.cost
            waves.append(wave)
            at += len(wave)
        return waves

    async def replicated(self, plan: WritePlan) -> None:
        """Wait until ``wait_replicas`` replicas of every primary the plan wrote to hold its
        writes (``WAIT``), so that a failover after the Kafka commit cannot lose them; raises
        :class:`ReplicaLag` when they do not within ``wait_timeout_ms``.

        ``WAIT`` covers the writes of the connection it runs on; the slices went out on pooled
        connections, so each primary gets a tiny write of its own (``<shard tag>:sync``, one per
        shard slot, expiring) and the ``WAIT`` right behind it on the same connection: the
        primary's offset then is past every slice it acknowledged."""
        if self.wait_replicas <= 0:
            return
        shards = sorted({piece.shard for piece in plan.all_slices})
        pipe = self.client.pipeline(transaction=False)
        if self.cluster:
            by_node: dict[str, tuple[Any, int]] = {}
            for shard in shards:
                node = self.client.get_node_from_key(self.fence_keys[shard])  # type: ignore[attr-defined]
                by_node.setdefault(node.name, (node, shard))
            for node, shard in by_node.values():
                pipe.set(self._sync_key(shard), 1, px=60_000)
                pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms,
                                     target_nodes=node)
        else:
            pipe.set(self._sync_key(shards[0]), 1, px=60_000)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        replies = await pipe.execute()
        acked = [int(r) for r in replies[1::2]]
        if min(acked) < self.wait_replicas:
            raise ReplicaLag(f"{min(acked)} of {self.wait_replicas} replicas acknowledged the "
                             f"batch within {self.wait_timeout_ms} ms "
                             "(EVENTPULSE_REDIS_WAIT_REPLICAS)")

    def _sync_key(self, shard: int) -> str:
        return self.fence_keys[shard].rsplit(":fence:", 1)[0] + ":sync"

    async def _send(self, pieces: list[Slice], plan: WritePlan) -> list[Any]:
        """Apply ``pieces`` in one round trip; their replies in order.

        On one Redis, their EVALSHAs go out in one write and the replies are read in one go
        (:func:`wire.round_trip`): a batch writes about a thousand slices, one or two per
        round trip, and redis-py's per-command path cost about a third of a round trip's
        client CPU (docs/performance.md)."""
        commands = self._commands_of(pieces, plan)
        if self.cluster:
            return await self._send_cluster(commands)
        return await wire.round_trip(self.client, commands)

    async def load_script(self) -> None:
        """Load the write script, for callers of :meth:`commands` (EVALSHA only)."""
        await self.client.script_load(APPLY_LUA)

    def commands(self, plan: WritePlan) -> list[tuple[Any, ...]]:
        """The plan's slices as EVALSHA commands, I/O-free, for a caller that sends them with
        other commands on one connection of one Redis, in order: the training set's replay,
        whose reads must see each write and nothing after it, which one connection's order
        gives without a round trip per write. No budget, no waves (a private namespace: no
        reader waits behind them); :meth:`acknowledge` reads the replies."""
        if self.cluster:
            raise ValueError("one connection's commands: not on a Redis Cluster")
        return self._commands_of(plan.all_slices[plan.applied:], plan)

    def _commands_of(self, pieces: list[Slice], plan: WritePlan) -> list[tuple[Any, ...]]:
        """The EVALSHA of each of ``plan``'s slices ``pieces``."""
        out: list[tuple[Any, ...]] = []
        features, lease_ms = plan.packed_features, plan.lease_ms
        for piece in pieces:
            keys = self._keys(piece)
            out.append(("EVALSHA", self._apply.sha, len(keys), *keys,
                        *piece.argv(features, lease_ms)))
        return out

    def acknowledge(self, plan: WritePlan, replies: list[Any]) -> Conflict | None:
        """:meth:`apply`'s account of the replies to :meth:`commands`."""
        return self._acknowledge(plan, plan.all_slices[plan.applied:], replies)

    def _acknowledge(self, plan: WritePlan, pieces: list[Slice],
                     results: list[Any]) -> Conflict | None:
        """Count ``pieces`` in ``plan.applied`` up to the first conflict, which is returned."""
        for piece, result in zip(pieces, results, strict=True):
            if (conflict := _conflict(result)) is not None:
                return conflict
            if len(result) > 1 and _text(result[1]) != "again":
                self.cost.observe(piece.cost, int(result[1]) / 1e6)
            plan.applied += 1
        return None

    async def _send_cluster(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """A wave on a Redis Cluster: redis-py's cluster pipeline sends each primary its
        slices in one round trip, all primaries concurrently (it takes no script objects:
        the EVALSHAs are queued as commands)."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return list(await pipe.execute())

    def _keys(self, piece: Slice) -> list[str]:
        # KEYS[2] is the meta hash for the control slice (observed_since); an entity slice
        # never writes it, and names its fence again so that all its keys share one slot
        fence = self.fence_keys[piece.shard]
        return [fence, self.meta_key if piece.shard == self.shards else fence, *piece.keys]


def _conflict(result: list[Any]) -> Conflict | None:
    if _text(result[0]) == "ok":
        return None
    return Conflict(_text(result[1]), PartitionPosition.decode(_text(result[2]) or None))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
