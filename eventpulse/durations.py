"""Human durations in config files: ``250ms``, ``30s``, ``5m``, ``1h``, ``7d`` or plain seconds."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


#: the earliest and the latest moment eventpulse takes as epoch milliseconds, for records, reads
#: and labels alike: 1970-01-01T00:00:00Z (the store takes 0 as "no event yet": apply.lua's
#: newest event time starts there, a `last` slot at 0 is empty; records before 1970 were
#: stored without their newest time and no read could reach them, found by outside testing)
#: and 9999-12-31T23:59:59.999Z (what Python's datetime can show)
MIN_EPOCH_MS = 0
MAX_EPOCH_MS = 253_402_300_799_999


def wall_ms() -> int:
    """Now, in epoch milliseconds: the one wall clock of alerts, receipts, silences and reads."""
    return int(time.time() * 1000)


def parse_duration_ms(value: Any) -> int:
    """Duration in integer milliseconds; numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 1h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return int(value * 1000)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return int(float(match.group(1)) * _UNITS_MS[match.group(2)])
    raise ValueError(f"expected a duration such as 30s, 5m or 1h, got {value!r}")


def format_duration_ms(ms: int) -> str:
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


#: A pydantic field type: accepts ``"5m"`` and stores 300000; serialises back to ``"5m"`` so that a
#: dumped spec (the feature registry in Redis) reads back the same.
DurationMs = Annotated[int, BeforeValidator(parse_duration_ms),
                       PlainSerializer(format_duration_ms, return_type=str)]
