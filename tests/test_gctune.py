"""The collector's tuning for builds (eventpulse/gctune.py): off while a block builds what it
holds, frozen and on after ``settled()``, everything as it was after the block."""

from __future__ import annotations

import gc

import pytest

from eventpulse import gctune


@pytest.mark.parametrize("enabled_before", [True, False])
def test_tuned_turns_the_collector_off_then_freezes_and_restores(enabled_before: bool) -> None:
    thresholds = gc.get_threshold()
    was = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        with gctune.tuned() as settled:
            assert not gc.isenabled()
            assert gc.get_threshold() == gctune.THRESHOLDS
            held = [[i] for i in range(1_000)]
            settled()
            assert gc.isenabled() is enabled_before
            assert gc.get_freeze_count() >= len(held)
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == thresholds
        assert gc.isenabled() is enabled_before
        with pytest.raises(RuntimeError), gctune.tuned():
            raise RuntimeError("a build that fails before settling")
        assert gc.isenabled() is enabled_before
    finally:
        (gc.enable if was else gc.disable)()
