"""Step-skipping acceleration: TeaCache, First Block Cache and DBCache on Kandinsky 5's visual blocks.

`config` and `stats` are torch-free (the server builds a `StepCacheConfig` from `acceleratorOptions`);
`session.StepCache` is what the denoising loop uses; `hooks` (diffusers hooks: FBC, TeaCache) and
`dbcache` (cache-dit) hold the methods.
"""

from .config import METHODS, AccelSettings, StepCacheConfig, resolve_window
from .stats import BranchStats, CacheStats

__all__ = ["METHODS", "AccelSettings", "BranchStats", "CacheStats", "StepCacheConfig", "resolve_window"]
