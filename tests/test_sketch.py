"""The percentile bins are ddsketch's: ``bin_of`` (its mapping's arithmetic inline, for speed)
names the bin ``LogarithmicMapping.key`` gives, for every value, on both sides of zero."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from eventpulse.tables import sketch

MAPPING = sketch._MAPPING


def ddsketch_bin(value: float) -> str:
    if value > MAPPING.min_possible:
        return str(MAPPING.key(value))
    if value < -MAPPING.min_possible:
        return sketch.NEGATIVE_PREFIX + str(MAPPING.key(-value))
    return sketch.ZERO_BIN


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_bin_of_is_the_mappings_bin_for_any_float(value: float) -> None:
    assert sketch.bin_of(value) == ddsketch_bin(value)


def test_bin_of_agrees_at_bin_edges_and_extremes() -> None:
    rng = random.Random(3)
    values = [0.0, -0.0, MAPPING.min_possible, -MAPPING.min_possible, MAPPING.max_possible,
              math.nextafter(MAPPING.min_possible, math.inf), 1.0, 1e-300, 1e300, 5e-324]
    # the values bins start at, and their neighbours: where a rounding difference would show
    for key in range(-2000, 2000, 3):
        edge = math.pow(2.0, key / MAPPING._multiplier)  # where bin `key` ends
        values += [edge, math.nextafter(edge, 0.0), math.nextafter(edge, math.inf),
                   MAPPING.value(key)]
    values += [rng.lognormvariate(0, 6) for _ in range(20_000)]
    values += [-v for v in values]
    for value in values:
        assert sketch.bin_of(value) == ddsketch_bin(value), value
