"""The rules every step cache obeys, whatever decides that a step looks reusable (torch-free).

Runware's window (`cacheStartStep`/`cacheEndStep` or percentages) and `cacheMaxConsecutiveSteps` apply to
all three methods, but none of the libraries has all of them: diffusers' First Block Cache has neither,
cache-dit has its own spelling of both. So the guard is ours and each method asks it before reusing.
"""

from __future__ import annotations

from .config import StepCacheConfig
from .stats import CacheStats


class StepGuard:
    def __init__(self, config: StepCacheConfig):
        self.config = config
        self.stats = CacheStats(method=config.method)

    def may_reuse(self, branch: str, step: int) -> bool:
        """Whether this branch may reuse its cache at `step` (the method still has the last word)."""
        stats = self.stats.branch(branch)
        return (self.config.in_window(step) and not self.config.forced_refresh(step)
                and stats.computed > 0 and stats.run < self.config.max_consecutive)

    def record(self, branch: str, step: int, reused: bool) -> None:
        self.stats.branch(branch).record(step, reused)
