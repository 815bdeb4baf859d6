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
    ``newest_event_ms``) and ``value`` (a ``FeatureValue`` recomputed) are the same records
    summed in another order or grouping (found by an outside test: a sum of numbers from 1 to
    1e250, differing in the twelfth digit, counted as not applied, where a lag's recomputation
    grouped the records as the worker had, or unexplained): a sum or mean of the same status,
    newest event and count (a mean's), apart by at most :data:`ROUNDING_RELATIVE` of the
    larger. A sum whose terms cancel can be apart by more: that stays unexplained; a record of
    a sum left out whose share is below that bound is taken for rounding."""
    a, b = served.get("value"), value.value
    if (aggregation not in FLOAT_SUMS or type(a) is not float or type(b) is not float
            or served.get("status") != value.status
            or served.get("event_count") != value.event_count
            or served.get("newest_event_ms") != value.newest_event_ms):
        return False
    return abs(a - b) <= ROUNDING_RELATIVE * max(abs(a), abs(b))


#: how far apart two float sums of the same records may be, relative to the larger: a sum of n
#: terms of one sign rounds by at most about n units of its last place (2.2e-16 each), so this
#: covers millions of records in any order
ROUNDING_RELATIVE = 1e-9
