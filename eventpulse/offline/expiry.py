"""Key expiry in the training set's replay: a value read where the live key had expired is
``missing``, as the live read said.

The worker writes an entity's key (``apply.lua``) with PX the longest TTL of the entries it
keeps, each time a batch holds a record some feature of that entity took. Idle for that long,
the key is gone: a read finds ``missing`` (counts read 0), and the next write starts a key
afresh. The replay's own keys live for the build, so without this a label an hour after an
entity's last record read its empty windows as ``present``.

When did the worker write? Not before the broker had the record (its *reach*: the highest
broker time of its partition up to it, ``entityindex``), and, as ``--settle`` assumes for
``lag_sensitive``, not more than ``settle_ms`` after. So the live key surely lived at a moment
``idle`` ms after the reach of the latest record that wrote it while ``idle < TTL``, and surely
expired once ``idle >= TTL + settle_ms``. In between the value gets ``lag_sensitive``: either
may have been served.

Where the replay may have to act, it sends ``idle.lua`` before the moment's commands; the
script reads the TTL off the replay's key (the same entries as the live key's), deletes the key
where the live one surely expired (the live read's ``missing`` then comes from the live read
path itself, and a later write starts a fresh key as the worker's did) and says where it cannot
tell. Entities written within their shortest TTL need no script: the common case costs a dict
update per entity brought up.

Not modelled: an expiry between two records of one bring-up (records since the entity was last
read, in replay order, which is not time order across partitions). The next write after a gap
prunes entries older than their TTL in event time (``apply.lua``), so values and statuses still
agree unless event times trail broker times by more than the margin; sketches' per-step keys,
which expire on their own, lie outside every window once the entity's key has expired.
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
    #: ms from the earliest the entity's last write can have been to the moment asked about
    idle: int
    rows: list[int] = field(default_factory=list)
    answer: int | None = None
    #: the key's TTL as the replay's key shows it (0: no key)
    ttl: int = 0

    def answered(self, reply: Any) -> None:
        """Take idle.lua's reply (an error reply raises: nothing after it can be trusted)."""
        if isinstance(reply, Exception):
            raise reply
        self.answer, self.ttl = int(reply[0]), int(reply[1])

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
                 settle_ms: int) -> None:
        self.namespace = namespace
        self.settle_ms = settle_ms
        built = {spec.name for spec in specs}
        #: per entity type, the shortest TTL the replay writes: idle less than that, no key
        #: can have expired
        self.shortest: dict[str, int] = {}
        #: per entity type, the longest TTL of its features the replay does not write
        self.unbuilt: dict[str, int] = {}
        for spec in job_features:
            ttl = spec.ttl or 0
            if spec.name in built:
                known = self.shortest.get(spec.entity)
                self.shortest[spec.entity] = ttl if known is None else min(known, ttl)
            else:
                self.unbuilt[spec.entity] = max(self.unbuilt.get(spec.entity, 0), ttl)
        #: (entity type, id) -> the reach of the latest record written to its key
        self.written: dict[tuple[str, str], int] = {}
        self._sha = ""

    async def load(self, redis: aioredis.Redis) -> None:
        self._sha = await redis.script_load(IDLE_LUA)

    def wrote(self, entity: str, entity_id: str, low: int, high: int) -> Check | None:
        """A bring-up wrote records reaching from ``low`` to ``high`` to the entity's key
        (``fold.add_each``; -1: none); the check to run before that write where the live key
        may have expired since the one before."""
        if low < 0:
            return None
        key = (entity, entity_id)
        last = self.written.get(key)
        if last is None or high > last:
            self.written[key] = high
        if last is None or low - last < self.shortest[entity] - self.settle_ms:
            return None
        # the live write of ``low`` fell between low and low + settle, the key's expiry
        # between last + TTL and last + TTL + settle
        return self._check(entity, entity_id, low - last, self.settle_ms, self.settle_ms)

    def before_read(self, entity: str, entity_id: str, at_ms: int) -> Check | None:
        """The check to run before a read of the entity at ``at_ms``, where its live key may
        have expired by then."""
        last = self.written.get((entity, entity_id))
        if last is None or at_ms - last < self.shortest.get(entity, 0):
            return None
        return self._check(entity, entity_id, at_ms - last, 0, self.settle_ms)

    def _check(self, entity: str, entity_id: str, idle: int, lower: int, upper: int) -> Check:
        key = features_key(self.namespace, entity, entity_id, 1)
        return Check(("EVALSHA", self._sha, 1, key, idle, lower, upper,
                      self.unbuilt.get(entity, 0)), idle)
