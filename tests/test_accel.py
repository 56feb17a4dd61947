"""Step caching (accel/) on the real pipeline and tiny weights: exactness when off, skipping when on, the
Runware window and max-consecutive rules step by step, per-branch counts, and every pipeline feature it
must work with. Generations are 256x256 (the pipeline itself takes any multiple of 32) to keep them fast.

On tiny random weights consecutive steps differ a lot (relative changes ~0.2-1.2), so "a threshold that
skips" is 1.0 here; on real weights the useful thresholds are far lower.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from k5serve.accel import METHODS, AccelSettings, StepCacheConfig, resolve_window
from k5serve.accel.calibration import fit_teacache, load_coefficients
from k5serve.accel.guard import StepGuard
from k5serve.pipelines.engine import EngineConfig, K5Engine
from k5serve.pipelines.k5 import K5T2IPipeline
from k5serve.pipelines.schedulers import SCHEDULER_NAMES
from k5serve.pipelines.worker import GenerationSpec
from k5serve.weights.tiny import ensure_tiny
from PIL import Image

SPEC = GenerationSpec("a red fox in the snow", "blurry", width=256, height=256, seed=3, steps=12, guidance_scale=5.0)


def cache(method: str, threshold: float = 1.0, start: int = 0, end: int = 12, consecutive: int = 3,
          interval: int = 5) -> StepCacheConfig:
    return StepCacheConfig(method=method, threshold=threshold, start_step=start, end_step=end,
                           max_consecutive=consecutive, skip_interval=interval)


def pixels(out) -> np.ndarray:
    return np.stack([np.asarray(img, dtype=np.int16) for img in out.images])


def assert_valid_image(out) -> None:
    arr = pixels(out)
    assert arr.shape[1:] == (256, 256, 3) and arr.std() > 1.0  # decoded, not blank


def runs_of(steps: list[int]) -> list[int]:
    """Lengths of the runs of consecutive step numbers."""
    runs: list[int] = []
    for i, s in enumerate(steps):
        if i and s == steps[i - 1] + 1:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs


@pytest.fixture(scope="module")
def engine(data_dir) -> K5Engine:
    pipe = K5T2IPipeline.from_pretrained(ensure_tiny(data_dir / "tiny", "t2i"))
    pipe.set_progress_bar_config(disable=True)
    return K5Engine(pipe, EngineConfig(i2i_path=ensure_tiny(data_dir / "tiny", "i2i")))


@pytest.fixture(scope="module")
def base(engine):
    return engine.generate(SPEC)


def test_uncached_generation_counts_every_pass(base):
    stats = base.cache_stats
    assert stats["method"] is None and stats["skipped"] == 0
    assert {b: (v["computed"], v["skipped"]) for b, v in stats["branches"].items()} == {"cond": (12, 0),
                                                                                          "uncond": (12, 0)}


@pytest.mark.parametrize("method", METHODS)
def test_a_never_skipping_threshold_is_bit_identical(engine, base, method):
    out = engine.generate(dataclasses.replace(SPEC, cache=cache(method, threshold=0.0)))
    assert out.cache_stats["method"] == method and out.cache_stats["skipped"] == 0
    assert np.array_equal(pixels(out), pixels(base))


@pytest.mark.parametrize("method", METHODS)
def test_a_skipping_threshold_skips_and_still_gives_an_image(engine, base, method):
    out = engine.generate(dataclasses.replace(SPEC, cache=cache(method)))
    stats = out.cache_stats
    for branch in ("cond", "uncond"):
        counts = stats["branches"][branch]
        assert counts["skipped"] > 0 and counts["computed"] + counts["skipped"] == 12
        assert len(counts["skippedSteps"]) == counts["skipped"]
    assert stats["computed"] + stats["skipped"] == 24
    assert_valid_image(out)
    assert not np.array_equal(pixels(out), pixels(base))
    # The hooks are gone afterwards: the next uncached request is exactly the uncached image.
    assert np.array_equal(pixels(engine.generate(SPEC)), pixels(base))


@pytest.mark.parametrize("method", METHODS)
def test_caching_is_deterministic(engine, method):
    spec = dataclasses.replace(SPEC, cache=cache(method, consecutive=2))
    first, second = engine.generate(spec), engine.generate(spec)
    assert np.array_equal(pixels(first), pixels(second))
    assert first.cache_stats == second.cache_stats


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("start,end,consecutive", [(0, 12, 1), (3, 9, 2), (2, 12, 5), (6, 8, 3)])
def test_window_and_max_consecutive_hold_step_by_step(engine, method, start, end, consecutive):
    config = cache(method, start=start, end=end, consecutive=consecutive, interval=4)
    stats = engine.generate(dataclasses.replace(SPEC, cache=config)).cache_stats
    skipped_any = False
    for branch, counts in stats["branches"].items():
        steps = counts["skippedSteps"]
        skipped_any |= bool(steps)
        assert all(start <= s < end for s in steps), (branch, steps)
        assert max(runs_of(steps), default=0) <= consecutive, (branch, steps)
        assert 0 not in steps  # nothing is cached before the first pass
        if method == "dbcache":  # dbCacheSkipInterval: every 4th window step is a forced refresh
            assert not [s for s in steps if (s - start) % 4 == 0], (branch, steps)
    assert skipped_any


def test_skip_interval_one_never_skips_with_dbcache(engine, base):
    out = engine.generate(dataclasses.replace(SPEC, cache=cache("dbcache", interval=1)))
    assert out.cache_stats["skipped"] == 0 and np.array_equal(pixels(out), pixels(base))


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler(engine, scheduler):
    spec = dataclasses.replace(SPEC, scheduler=scheduler, steps=8, cache=cache("fbcache", end=8))
    out = engine.generate(spec)
    assert out.cache_stats["skipped"] > 0
    assert_valid_image(out)


@pytest.mark.parametrize("method", METHODS)
def test_batches_without_cfg_and_image_to_image(engine, method):
    batch = engine.generate(dataclasses.replace(SPEC, num_images=2, cache=cache(method)))
    assert len(batch.images) == 2 and batch.cache_stats["skipped"] > 0
    assert_valid_image(batch)
    no_cfg = engine.generate(dataclasses.replace(SPEC, guidance_scale=1.0, cache=cache(method)))
    assert set(no_cfg.cache_stats["branches"]) == {"cond"} and no_cfg.cache_stats["skipped"] > 0
    # img2img starts at step 4 of 12: the window counts schedule steps, so nothing before 4 is counted.
    init = Image.fromarray(pixels(batch)[0].astype(np.uint8))
    i2i = engine.generate(dataclasses.replace(SPEC, init_image=init, strength=0.67, cache=cache(method, start=6)))
    for counts in i2i.cache_stats["branches"].values():
        assert counts["computed"] + counts["skipped"] == 8
        assert counts["skipped"] > 0 and min(counts["skippedSteps"]) >= 6
    assert_valid_image(i2i)


@pytest.mark.parametrize("method", METHODS)
def test_the_editing_pipeline(engine, base, method):
    reference = Image.fromarray(pixels(base)[0].astype(np.uint8))
    spec = dataclasses.replace(SPEC, reference_image=reference)
    plain = engine.generate(spec)
    exact = engine.generate(dataclasses.replace(spec, cache=cache(method, threshold=0.0)))
    assert np.array_equal(pixels(plain), pixels(exact))
    cached = engine.generate(dataclasses.replace(spec, cache=cache(method)))
    assert cached.cache_stats["skipped"] > 0
    assert_valid_image(cached)


@pytest.mark.parametrize("method", METHODS)
def test_with_a_lora(engine, base, method, tmp_path_factory):
    from safetensors.torch import save_file
    from test_lora import ATTN, FFN, peft_lora

    folder = tmp_path_factory.mktemp("accel-lora")
    save_file({f"transformer.{k}": v for k, v in peft_lora(ATTN + FFN, seed=5).items()},
              str(folder / "style.safetensors"))
    lora_engine = K5Engine(engine.t2i, EngineConfig(lora_dir=folder))
    spec = dataclasses.replace(SPEC, loras=(("style", 1.0),))
    try:
        with_lora = lora_engine.generate(spec)
        assert not np.array_equal(pixels(with_lora), pixels(base))
        exact = lora_engine.generate(dataclasses.replace(spec, cache=cache(method, threshold=0.0)))
        assert np.array_equal(pixels(exact), pixels(with_lora))
        cached = lora_engine.generate(dataclasses.replace(spec, cache=cache(method)))
        assert cached.cache_stats["skipped"] > 0
        assert_valid_image(cached)
    finally:
        lora_engine.generate(SPEC)  # back to the exact base for the other tests
    assert np.array_equal(pixels(engine.generate(SPEC)), pixels(base))


def test_a_failing_generation_leaves_no_hooks(engine, base):
    with pytest.raises(Exception):
        engine.generate(dataclasses.replace(SPEC, width=250, height=250, cache=cache("teacache")))
    with pytest.raises(Exception):
        engine.generate(dataclasses.replace(SPEC, width=250, height=250, cache=cache("dbcache")))
    assert np.array_equal(pixels(engine.generate(SPEC)), pixels(base))
    assert not any(getattr(b, "_diffusers_hook", None) and b._diffusers_hook.hooks
                   for b in engine.t2i.transformer.visual_transformer_blocks)


def test_teacache_coefficients_change_the_decision(engine):
    spec = dataclasses.replace(SPEC, cache=cache("teacache", threshold=0.5))
    default = engine.generate(spec).cache_stats["skipped"]
    # The operator's coefficients reach the pipeline through the engine's config (a second engine over the
    # same pipeline). A constant 1 per step: the accumulator passes 0.5 at once, so nothing is ever reused.
    constant = AccelSettings(teacache_coefficients=(0.0, 0.0, 0.0, 0.0, 1.0))
    calibrated = K5Engine(engine.t2i, EngineConfig(accel=constant))
    assert calibrated.generate(spec).cache_stats["skipped"] == 0
    assert engine.generate(spec).cache_stats["skipped"] == default > 0


def test_calibration_fits_a_polynomial(engine):
    from k5serve.pipelines.calibrate import calibrate_teacache

    specs = [dataclasses.replace(SPEC, prompt=p, steps=8) for p in ("a cat", "a lighthouse at night")]
    result = calibrate_teacache(engine.t2i, specs)
    assert result["runs"] == 2 and len(result["coefficients"]) == 5
    assert result["samples_per_branch"] == {"cond": 14, "uncond": 14}  # steps 1..7 of each run
    assert result["rmse"] <= result["identity_rmse"] + 1e-9


# --- torch-free pieces ------------------------------------------------------------------------------------


def test_window_resolution():
    assert resolve_window(20) == (0, 20)
    assert resolve_window(20, start_step=4, end_step=10) == (4, 10)
    assert resolve_window(30, start_percentage=10, end_percentage=50) == (3, 15)
    assert resolve_window(7, start_percentage=33, end_percentage=34) == (2, 3)  # rounds outwards: never empty
    assert resolve_window(10, start_step=2, end_percentage=100) == (2, 10)


def test_guard_rules():
    guard = StepGuard(cache("fbcache", start=2, end=6, consecutive=2))
    decisions = []
    for step in range(8):
        allowed = guard.may_reuse("cond", step)
        decisions.append(allowed)
        guard.record("cond", step, reused=allowed)
    # step 0/1 outside the window, 2-3 reused, 4 forced (2 in a row), 5 reused, 6-7 outside
    assert decisions == [False, False, True, True, False, True, False, False]
    assert guard.may_reuse("uncond", 3) is False  # each branch has its own history


def test_fit_and_load_coefficients(tmp_path):
    x = np.linspace(0.01, 0.5, 40)
    result = fit_teacache(x, 2 * x**2 + 0.1)
    assert np.allclose(result["coefficients"], [0, 0, 2, 0, 0.1], atol=1e-6) and result["rmse"] < 1e-8
    (tmp_path / "c.json").write_text(json.dumps(result))
    assert load_coefficients(tmp_path / "c.json") == tuple(result["coefficients"])
    (tmp_path / "bad.json").write_text('{"coefficients": "x"}')
    with pytest.raises(ValueError):
        load_coefficients(tmp_path / "bad.json")
    with pytest.raises(ValueError):
        fit_teacache([0.1, 0.2], [0.1, 0.2])


def test_config_and_stats_need_no_torch():
    code = "import accel, accel.guard, accel.calibration, sys; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError):
        cache("fbcache", start=5, end=5)
    with pytest.raises(ValueError):
        cache("magcache")
    with pytest.raises(ValueError):
        cache("dbcache", interval=0)


def test_blocks_stay_plain_modules(engine):
    assert isinstance(engine.t2i.transformer.visual_transformer_blocks, torch.nn.ModuleList)
