"""Retry delays: exponential with jitter, never shorter than the sink's own Retry-After."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    initial_seconds: float = 0.5
    max_seconds: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2  # ± this fraction, so replicas that failed together retry apart

    def delay(
        self, attempt: int, retry_after: float | None = None, unit: float | None = None
    ) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based); ``unit`` in [0, 1) is the
        random draw (tests pass it; production draws one)."""
        draw = random.random() if unit is None else unit  # noqa: S311 # jitter, not crypto
        base = min(self.max_seconds, self.initial_seconds * self.multiplier**attempt)
        jittered = base * (1 - self.jitter + 2 * self.jitter * draw)
        if retry_after is not None:
            # The server said when; waiting less only earns another 429.
            return max(jittered, retry_after)
        return jittered
