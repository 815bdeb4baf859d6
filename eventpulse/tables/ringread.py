"""Read one ring slot per entity out of feature entries: the per-value work of every read.

A read of 100 entities x 10 features runs this a thousand times, so it exists twice: here in
Python, which is the reference and the fallback, and in ``_ringread.pyx``, its compiled twin
(built at install where there is a C compiler), which reads the MGET replies in place instead of
unpacking them into dicts, bytes, ``struct`` tuples and lists, and takes about a fifth of the
time. Tests hold the two to the same answers on random entries; ``ACCELERATED`` says which runs.

Ring kinds (count, sum, mean, ratio, min, max) and ``last`` come here; sketches need more
replies, which :mod:`eventpulse.tables.client` walks, and the bins of a percentile are merged
here (``quantile_bin``, also twice: a read of 100 entities merges about 100,000 bins).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from eventpulse.tables import kinds, ring, sketch

#: What each kind keeps per slot, as the read loop branches on it (sketches: none, not here);
#: from eventpulse/tables/kinds.py, which the compiled twin is checked against.
COUNT, SUM, AVERAGE, EXTREME, LAST = (kinds.READ_COUNT, kinds.READ_SUM, kinds.READ_AVERAGE,
                                      kinds.READ_EXTREME, kinds.READ_LAST)
CODES: dict[str, int] = kinds.READ_CODES
RING_AT = ring.HEADER.size
#: Entries whose event times or counts lie outside these are read as missing: eventpulse never
#: writes them (2**53 ms is 285,000 years), and the compiled twin's int64 arithmetic stays exact.
TIME_LIMIT = 2**53
COUNT_LIMIT = float(2**53)
_WHEN = ring.WHEN.unpack_from
_WHEN_AT = ring.WHEN_AT
_ONE = ring.SLOT1.unpack_from
_TWO = ring.SLOT2.unpack_from


class Entries(Protocol):
    """The entries of a read: ``entry(i, k)`` is entity ``i``'s entry for key ``k``."""

    def entry(self, i: int, k: int) -> bytes | None: ...


class EntityEntriesPython:
    """The entity maps of a read's MGET replies, unpacked; ``keys`` are the features asked for.

    A reply counts only if it is a msgpack map of strings to strings or binaries (what
    eventpulse writes): a key holding anything else, written by something that is not
    eventpulse, reads as an entity without features rather than failing the read of every other
    entity.
    """

    def __init__(self, raws: list[bytes | None], keys: list[bytes]) -> None:
        self.maps = [_entity_map(raw) for raw in raws]
        self.keys = keys

    def entry(self, i: int, k: int) -> bytes | None:
        return self.maps[i].get(self.keys[k])


_NONE: dict[bytes, bytes] = {}


def _entity_map(raw: bytes | None) -> dict[bytes, bytes]:
    if raw is None:
        return _NONE
    try:
        entries = msgpack.unpackb(raw, raw=True)
    except ValueError:  # msgpack's ExtraData, FormatError, StackError; keys that are not strings
        return _NONE
    if type(entries) is not dict or set(map(type, entries.values())) - _ENTRY_TYPES:
        return _NONE
    return entries


_ENTRY_TYPES = {bytes}


class RingRead(Protocol):
    """One feature of one read, as the loop needs it (``client._Feature``)."""

    name: str
    signature: bytes  # the first bytes of an entry written for this window and aggregation
    code: int  # COUNT, SUM, AVERAGE or EXTREME
    width: int  # bytes per ring slot
    step: int
    start: int
    end: int
    stale_after: int  # age past which a value is stale
    missing: Any  # the value of an entity without a usable entry
    unknown: Any  # the value of a window older than the ring keeps


def read_column_python(value_type: type[tuple[Any, ...]], f: RingRead,
                       entries: EntityEntriesPython, k: int, rows: list[dict[str, Any]], at: int,
                       fresh: str) -> None:
    """Set ``rows[i][f.name]`` to the value of the window ``f.start``..``f.end`` in entity
    ``i``'s entry for key ``k``, for every entity of the read, with its contract
    (``value_type``'s fields: value, window start and end, newest event, age, status, event
    count)."""
    make = tuple.__new__  # value_type(...) without NamedTuple's Python-level __new__
    name, key, signature, code, width = f.name, entries.keys[k], f.signature, f.code, f.width
    step, start, end, stale_after = f.step, f.start, f.end, f.stale_after
    missing, unknown = f.missing, f.unknown
    # ring position of the window: RING_AT + width * (head - end) // step
    base = RING_AT - width * (end // step)
    for entity, values in zip(entries.maps, rows, strict=True):
        entry = entity.get(key)
        times = entry_times(entry, signature)
        if entry is None or times is None:
            values[name] = missing
            continue
        newest, head = times
        if code == LAST:  # a msgpack array of (event time, value) per slot
            value = last_value(entry, ring.slot_of(head, step, end))
            if value is UNKNOWN:
                values[name] = unknown
                continue
            count = None
        else:
            pos = base + width * (head // step)
            if pos + width > len(entry):  # older than the ring keeps
                values[name] = unknown
                continue
            if pos < RING_AT:  # newer than every event: empty
                value, count = missing.value, missing.event_count
            elif code == SUM:
                value, count = _ONE(entry, pos)[0], None
            else:
                if code == COUNT:
                    events = value = _ONE(entry, pos)[0]
                elif code == AVERAGE:  # mean, ratio: sum or numerator, events
                    first, events = _TWO(entry, pos)
                    value = first / events if events else None
                else:  # min, max: events, extreme
                    events, extreme = _TWO(entry, pos)
                    value = extreme if events else None
                if not 0 <= events < COUNT_LIMIT:  # not a count of events: not eventpulse's
                    values[name] = missing
                    continue
                count = int(events)
                if code == COUNT:
                    value = count
        age = at - newest
        if age < 0:
            age = 0
        values[name] = make(value_type, (value, start, end, newest, age,
                                         "stale" if age > stale_after else fresh, count))


def entry_times(entry: bytes | None, signature: bytes) -> tuple[int, int] | None:
    """An entry's newest event time and head, or None where there is nothing to read: no entry
    (never seen, or not within its TTL), one written for another window or aggregation (another
    signature), or one with event times eventpulse never writes. The compiled twin's
    ``_usable_entry``."""
    if entry is None or not entry.startswith(signature) or len(entry) < RING_AT:
        return None
    newest, head = _WHEN(entry, _WHEN_AT)
    if not (-TIME_LIMIT < newest < TIME_LIMIT and -TIME_LIMIT < head < TIME_LIMIT):
        return None
    return newest, head


#: What :func:`last_value` returns for a window the entry does not keep (or cannot be read).
UNKNOWN: Any = object()


def last_value(entry: bytes, slot: int) -> Any:
    """The value in ``slot`` of a ``last`` entry: none if no event reached that window (event
    time 0, or a window newer than the ring), UNKNOWN past the ring's end or where the entry
    cannot be read up to that slot. Reads only as far as the slot, as the compiled twin does."""
    view = memoryview(entry)[RING_AT:]
    try:  # the whole ring at once, in C; an entry msgpack can read whole reads the same
        pairs = msgpack.unpackb(view)
    except (ValueError, msgpack.UnpackException):
        return _last_value_up_to(view, slot)  # broken somewhere: is it before the slot?
    if type(pairs) is not list:
        return UNKNOWN
    j = 2 * slot
    if j + 1 >= len(pairs):
        return UNKNOWN
    return ring.last_read(pairs[j + 1]) if j >= 0 and pairs[j] else None


def _last_value_up_to(view: memoryview, slot: int) -> Any:
    reader = msgpack.Unpacker()
    reader.feed(view)
    try:
        j = 2 * slot
        if j + 1 >= reader.read_array_header():
            return UNKNOWN
        if j < 0:
            return None
        for _ in range(j):
            reader.skip()
        if not reader.unpack():  # no event reached this window
            reader.skip()
            return None
        return ring.last_read(reader.unpack())
    except (ValueError, msgpack.UnpackException):  # not msgpack, cut short, or not UTF-8
        return UNKNOWN


#: A read's loop over one feature's column: (value type, feature, entries, its key's index in
#: them, rows, at, fresh status).
Reader = Callable[[type[tuple[Any, ...]], RingRead, Any, int, list[dict[str, Any]], int, str],
                  None]


def quantile_bin_python(replies: list[Any], q: float) -> tuple[int, int] | None:
    """:func:`sketch.quantile_bin` of a percentile feature's bucket hashes (``HGETALL``
    replies: bin -> count, as a map or a flat array) merged, the bins of one field adding up.
    A read of 100 entities of a 5-bucket window merges about a hundred thousand bins: the
    compiled twin does it in C."""
    merged: dict[str, int] = {}
    for bins in replies:
        # a map in RESP3 (redis-py's default), a flat field, count, ... array in RESP2
        pairs = bins.items() if isinstance(bins, dict) else zip(bins[::2], bins[1::2],
                                                                  strict=True)
        for k, v in pairs:
            name = k.decode() if isinstance(k, bytes) else k
            merged[name] = merged.get(name, 0) + _count(v)
    return sketch.quantile_bin(merged, q)


def _count(raw: Any) -> int:
    """A bin's count as HINCRBY leaves it: a non-negative decimal (ValueError otherwise: the
    value reads as missing)."""
    count = sketch.decimal(raw.decode() if isinstance(raw, bytes) else raw) if isinstance(
        raw, bytes | str) else int(raw)
    if count < 0:
        raise ValueError(f"negative bin count {count}")
    return count


EntityEntries: Callable[[list[bytes | None], list[bytes]], Entries] = EntityEntriesPython
read_column: Reader = read_column_python
quantile_bin: Callable[[list[Any], float], tuple[int, int] | None] = quantile_bin_python
try:
    from eventpulse.tables import _ringread
except ImportError:  # pragma: no cover - built wherever `pip install` found a C compiler
    ACCELERATED = False
else:
    EntityEntries, read_column = _ringread.EntityEntries, _ringread.read_column
    quantile_bin = _ringread.quantile_bin
    ACCELERATED = True
