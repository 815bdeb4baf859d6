"""The training set's replay on one connection: the writes and reads of many moments in one
round trip, one batch in flight while the next is combined.

Redis runs the commands of one connection in the order they were sent. A read sent after moment
x's writes and before moment x+1's therefore sees exactly what x's writes left, without waiting
for their replies. A write and then a read per moment, each awaited, kept the two sides taking
turns: the Python side idle about a quarter of the build while Redis ran, Redis idle while
Python combined, and each round trip costing about 0.2 ms of client CPU on this machine's
loopback (docs/performance.md, "Training sets in processes"). The commands are the live ones:
:meth:`FeatureStore.commands` (``apply.lua``) and :meth:`AsyncFeatureClient.read_plan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis

from eventpulse.offline.expiry import Check
from eventpulse.tables.batch import WritePlan
from eventpulse.tables.client import FeatureValue, ReadPlan
from eventpulse.tables.keys import meta_key
from eventpulse.tables.store import FeatureStore
from eventpulse.tables.wire import packed, read_replies_async

#: commands per batch: a few hundred moments of the bench's label sets; enough to make a round
#: trip's cost small, few enough that the first replies are not long in coming
BATCH_COMMANDS = 2_000


@dataclass
class Moment:
    """What one moment of the replay writes and reads, in that order."""

    #: the cut index
    x: int
    plan: WritePlan | None = None
    #: per feature, per entity id, the buckets the plan changes (BatchCombiner.spans; only
    #: where lag_sensitive marks are asked for)
    spans: dict[str, dict[str, tuple[int, int]]] | None = None
    #: a new ``observed_since`` to record before the reads (a partition joined mid-stream)
    observed_since: int | None = None
    #: the reads, each with the label rows it answers
    reads: list[tuple[ReadPlan, list[int]]] = field(default_factory=list)
    #: key expiry (eventpulse.offline.expiry): checks sent before the writes, and before each
    #: read (``read_checks[i]`` right before ``reads[i]``: reads come in time order, so that a
    #: key deleted for a later moment is read as it was at an earlier one); each holds its
    #: answer once the moment is read back
    before_write: list[Check] = field(default_factory=list)
    read_checks: list[list[Check]] = field(default_factory=list)
    #: replies to expect, set by :meth:`MomentPipe.add`: the writes', then each read's
    replies: list[int] = field(default_factory=list)


#: called per moment in order, once its writes are acknowledged
Written = Callable[[Moment], None]
#: called per moment in order with each read's values (by entity id) and its rows
Read = Callable[[Moment, list[tuple[dict[str, dict[str, FeatureValue]], list[int]]]], None]


class MomentPipe:
    """Moments go in with :meth:`add`; their replies come back, in order, through the
    callbacks. One Redis (not a cluster: one connection reaches every key)."""

    def __init__(self, redis: aioredis.Redis, feature_store: FeatureStore, written: Written,
                 read: Read) -> None:
        self.redis = redis
        self.feature_store = feature_store
        self.written = written
        self.read = read
        self._meta = meta_key(feature_store.namespace)
        self._conn: Any = None
        self._pending: list[Moment] = []
        self._commands: list[tuple[Any, ...]] = []
        #: the batch sent and not yet read back
        self._in_flight: list[Moment] = []
        self._in_flight_replies = 0

    async def __aenter__(self) -> MomentPipe:
        await self.feature_store.load_script()
        self._conn = await self.redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        conn, self._conn = self._conn, None
        if exc is not None or self._in_flight:
            await conn.disconnect()  # never hand back a connection with unread replies
        await self.redis.connection_pool.release(conn)

    def add(self, moment: Moment) -> None:
        commands = [check.command for check in moment.before_write]
        writes = [] if moment.plan is None else self.feature_store.commands(moment.plan)
        moment.replies = [len(writes)]
        commands += writes
        if moment.observed_since is not None:
            commands.append(("HSET", self._meta, "observed_since", moment.observed_since))
        for (plan, _), before in zip(moment.reads, moment.read_checks, strict=True):
            commands += [check.command for check in before]
            reads = plan.commands()
            moment.replies.append(len(reads))
            commands += reads
        self._commands += commands
        self._pending.append(moment)

    @property
    def full(self) -> bool:
        return len(self._commands) >= BATCH_COMMANDS

    async def send(self) -> None:
        """Read back the batch in flight, then send what was added since."""
        await self._collect()
        if not self._pending:
            return
        await self._conn.send_packed_command(packed(self._commands), check_health=False)
        self._in_flight, self._in_flight_replies = self._pending, len(self._commands)
        self._pending, self._commands = [], []

    async def finish(self) -> None:
        """Send what is left and read every reply."""
        await self.send()
        await self._collect()

    async def _collect(self) -> None:
        if not self._in_flight:
            return
        replies = await read_replies_async(self._conn, self._in_flight_replies)
        moments, self._in_flight = self._in_flight, []
        at = 0
        for moment in moments:
            for check in moment.before_write:
                check.answered(replies[at])
                at += 1
            n = moment.replies[0]
            if moment.plan is not None:
                conflict = self.feature_store.acknowledge(moment.plan, replies[at:at + n])
                if conflict is not None:  # a private namespace: nobody else writes there
                    raise RuntimeError(
                        f"unexpected writer in the private namespace at {conflict.tp}")
            at += n + (moment.observed_since is not None)
            self.written(moment)
            values = []
            for (plan, rows), n, before in zip(moment.reads, moment.replies[1:],
                                               moment.read_checks, strict=True):
                for check in before:
                    check.answered(replies[at])
                    at += 1
                values.append((plan.decode(replies[at:at + n]), rows))
                at += n
            self.read(moment, values)
