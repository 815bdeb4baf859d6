"""Python's cyclic garbage collector, tuned for code that holds millions of long-lived objects
and allocates millions of short-lived ones (the worker's batches, a training set's build).

With CPython's default thresholds a collection runs every 700 container allocations, and the
full ones walk over everything held, again and again: about 15% of a worker batch's CPU and a
third of a training set's build (docs/performance.md). Young collections run less often, and
what is held for good is frozen out of the collector's sight.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

#: gc.set_threshold's: a young collection every 50,000 allocations, the older ones as usual
THRESHOLDS = (50_000, 20, 20)


def tune_for_good() -> None:
    """For a process from here on (the worker): what its start-up made, frozen; the
    thresholds, raised."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


@contextlib.contextmanager
def tuned() -> Iterator[Callable[[], None]]:
    """For a block that first builds what it holds (e.g. a training set's archive and its
    index), then works on it: the collector off while it builds (millions of new objects,
    none of them garbage, which young collections would walk and promote again and again:
    0.3-0.4 s of a 2 s index), and the call that then freezes what is held and turns the
    collector back on with the raised thresholds. All undone after the block."""
    before = gc.get_threshold()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_threshold(*THRESHOLDS)

    def settled() -> None:
        gc.freeze()
        if was_enabled:
            gc.enable()

    try:
        yield settled
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        if was_enabled:
            gc.enable()
