"""`k5serve calibrate teacache`: run the unaccelerated pipeline over prompts and fit TeaCache's polynomial."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace

from k5serve.accel.calibration import fit_teacache

from .k5 import K5T2IPipeline
from .worker import GenerationSpec

log = logging.getLogger("k5serve.calibrate")


def calibrate_teacache(pipe: K5T2IPipeline, specs: Iterable[GenerationSpec]) -> dict:
    """Every spec runs without caching while TeaCache's hooks observe (x, y) at every step of each branch."""
    xs: list[float] = []
    ys: list[float] = []
    per_branch: dict[str, int] = {}

    def record(branch: str, step: int, x: float, y: float) -> None:
        xs.append(x)
        ys.append(y)
        per_branch[branch] = per_branch.get(branch, 0) + 1

    runs = 0
    for spec in specs:
        pipe.generate(replace(spec, cache=None), recorder=record)
        runs += 1
        log.info("calibration run %d: %d samples so far", runs, len(xs))
    result = fit_teacache(xs, ys)
    result.update(runs=runs, samples_per_branch=per_branch)
    return result
