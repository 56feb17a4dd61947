"""Step caching: what each method at each threshold skips, saves and changes, to pick settings from.

For every prompt the unaccelerated image is made first (the reference); then each (method, threshold)
runs the same prompts and seeds. Prints a markdown table with, per setting:

* transformer passes computed / total and the share skipped (both CFG branches, all prompts);
* median wall seconds per image over --runs runs (after one warm-up) and the speed-up against the
  unaccelerated pipeline measured in the same run;
* the difference from the reference image: PSNR (dB, higher is closer; inf = identical) and mean absolute
  pixel error (0-255), averaged over prompts.

Not a test: numbers depend on the machine and the weights. On the generated tiny weights the quality
columns mean nothing (a random model's steps differ wildly, so only threshold 1.0 skips at all); run it on
a GPU with the real weights for the real table:

    .venv/bin/python benchmarks/bench_cache.py --tiny --steps 20 --runs 3
    .venv/bin/python benchmarks/bench_cache.py --model ai-forever/Kandinsky-5.0-T2I-Lite-sft-Diffusers \\
        --steps 50 --runs 3 --prompts prompts.txt [--teacache-coefficients teacache.json]
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path

import common  # noqa: E402  (puts the project root on sys.path)

DEFAULT_PROMPTS = [
    "a red fox in fresh snow, morning light, telephoto photograph",
    "an old lighthouse on a cliff during a storm, oil painting",
    "a neon sign that says OPEN in a rainy alley at night",
    "watercolor illustration of a hedgehog reading a book",
]
# Thresholds around each method's published sweet spot, plus the page defaults (0.5 / 0.25 / 0.25).
DEFAULT_SETTINGS = {
    "teacache": [0.1, 0.3, 0.5],
    "fbcache": [0.05, 0.1, 0.25],
    "dbcache": [0.08, 0.12, 0.25],
}


def psnr_and_mae(a, b) -> tuple[float, float]:
    import numpy as np

    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mse = float((diff**2).mean())
    return (math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)), float(np.abs(diff).mean())


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: 4 built-in prompts)")
    ap.add_argument("--cfg-scale", type=float, default=3.5)
    ap.add_argument("--methods", default="teacache,fbcache,dbcache")
    ap.add_argument("--thresholds", help="comma-separated, used for every method (default: per-method values; "
                                         "with --tiny also 1.0)")
    ap.add_argument("--start", type=int, default=0, help="cacheStartStep")
    ap.add_argument("--end", type=int, help="cacheEndStep (default: steps)")
    ap.add_argument("--max-consecutive", type=int, default=3, help="cacheMaxConsecutiveSteps")
    ap.add_argument("--skip-interval", type=int, default=5, help="dbCacheSkipInterval")
    ap.add_argument("--teacache-coefficients", type=Path, help="JSON from `k5serve calibrate teacache`")
    args = ap.parse_args()
    width, height = common.size(args)
    tiny = args.tiny or not args.model

    from k5serve.accel import AccelSettings, StepCacheConfig
    from k5serve.accel.calibration import load_coefficients
    from k5serve.pipelines.loader import LoadConfig, load_t2i
    from k5serve.pipelines.worker import GenerationSpec

    if tiny:
        from k5serve.weights.tiny import ensure_tiny

        path = ensure_tiny(common.ROOT / ".k5serve" / "tiny", "t2i")
    else:
        from k5serve.weights.hub import resolve

        path = resolve(args.model)
    pipe, info = load_t2i(LoadConfig(path, args.device))
    accel = AccelSettings(teacache_coefficients=load_coefficients(args.teacache_coefficients)
                          if args.teacache_coefficients else None)
    prompts = ([p.strip() for p in args.prompts.read_text().splitlines() if p.strip()] if args.prompts
               else DEFAULT_PROMPTS)
    specs = [GenerationSpec(p, "", width=width, height=height, seed=1000 + i, steps=args.steps,
                            guidance_scale=args.cfg_scale) for i, p in enumerate(prompts)]
    end = args.end or args.steps

    def measure(cache):
        """-> (median seconds per image, images of the last run, passes computed, passes skipped)."""
        seconds, images, computed, skipped = [], [], 0, 0
        for index in range(args.runs + 1):
            started = time.perf_counter()
            outputs = [pipe.generate(dataclasses.replace(spec, cache=cache), accel=accel) for spec in specs]
            if index:  # the first run warms up
                seconds.append((time.perf_counter() - started) / len(specs))
            images = [o.images[0] for o in outputs]
            computed = sum(o.cache_stats["computed"] for o in outputs)
            skipped = sum(o.cache_stats["skipped"] for o in outputs)
        return statistics.median(seconds), images, computed, skipped

    base_seconds, reference, base_computed, _ = measure(None)
    rows = [("none", "-", base_computed, 0, base_seconds, math.inf, 0.0)]
    for method in args.methods.split(","):
        thresholds = ([float(t) for t in args.thresholds.split(",")] if args.thresholds
                      else DEFAULT_SETTINGS[method] + ([1.0] if tiny else []))
        for threshold in thresholds:
            cache = StepCacheConfig(method=method, threshold=threshold, start_step=args.start, end_step=end,
                                    max_consecutive=args.max_consecutive, skip_interval=args.skip_interval)
            seconds, images, computed, skipped = measure(cache)
            quality = [psnr_and_mae(a, b) for a, b in zip(images, reference)]
            rows.append((method, f"{threshold:g}", computed, skipped, seconds,
                         statistics.mean(q[0] for q in quality), statistics.mean(q[1] for q in quality)))

    print(f"\n{'tiny generated' if tiny else 'real'} weights from {path}; device {info['device']}, {info['dtype']}; "
          f"{width}x{height}, {args.steps} steps, CFG {args.cfg_scale}, {len(prompts)} prompt(s), "
          f"median of {args.runs} run(s); window [{args.start}, {end}), max consecutive {args.max_consecutive}, "
          f"dbCache skip interval {args.skip_interval}\n")
    print("| method | threshold | passes computed / total | skipped | s / image | speed-up | PSNR dB | MAE (0-255) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, threshold, computed, skipped, seconds, psnr, mae in rows:
        total = computed + skipped
        print(f"| {method} | {threshold} | {computed} / {total} | {100 * skipped / total:.0f}% | {seconds:.3f} | "
              f"{base_seconds / seconds:.2f}x | {psnr:.1f} | {mae:.2f} |")
    if tiny:
        print("\nTiny random weights: the PSNR/MAE columns say nothing about real image quality.")


if __name__ == "__main__":
    main()
