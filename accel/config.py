"""What a request asks of step caching, in absolute schedule steps (torch-free: the server builds it)."""

from __future__ import annotations

import math
from dataclasses import dataclass

METHODS = ("teacache", "fbcache", "dbcache")


@dataclass(frozen=True)
class StepCacheConfig:
    """One step cache for one request.

    * `threshold`: the method's own tolerance, in [0, 1]; higher reuses more. teaCache: the accumulated
      (rescaled) relative change of the first block's modulated input; fbCache: the relative change of the
      first block's residual; dbCache: the relative change of the first `Fn` blocks' residual. 0 never reuses.
    * Caching may only happen at steps `start_step <= s < end_step` (0-based schedule steps); at most
      `max_consecutive` steps in a row reuse the cache, per CFG branch.
    * `skip_interval` (dbCache only): inside the window every `skip_interval`-th step, counted from
      `start_step`, is a forced refresh (computed whatever the residual says), so at most `skip_interval - 1`
      steps are reused between two refreshes; 1 means every step is computed.
    """

    method: str
    threshold: float
    start_step: int
    end_step: int
    max_consecutive: int = 3
    skip_interval: int = 5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown step cache {self.method!r}; use one of {METHODS}")
        if not 0 <= self.start_step < self.end_step:
            raise ValueError(f"cache window [{self.start_step}, {self.end_step}) is empty")
        if self.max_consecutive < 1 or self.skip_interval < 1:
            raise ValueError("max_consecutive and skip_interval must be >= 1")

    def in_window(self, step: int) -> bool:
        return self.start_step <= step < self.end_step

    def forced_refresh(self, step: int) -> bool:
        """dbCache: a step inside the window that must be computed because of `skip_interval`."""
        return self.method == "dbcache" and self.in_window(step) and (step - self.start_step) % self.skip_interval == 0


def resolve_window(steps: int, start_step: int | None = None, end_step: int | None = None,
                   start_percentage: int | None = None, end_percentage: int | None = None) -> tuple[int, int]:
    """The cache window [start, end) in steps. Percentages round outwards (start down, end up), so a
    valid percentage pair never gives an empty window. Unset ends mean 0 and `steps`."""
    if start_step is not None:
        start = start_step
    elif start_percentage is not None:
        start = math.floor(steps * start_percentage / 100)
    else:
        start = 0
    if end_step is not None:
        end = end_step
    elif end_percentage is not None:
        end = math.ceil(steps * end_percentage / 100)
    else:
        end = steps
    return start, end


@dataclass(frozen=True)
class AccelSettings:
    """The operator's side of step caching (the same for every request)."""

    teacache_coefficients: tuple[float, ...] | None = None  # None: the documented default (identity)
    dbcache_fn_blocks: int | None = None  # None: F8 on the 50-block model, proportionally fewer on tiny ones
