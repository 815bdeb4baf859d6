"""Values as served: when two are the same value (the consistency report's exact matches, the
training set's tie checks)."""

from __future__ import annotations

import math
from typing import Any


def identical(a: Any, b: Any) -> bool:
    """Equal as JSON values of the same types: ``1`` is not ``1.0``, ``-0.0`` not ``0.0``,
    ``True`` not ``1`` (Python's ``==`` says they are, and the report counted such differences,
    which a `last` feature can serve, as exact; found by an outside test). Object members in
    any order; NaN is NaN."""
    kind = type(a)
    if kind is not type(b):
        return False
    if kind is float:
        return (a == b and math.copysign(1.0, a) == math.copysign(1.0, b)) or (a != a and b != b)
    if kind is list:
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if kind is dict:
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    return bool(a == b)


#: the aggregations whose values are float sums, which the order and grouping in which records
#: were added change in their last bits (a mean is a sum over a count)
FLOAT_SUMS = frozenset({"sum", "mean"})


def rounding_apart(aggregation: str, served: dict[str, Any], value: Any) -> bool:
    """Whether ``served`` (a logged read's value: ``value``, ``status``, ``event_count``,
    ``newest_event_ms``) and ``value`` (a ``FeatureValue`` recomputed) are a mean of the same
    records summed in another order or grouping, for a read without logged positions: the
    same status, newest event and count, apart by at most :data:`ROUNDING_RELATIVE` of the
    larger. Only a mean: its count says the records are the same; a sum's value says nothing
    of a record left out of it below any bound (found by an outside test: a lag hidden as
    rounding). With positions, the consistency report bounds the rounding by the records
    themselves (:func:`rounding_bound`)."""
    pair = float_sums(aggregation, served, value)
    if (pair is None or aggregation != "mean" or value.event_count is None
            or served.get("event_count") != value.event_count):
        return False
    a, b = pair
    return abs(a - b) <= ROUNDING_RELATIVE * max(abs(a), abs(b))


def float_sums(aggregation: str, served: dict[str, Any], value: Any,
               ) -> tuple[float, float] | None:
    """The served and recomputed values of a ``sum`` or ``mean`` that may differ only in
    rounding (both floats, of the same status and newest event), or None: what both rounding
    rules (:func:`rounding_apart`, the consistency report's bound by the records) start from."""
    a, b = served.get("value"), value.value
    if (aggregation not in FLOAT_SUMS or type(a) is not float or type(b) is not float
            or served.get("status") != value.status
            or served.get("newest_event_ms") != value.newest_event_ms):
        return None
    return a, b


#: how far apart two float means of the same records may be, relative to the larger, where the
#: records themselves are not known: a sum of n terms of one sign rounds by at most about n
#: units of its last place (2.2e-16 each): this covers millions of records in any order
ROUNDING_RELATIVE = 1e-9


def rounding_bound(terms: list[float]) -> float:
    """How far apart two float sums of ``terms``, each added up in any order and grouping, can
    be: a sum of ``n`` terms is ``n - 1`` additions, each rounding by at most half a unit of
    the last place of its result, no partial sum being larger than ``sum(|x|)``; so two sums
    are within ``(n - 1) ulp(sum(|x|))``. (A first bound, ``2 n 2^-52 sum(|x|)``, let through
    differences no order could make: found by an outside test.) The sum of magnitudes taken a
    hair larger, for a partial sum rounded across a power of two."""
    if len(terms) < 2:
        return 0.0
    magnitude = math.fsum(abs(t) for t in terms)
    return (len(terms) - 1) * math.ulp(magnitude * (1 + 2.0**-40))
