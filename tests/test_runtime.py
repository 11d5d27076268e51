"""Process-wide settings the services apply at start."""

from __future__ import annotations

import gc
import weakref

from onoff_events.runtime import GC_THRESHOLDS, tune_garbage_collector


class _Node:
    def __init__(self) -> None:
        self.itself = self  # a reference cycle: only the cyclic collector can free it


def test_the_tuned_collector_still_frees_reference_cycles_by_itself() -> None:
    """The services raise the collector's threshold; garbage in cycles must still be freed
    without anyone calling gc.collect()."""
    before = gc.get_threshold()
    gc.collect()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        first = _Node()
        freed = weakref.ref(first)
        del first
        assert freed() is not None  # reference counting alone cannot free it
        # Garbage stays bounded: 60,000 more cyclic nodes (120,000 containers, a node and its
        # __dict__ each) are enough to trigger a collection.
        for _ in range(60_000):
            _Node()
        assert freed() is None
    finally:
        gc.set_threshold(*before)
