"""DBCache through cache-dit, on the transformer alone, one request at a time.

cache-dit's own Kandinsky5 adapter patches the *pipeline class* and resets per `__call__`; our loop is
ours, so we hand cache-dit a transformer-only `BlockAdapter` over the 50 visual blocks (Pattern_3, the
same one its adapter uses), enable it for one request and disable it after, which restores the original
blocks and forward (bit-identical, tested). cache-dit tells cond from uncond by call parity, which holds
because our loop always calls cond first and uncond only with CFG; without CFG separate-CFG is off.

Runware's options map onto cache-dit's config: the window start onto `max_warmup_steps`, the window end
and `dbCacheSkipInterval` onto `steps_computation_mask` (1 = must compute), `cacheMaxConsecutiveSteps`
onto `max_continuous_cached_steps`, `dbCacheThreshold` onto `residual_diff_threshold`.
"""

from __future__ import annotations

import logging
import os

from .config import StepCacheConfig
from .stats import CacheStats

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # it logs a table per call at info level


def default_fn_blocks(num_blocks: int) -> int:
    """cache-dit's recommended F8 for the 50-block model; proportionally fewer on small test models."""
    return max(1, min(8, num_blocks // 6))


def _quiet() -> None:
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("cache_dit") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.ERROR)


class DBCacheRun:
    """cache-dit enabled on `transformer` for the `num_steps` steps starting at schedule step `first_step`."""

    def __init__(self, transformer, config: StepCacheConfig, *, first_step: int, num_steps: int,
                 branches: tuple[str, ...], fn_blocks: int | None = None):
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern

        _quiet()
        self.transformer = transformer
        self.first_step = first_step
        self.num_steps = num_steps
        self.branches = branches
        blocks = transformer.visual_transformer_blocks
        fn = fn_blocks if fn_blocks is not None else default_fn_blocks(len(blocks))
        # 1 = computed whatever the residual says: outside the window, and each forced refresh.
        mask = [0 if config.in_window(s) and not config.forced_refresh(s) else 1
                for s in range(first_step, first_step + num_steps)]
        warmup = max(1, config.start_step - first_step)
        separate_cfg = len(branches) > 1
        adapter = BlockAdapter(transformer=transformer, blocks=blocks, forward_pattern=ForwardPattern.Pattern_3,
                               has_separate_cfg=separate_cfg, check_forward_pattern=False,
                               check_num_outputs=False)
        cache_dit.enable_cache(adapter, cache_config=DBCacheConfig(
            Fn_compute_blocks=fn, Bn_compute_blocks=0, residual_diff_threshold=config.threshold,
            max_warmup_steps=warmup, max_continuous_cached_steps=config.max_consecutive,
            num_inference_steps=num_steps, enable_separate_cfg=separate_cfg, cfg_compute_first=False,
            steps_computation_mask=mask, steps_computation_policy="dynamic"))
        self._cache_dit = cache_dit

    def close(self, stats: CacheStats) -> None:
        """Fill `stats` from cache-dit's bookkeeping and remove every cache-dit hook."""
        try:
            cached = {self.branches[0]: list(getattr(self.transformer, "_cached_steps", []) or [])}
            if len(self.branches) > 1:
                cached[self.branches[1]] = list(getattr(self.transformer, "_cfg_cached_steps", []) or [])
            executed = int(getattr(self.transformer, "_accumulated_executed_steps", 0) or 0)
        finally:
            self._cache_dit.disable_cache(self.transformer)
        for branch in self.branches:
            skipped = {self.first_step + s for s in cached.get(branch, [])}
            for step in range(self.first_step, self.first_step + min(executed, self.num_steps)):
                stats.branch(branch).record(step, step in skipped)
