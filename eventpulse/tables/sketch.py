"""Percentiles as mergeable DDSketch histograms kept in Redis hashes.

DDSketch (Masson et al., VLDB 2019) maps a value x > 0 to the bin ``ceil(log_gamma(x))``; any
quantile read back is within ``RELATIVE_ACCURACY`` of the true one (relative error), whatever the
distribution. Bins add, so the sketch of a window is the sum of its events' bins, which is exactly
what ``HINCRBY`` does: no read-modify-write, and the same bin math as DataDog's ``ddsketch`` library
(whose mapping we use) so that any DDSketch implementation can read our hashes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from math import ceil, log

from ddsketch.mapping import LogarithmicMapping

#: Relative accuracy of every percentile feature: the value returned is within 1% of the true one.
RELATIVE_ACCURACY = 0.01
_MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)
_MIN_POSITIVE = _MAPPING.min_possible
ZERO_BIN = "z"
NEGATIVE_PREFIX = "n"


#: ddsketch's ``LogarithmicMapping.key(x)`` is ``int(ceil(log(x, 2) * multiplier) + offset)``;
#: the same arithmetic inline, from the mapping's own constants, takes half the time of its two
#: method calls, and :func:`bin_of` runs for every event of a percentile feature
#: (tests/test_sketch.py holds the two to the same bins)
_MULTIPLIER: float = _MAPPING._multiplier
_OFFSET: float = _MAPPING._offset


def bin_of(value: float) -> str:
    """The hash field a value counts in (``_MAPPING.key``'s bin, as ddsketch numbers them)."""
    if value > _MIN_POSITIVE:
        return str(int(ceil(log(value, 2) * _MULTIPLIER) + _OFFSET))
    if value < -_MIN_POSITIVE:
        return NEGATIVE_PREFIX + str(int(ceil(log(-value, 2) * _MULTIPLIER) + _OFFSET))
    return ZERO_BIN


#: a bin key or a count as eventpulse and Redis write them: a decimal integer, no sign but a
#: minus, no leading zero, ASCII digits only (Python's ``int`` also takes " 1", "+1", "1_0"
#: and other scripts' digits: a hash holding those was written by something else)
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)")


def decimal(text: str) -> int:
    """An integer written as :data:`_DECIMAL` says; ValueError for anything else ("-0" too)."""
    if _DECIMAL.fullmatch(text) is None or text == "-0":
        raise ValueError(f"not a decimal integer: {text[:40]!r}")
    return int(text)


def quantile(bins: Mapping[str, int] | Iterable[tuple[str, int]], q: float) -> float | None:
    """The q-quantile of a merged sketch (``None`` when empty), as ddsketch computes it."""
    found = quantile_bin(bins, q)
    return None if found is None else bin_value(*found)


def quantile_bin(bins: Mapping[str, int] | Iterable[tuple[str, int]], q: float,
                 ) -> tuple[int, int] | None:
    """Where the q-quantile of a merged sketch lies: (sign, bin key), sign -1, 0 (the zero
    bin) or 1; ``None`` when the sketch is empty. Bins with a count of 0 or less are ignored."""
    items = bins.items() if isinstance(bins, Mapping) else bins
    negative: list[tuple[int, int]] = []
    positive: list[tuple[int, int]] = []
    zero = 0
    for field, count in items:
        count = int(count)
        if count <= 0:
            continue
        if field == ZERO_BIN:
            zero += count
        elif field.startswith(NEGATIVE_PREFIX):
            negative.append((decimal(field[1:]), count))
        else:
            positive.append((decimal(field), count))
    total = zero + sum(c for _, c in negative) + sum(c for _, c in positive)
    if total == 0:
        return None
    rank = q * (total - 1)
    seen = 0
    for key, count in sorted(negative, reverse=True):
        seen += count
        if seen > rank:
            return -1, key
    seen += zero
    if seen > rank:
        return 0, 0
    for key, count in sorted(positive):
        seen += count
        if seen > rank:
            return 1, key
    return (1, max(positive)[0]) if positive else (0, 0)


def bin_value(sign: int, key: int) -> float:
    """The value a bin stands for (its sign from :func:`quantile_bin`), as ddsketch reads it."""
    return 0.0 if sign == 0 else sign * float(_MAPPING.value(key))
