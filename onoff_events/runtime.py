"""Process-wide settings both services apply once at start."""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 10, 10)
"""CPython's cyclic garbage collector, first generation every 50,000 net allocations of
container objects instead of 700.

These services always hold a few thousand live records (a batch in hand, one read ahead, the
requests in flight), so at the default the collector keeps scanning objects that are still in
use, promotes them, and runs full collections over all of them: a quarter of the warehouse
consumer's CPU and 4% of the gateway's (docs/benchmarks.md). Reference counting frees almost
everything here as soon as it is done; the collector is only needed for reference cycles, and
it still finds them: garbage that cycles grows the count until a collection runs."""


def tune_garbage_collector() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
