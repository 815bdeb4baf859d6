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
