"""Which values of a training set count records the broker had just before their moment: the
``lag_sensitive`` status (``eventpulse training-set --settle``).

A worker lagging by up to ``settle`` ms at a label's moment had not applied what the broker
received in that time, so a value that counts such a record may have been served without it.
The replay writes those records in their own writes, after ``moment - settle``
(:func:`eventpulse.offline.training.cuts_of`); each write says, per feature and entity, which
buckets it changed (:meth:`BatchCombiner.spans`: after the feature's filters and lateness
rule). A value read over the window ``[start, end)`` counts one of those records only if a
bucket of such a write lies in it: a record the broker had a moment ago whose event time is
after the end of the window read (the latest closed window of a hopping feature usually ends
before the moment) cannot have changed the value, and marking it would hide the value's real
status (found by an outside test: 220 of 1,965 marks of one feature were needed).
"""

from __future__ import annotations

from eventpulse.tables.client import FeatureValue


class RecentWrites:
    """The writes of the last ``settle_ms`` per (feature, entity id): (moment, earliest
    bucket, latest bucket); and per entity (type, id) the moment of its key's first write."""

    def __init__(self, settle_ms: int, entity_of: dict[str, str]) -> None:
        self.settle_ms = settle_ms
        #: feature name -> its entity type
        self.entity_of = entity_of
        #: per feature name, per entity id (nested: no key tuple made per write)
        self._writes: dict[str, dict[str, list[tuple[int, int, int]]]] = {
            name: {} for name in entity_of}
        #: per entity type, per id: the moment of the write that created its key
        self._created: dict[str, dict[str, int]] = {e: {} for e in entity_of.values()}

    def note(self, spans: dict[str, dict[str, tuple[int, int]]], cut: int) -> None:
        """A write at moment ``cut`` (:meth:`BatchCombiner.spans`: of every entity it wrote, or
        of those a read within ``settle_ms`` after it may count it for). Writes at or before
        ``cut - settle_ms`` are let go: every later read's settle time starts after them."""
        horizon = cut - self.settle_ms
        for name, by_id in spans.items():
            writes = self._writes[name]
            for entity_id, (low, high) in by_id.items():
                kept = writes.get(entity_id)
                if kept is None:
                    writes[entity_id] = [(cut, low, high)]
                else:
                    if kept[0][0] <= horizon:
                        kept[:] = [write for write in kept if write[0] > horizon]
                    kept.append((cut, low, high))

    def wrote(self, touched: dict[str, set[str]], cut: int) -> None:
        """The entities a write at moment ``cut`` wrote (``WritePlan.touched``: per feature
        name, the entity ids): the first write of an entity's key created it."""
        by_entity: dict[str, list[set[str]]] = {}
        for name, ids in touched.items():
            by_entity.setdefault(self.entity_of[name], []).append(ids)
        for entity, sets in by_entity.items():
            created = self._created[entity]
            new = set().union(*sets).difference(created)
            if new:
                created.update(dict.fromkeys(new, cut))

    def counted(self, name: str, entity_id: str, since: int, value: FeatureValue) -> bool:
        """Whether ``value`` (of feature ``name`` for ``entity_id``) may count a record written
        after moment ``since``: a write since then changed a bucket of the window it was read
        over."""
        for cut, low, high in self._writes[name].get(entity_id, ()):
            if cut > since and low < value.window_end_ms and high >= value.window_start_ms:
                return True
        return False

    def created(self, entity: str, entity_id: str, cut: int) -> None:
        """The write at moment ``cut`` (may have) created the entity's key afresh (after it
        expired: eventpulse/offline/expiry.py)."""
        self._created[entity][entity_id] = cut

    def created_since(self, entity: str, entity_id: str, since: int) -> bool:
        """Whether the entity's key was created (first written, or afresh after an expiry)
        after moment ``since``: a worker that had applied only what the broker had by then
        found no key (every value ``missing``)."""
        return self._created[entity].get(entity_id, since) > since
