"""Key expiry in the training set's replay: a value read where the live key had expired is
``missing``, as the live read said (docs/archive.md, "Key expiry").

The worker writes an entity's key (``apply.lua``) with PX the longest TTL of the entries it
keeps, each time a batch holds a record some feature of that entity took. Idle for that long,
the key is gone: a read finds ``missing`` (counts read 0), and the next write starts a key
afresh. The replay's own keys live a lease that outlasts the build (``training.KEY_LEASE_MS``:
its clock runs far faster than the archive's), so without this a label an hour after an
entity's last record read its empty windows as ``present``.

When did the worker write? Not before the broker had the record (its *reach*: the highest
broker time of its partition up to it, ``entityindex``), and, as ``--settle`` assumes for
``lag_sensitive``, not more than ``settle_ms`` after. So the live key surely lived at a moment
``idle`` ms after the reach of the latest record that wrote it while ``idle < TTL``, and surely
expired once ``idle >= TTL + settle_ms``. In between the value gets ``lag_sensitive``: either
may have been served.

Where the replay may have to act, it sends ``idle.lua`` before the moment's commands; the
script reads the TTL off the replay's key (the same entries as the live key's: the replay
writes every feature of the entity type on the topics it reads, ``training.replayed``) and says
where the live one surely expired: before a write it deletes the key (the write starts a fresh
key, as the worker's did); before a read it keeps it (a later read at an earlier moment, of
the consistency report's earlier cut-offs, must still find it) and the row gets the live
read's ``missing`` values. It also says where it cannot tell. Entities written within their
shortest TTL need no script: the common case costs a dict update per entity brought up.
Features of the entity type on other topics, which the replay does not write, make it unable
to tell more often (:meth:`Expiry.in_doubt`).

The consistency report asks more (``lag_ms``, its longest lag): where a worker that wrote a
record up to that much later than the broker had it would have found the live key expired
(while the replay's lived), which entries it then served ``missing``, and how late it must
have been (:meth:`Expiry.late_renewal`).

A bring-up (an entity's records since it was last read) never spans an idle time in which its
key may have expired where a label moment falls in it: the replay brings the entity up to that
moment too (``training._compute``, ``entityindex.gaps``). Not modelled: such an idle time
without a label moment (its records go in one write, in replay order, which is not time order
across partitions). The TTL covers the window, a step and the lateness (``FeatureSpec``), so
nothing of the old key counts in a window read by then; the next write prunes entries older
than their TTL in event time (``apply.lua``), so only an entry whose event times trail its
broker times by more than the margin can still read ``present`` (empty) where the live read
said ``missing``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis

from eventpulse.tables import kinds
from eventpulse.tables.keys import features_key
from eventpulse.tables.spec import FeatureSpec

IDLE_LUA = kinds.with_lua_prologue(
    (resources.files("eventpulse.tables") / "lua" / "idle.lua").read_text())

#: idle.lua's answers
LIVES, EXPIRED, UNKNOWN = 0, 1, 2


@dataclass
class Check:
    """One idle.lua call and, once answered, its answer; the label rows it decides for (none:
    a check before a write)."""

    command: tuple[Any, ...]
    #: the entity (type, id) whose key it asks about
    key: tuple[str, str]
    #: ms from the earliest the entity's last write can have been to the moment asked about
    idle: int
    rows: list[int] = field(default_factory=list)
    answer: int | None = None
    #: the key's TTL as the replay's key shows it (0: no key)
    ttl: int = 0
    #: the newest event time of the key's entries (-1: no key)
    newest: int = -1

    def answered(self, reply: Any) -> None:
        """Take idle.lua's reply (an error reply raises: nothing after it can be trusted)."""
        if isinstance(reply, Exception):
            raise reply
        self.answer, self.ttl, self.newest = int(reply[0]), int(reply[1]), int(reply[2])

    @property
    def expired_for(self) -> int | None:
        """How long before the moment the live key expired, had the worker written it as the
        broker had the record (None: it had not, or there is no key)."""
        if self.answer == LIVES or self.idle < self.ttl:
            return None
        return self.idle - self.ttl


class Expiry:
    """When each entity's key was last written, and the checks that follow from it."""

    def __init__(self, specs: list[FeatureSpec], job_features: list[FeatureSpec], namespace: str,
                 settle_ms: int, lag_ms: int = 0) -> None:
        """``lag_ms``: how much later than ``settle_ms`` a worker may have written a record
        (the consistency report's longest lag): a write that late may have found the live key
        expired where the replay's lived, and :meth:`late_renewal` says how late."""
        self.namespace = namespace
        self.settle_ms = settle_ms
        self.lag_ms = lag_ms
        built = {spec.name for spec in specs}
        #: per entity type, the shortest TTL the replay writes: idle less than that, no key
        #: can have expired
        self.shortest: dict[str, int] = {}
        #: per entity type with features the replay does not write (on other topics than the
        #: replayed ones: training.replayed): their records' writes are unknown, so no key of
        #: that type surely expired
        self.unseen: set[str] = set()
        for spec in job_features:
            ttl = spec.ttl or 0
            if spec.name in built:
                known = self.shortest.get(spec.entity)
                self.shortest[spec.entity] = ttl if known is None else min(known, ttl)
            else:
                self.unseen.add(spec.entity)
        #: (entity type, id) -> the reach of the latest record written to its key
        self.written: dict[tuple[str, str], int] = {}
        #: (entity type, id) -> the newest event time of the key before a write that may or
        #: may not have found the live key expired: an entry no newer was not written since
        #: and may be gone live (:meth:`in_doubt`)
        self.doubt: dict[tuple[str, str], int] = {}
        #: (entity type, id) -> (lag, newest): a write at least ``lag`` ms later than the
        #: broker had its records (beyond ``settle_ms``) found the live key expired, and the
        #: entries no newer than ``newest`` gone (:meth:`late_renewal`)
        self.renewals: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self.ttls = {spec.name: spec.ttl or 0 for spec in specs}
        self._sha = ""

    def may_expire_within(self, span_ms: int) -> bool:
        """Whether any key can idle long enough to need a check within ``span_ms`` of time
        (from the first record to the last read)."""
        return span_ms >= min(self.shortest.values(), default=0) - self.settle_ms - self.lag_ms

    def idle_limit(self, entity: str) -> int:
        """The idle time (between two records of an entity, by reach) from which the write of
        the second may have found the live key expired (:meth:`wrote` checks it)."""
        return self.shortest[entity] - self.settle_ms - self.lag_ms

    async def load(self, redis: aioredis.Redis) -> None:
        self._sha = await redis.script_load(IDLE_LUA)

    def wrote(self, entity: str, entity_id: str, low: int, high: int) -> Check | None:
        """A bring-up wrote records reaching from ``low`` to ``high`` to the entity's key (the
        records some feature took: ``fold.add_each``); the check to run before that write
        where the live key may have expired since the one before."""
        key = (entity, entity_id)
        last = self.written.get(key)
        if last is None or high > last:
            self.written[key] = high
        if last is None or low - last < self.idle_limit(entity):
            return None
        # the live write of ``low`` fell between low and low + settle (+ lag), the key's
        # expiry between last + TTL and last + TTL + settle
        return self._check(entity, entity_id, low - last, self.settle_ms + self.lag_ms,
                           self.settle_ms, delete=True)

    def before_read(self, entity: str, entity_id: str, at_ms: int) -> Check | None:
        """The check to run before a read of the entity at ``at_ms``, where its live key may
        have expired by then."""
        last = self.written.get((entity, entity_id))
        if last is None or at_ms - last < self.shortest.get(entity, 0):
            return None
        return self._check(entity, entity_id, at_ms - last, 0, self.settle_ms)

    def _check(self, entity: str, entity_id: str, idle: int, lower: int, upper: int,
               delete: bool = False) -> Check:
        key = features_key(self.namespace, entity, entity_id, 1)
        return Check(("EVALSHA", self._sha, 1, key, idle, lower, upper,
                      int(entity in self.unseen), int(delete)), (entity, entity_id), idle)

    def settled(self, check: Check) -> bool:
        """Take an answered check before a write: a key deleted is fresh, as the live one was
        (nothing of it in doubt); a write that may or may not have found the live key expired
        leaves what was written before it in doubt. Whether the write may have created the
        live key afresh."""
        if check.answer == EXPIRED:
            self.doubt.pop(check.key, None)
            self.renewals.pop(check.key, None)
            return True
        if check.answer == UNKNOWN:
            if check.idle < check.ttl - self.settle_ms:  # expired only for a write that late
                lag = check.ttl - check.idle
                # the key's newest event only grows until it expires (which drops the list):
                # an earlier renewal that needs as much lag or more explains nothing more
                kept = [r for r in self.renewals.get(check.key, ()) if r[0] < lag]
                self.renewals[check.key] = [*kept, (lag, check.newest)]
                return False
            self.doubt[check.key] = check.newest
            return True
        return False

    def late_renewal(self, entity: str, entity_id: str, newest: int | None) -> int | None:
        """How late (ms after the broker had it) the worker must have written some record of
        the entity for a read of an entry whose newest event is ``newest`` to find it gone
        (None: not within ``lag_ms``): the write found the live key expired, and started a
        fresh key without the entry."""
        found = self.renewals.get((entity, entity_id))
        if not found or newest is None:
            return None
        return min((lag for lag, since in found if newest <= since), default=None)

    def in_doubt(self, entity: str, entity_id: str, at_ms: int, name: str,
                 newest: int | None) -> bool:
        """Whether a value read from an entry whose newest event is ``newest`` may have been
        served ``missing``: its entry was written before a write that may have found the live
        key expired, or (with features the replay does not write) it is older than its TTL
        and a write the replay cannot see may have dropped it (``apply.lua`` drops entries
        older than their TTL in event time). Either way its window is empty by then."""
        if newest is None:
            return False
        since = self.doubt.get((entity, entity_id))
        if since is not None and newest <= since:
            return True
        return entity in self.unseen and newest + self.ttls[name] < at_ms

