"""How one feature's windows are laid out inside its entity's msgpack map (docs/redis-layout.md).

Each feature of an entity is one binary entry: a header (step, kind, newest event time,
``head``, TTL) and a ring of the windows that can still be read or written, newest first — slot ``k`` is
the window ending at ``head - k * step``, ``stride`` little-endian doubles per slot (``last``: a
msgpack array, since its values may be strings). The writer adds an event's
contribution to all its windows (so a read is one slot, not a merge of ``size / step`` buckets)
and shifts the ring when a newer window opens, which is also how old windows are dropped: no
per-window fields, deletes or expiries.

Why one map per entity instead of a hash field per window: a batch then costs Redis one GET and
one SET per entity (instead of HMGET, HSET, HDEL and PEXPIRE over dozens of fields), and a read of
100 entities is one MGET whose replies msgpack decodes in C; entries are bytes that a reader
slices one slot out of, rather than lists of numbers it would have to build.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from eventpulse.tables import kinds
from eventpulse.tables.spec import WindowSpec

#: step (ms, int64), kind (one byte), newest event time, head (end of the newest window), TTL
#: (ms, int64): :data:`eventpulse.tables.kinds.HEADER_FORMAT`.
HEADER = struct.Struct(kinds.HEADER_FORMAT)
#: newest event time, head: what a read needs of the rest of the header, at ``WHEN_AT``
WHEN = struct.Struct("<qq")
WHEN_AT = kinds.WHEN_AT
SLOT1 = struct.Struct("<d")
SLOT2 = struct.Struct("<dd")


def signature(window: WindowSpec, kind: str) -> bytes:
    """The first bytes of every entry written for this window and aggregation."""
    return struct.pack("<qc", window.step_ms, kind.encode())

#: The aggregation's kind code in the entry, and the numbers it keeps per window slot
#: (eventpulse/tables/kinds.py). Sketches (stride 0) keep no ring: they live in per-step keys.
KINDS: dict[str, str] = {name: kind.entry for name, kind in kinds.KINDS.items()}
STRIDES: dict[str, int] = {entry: kind.stride for entry, kind in kinds.BY_ENTRY.items()}


def slots(window: WindowSpec) -> int:
    """Windows kept per feature (:attr:`WindowSpec.ring_slots`, bounded by
    ``spec.MAX_RING_NUMBERS``)."""
    return window.ring_slots


def slot_of(head: int, step: int, window_end: int) -> int:
    """Ring slot of the window ending at ``window_end`` (negative: newer than anything written;
    at or past the ring's length: dropped)."""
    return (head - window_end) // step


#: A ``last`` value goes through Redis' Lua (apply.lua unpacks and packs the entity's entries),
#: whose numbers are doubles and whose tables know no holes and no empty object apart from an
#: empty array: ``[1, null, 2]`` came back as a map and read as missing, ``{}`` as ``[]``,
#: ``1.0`` as ``1`` (found by an outside test). Such a value is stored as text: this prefix,
#: then its JSON; so is a string that begins with it, so that every stored string reads back.
#: Entries written before held strings as they came, so the prefix is one no string is likely
#: to begin with (a single U+0000 was: an old ``"\x00[1,2]"`` read as a list, an outside test)
LAST_ESCAPE = "\x00ep-json:"
#: integers Lua's doubles hold exactly
_EXACT_INT = 2**53


def last_stored(value: Any) -> Any:
    """What a ``last`` slot holds for ``value``: the value itself where Lua keeps it exactly
    (strings, booleans, integers within 2^53, floats that are not whole), else its escaped
    JSON (:func:`last_read` undoes it)."""
    kind = type(value)
    if kind is str:
        if not value.startswith(LAST_ESCAPE):
            return value
    elif kind is bool:
        return value
    elif kind is int:
        if -_EXACT_INT <= value <= _EXACT_INT:
            return value
    elif kind is float and not value.is_integer():
        return value
    return LAST_ESCAPE + json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def last_read(value: Any) -> Any:
    """The value a ``last`` slot holding ``value`` was given (:func:`last_stored`); a string
    behind the prefix that is not strict JSON (no writer makes one: ``NaN``, a number beyond
    a double, nesting past the parser's stack) reads as it is, never as an error that would
    fail the whole read and the alert tick with it (found by an outside test)."""
    if type(value) is str and value.startswith(LAST_ESCAPE):
        try:
            return json.loads(value[len(LAST_ESCAPE):], parse_constant=_not_json,
                              parse_float=_finite)
        except (ValueError, RecursionError):
            return value
    return value


def _not_json(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is beyond a double")
    return number
