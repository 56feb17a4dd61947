"""One request's step cache: install on the transformer, label each pass, count, remove.

The denoising loop owns one `StepCache` per request:

    with StepCache(transformer, config, first_step=..., num_steps=..., branches=("cond", "uncond")) as cache:
        for step ...:
            with cache.step("cond", step): velocity = transformer(...)
            with cache.step("uncond", step): ...
    cache.stats  # passes computed / reused per branch

Hooks exist only inside the `with`, so requests never share state and a request without a cache runs the
untouched transformer (bit-identical output, tested).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from .config import StepCacheConfig
from .stats import CacheStats


class StepCache:
    def __init__(self, transformer, config: StepCacheConfig | None, *, first_step: int, num_steps: int,
                 branches: tuple[str, ...], teacache_coefficients: Sequence[float] | None = None,
                 dbcache_fn_blocks: int | None = None, recorder=None):
        self.transformer = transformer
        self.config = config
        self.first_step = first_step
        self.num_steps = num_steps
        self.branches = branches
        self.teacache_coefficients = teacache_coefficients
        self.dbcache_fn_blocks = dbcache_fn_blocks
        self.recorder = recorder  # TeaCache calibration: observe every step, reuse none (config must be None)
        self.stats = CacheStats(method=config.method if config else None)
        self._guard = None
        self._dbcache = None
        self._recording = False

    def __enter__(self) -> StepCache:
        config = self.config
        if config is None:
            if self.recorder is not None:
                from . import hooks

                hooks.install_teacache(self.transformer, None, hooks.DEFAULT_TEACACHE_COEFFICIENTS, self.recorder)
                self._recording = True
            return self
        if config.method == "dbcache":
            from .dbcache import DBCacheRun

            self._dbcache = DBCacheRun(self.transformer, config, first_step=self.first_step,
                                       num_steps=self.num_steps, branches=self.branches,
                                       fn_blocks=self.dbcache_fn_blocks)
            return self
        from . import hooks
        from .guard import StepGuard

        self._guard = StepGuard(config)
        self.stats = self._guard.stats
        try:
            if config.method == "teacache":
                hooks.install_teacache(self.transformer, self._guard,
                                       self.teacache_coefficients or hooks.DEFAULT_TEACACHE_COEFFICIENTS)
            else:
                hooks.install_fbcache(self.transformer, self._guard)
        except BaseException:
            hooks.remove_hooks(self.transformer)
            raise
        return self

    @contextlib.contextmanager
    def step(self, branch: str, step: int) -> Iterator[None]:
        """Around one transformer pass of `branch` at schedule step `step`."""
        if self._guard is None and not self._recording:  # no cache, or cache-dit (which counts calls itself)
            yield
            if self._dbcache is None:
                self.stats.branch(branch).record(step, False)
            return
        with self.transformer.cache_context(branch, step_index=step, num_inference_steps=self.num_steps):
            yield
        if self._recording:
            self.stats.branch(branch).record(step, False)

    def __exit__(self, *exc) -> None:
        if self._dbcache is not None:
            self._dbcache.close(self.stats)
            self._dbcache = None
        elif self._guard is not None or self._recording:
            from . import hooks

            hooks.remove_hooks(self.transformer)
