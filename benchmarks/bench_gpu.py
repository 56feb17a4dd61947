"""GPU speed: stock diffusers against k5serve's engine and each speed option, on the full-size architecture.

Builds the real Kandinsky 5.0 T2I Lite architecture (`weights/full.py`: the 50-block transformer, Qwen2.5-VL-7B,
CLIP-L, the FLUX VAE) with random weights directly on the device, in bf16 (speed does not depend on weight
values; nothing is downloaded), then runs the same request (default 1024x1024, 28 steps, CFG 7.5) through, in
one process and one run:

* stock diffusers: `Kandinsky5T2IPipeline.__call__`;
* the k5serve engine with no options (`K5T2IPipeline.generate`, prompt cache off): the baseline of the image
  difference column;
* each option on its own: the prompt cache, `--compile`, `--attention-backend` (the fastest kernel the machine
  has, unless given), `--quantize fp8`, `--fp8-storage`;
* all of them together (`--fp8-storage` left out: FP8 quantisation already stores FP8), and all together plus
  each step cache at the model page's defaults (teaCache 0.5, fbCache 0.25, dbCache 0.25).

The rows the goals are about run first (stock, engine, fp8, all, all + each step cache), then the single
options, so that --budget-seconds (counted from the start, the build included) cuts the latter. A row that fails
is listed with its error and the rest still run; `table.md` and `results.json` are rewritten after every row.

Each row gets a fresh transformer (same seed, so the same weights), has its option applied, runs
--warmup-runs untimed requests, then --runs timed ones. The table (stdout, and `table.md` and `results.json` in
--out) gives per row: seconds per image (median), the first request's seconds (compilation shows here),
transformer milliseconds per pass (median of the passes that ran all blocks) and the TFLOP/s that makes
(FLOPs of one pass counted by `torch.utils.flop_counter`), the passes computed, peak GPU memory, the option's set-up
seconds, the cost per image at --price-per-gpu-hour, the speed-up against stock diffusers, and the image's
difference from the engine's bf16 image (mean absolute error on 0-255 pixels and PSNR; with random weights this
is a measure of numerical drift, not of quality). A row the device cannot do is listed with the reason.

With --profiles it measures the memory profiles instead (`--memory-profile full, 24gb, 16gb, 12gb`, and the
text encoder alone in nf4, int8 and fp8): the random weights are saved as a checkpoint folder once (--checkpoint,
about 30 GB), then each row loads it through the server's own loader (`load_engine`: the memory plan, the
quantised text encoder, group offloading) with the card's memory capped by
`torch.cuda.set_per_process_memory_fraction` to what a card of the profile's size leaves free
(`pipelines.memory.CARD_FREE`), and the table adds the plan's estimate of the peak beside the measured
`torch.cuda.max_memory_allocated`. The image columns are then against the `full` profile's (bfloat16) image.

    python benchmarks/bench_gpu.py --out gpu-results             # on a CUDA GPU
    python benchmarks/bench_gpu.py --tiny --steps 4 --out /tmp/b  # the same script on the CPU, tiny weights
    python benchmarks/bench_gpu.py --profiles --out gpu-profiles  # the memory profiles
    benchmarks/gpu/run.sh OUT                                     # a bare GPU machine, wheels carried
    benchmarks/gpu/run.sh OUT --profiles

Not a test: the figures depend on the machine. The suite runs `--tiny` as a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("k5serve") is None:  # a checkout never installed (run.sh puts its own copy first)
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from k5serve.accel import AccelSettings, StepCacheConfig  # noqa: E402
from k5serve.pipelines.config import SpeedSettings  # noqa: E402
from k5serve.pipelines.k5 import K5T2IPipeline  # noqa: E402
from k5serve.pipelines.prompt_cache import PromptCache  # noqa: E402
from k5serve.pipelines.speed import SpeedOptionError, apply_speed, check_speed, probe_attention  # noqa: E402
from k5serve.pipelines.worker import GenerationSpec  # noqa: E402

# The model page's defaults (server/protocol/models.py: teaCacheDistance, fbCacheThreshold, dbCacheThreshold,
# cacheMaxConsecutiveSteps; tests/test_speed.py checks they agree).
PAGE_CACHE_DEFAULTS = {"teacache": 0.5, "fbcache": 0.25, "dbcache": 0.25}
PAGE_MAX_CONSECUTIVE = 3
PROMPT = "a red fox in fresh snow at sunrise, telephoto photograph, shallow depth of field"
NEGATIVE = ""  # the pipeline default negative prompt of the model page


@dataclass
class Row:
    name: str
    speed: SpeedSettings | None  # None: stock diffusers
    cache: str | None = None
    skipped: str | None = None
    seconds: list[float] = field(default_factory=list)
    first_seconds: float | None = None
    setup_seconds: float = 0.0
    pass_ms: float | None = None
    passes_computed: int | None = None
    passes_total: int | None = None
    tflops: float | None = None
    peak_gib: float | None = None
    mae: float | None = None
    psnr: float | None = None
    image: np.ndarray | None = None
    profile: str | None = None  # a memory profile row: loaded through load_engine with this profile
    load: dict | None = None  # its LoadConfig fields beside the profile (e.g. a text encoder quantisation)
    plan_gib: float | None = None  # the memory plan's estimate of the peak at this size, one image
    budget_gib: float | None = None  # the memory the row was capped to

    @property
    def median(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None


class PassTimer:
    """Times every transformer forward with CUDA events (or the CPU clock); read after a run."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list = []
        self._open = None
        self._handles = [transformer.register_forward_pre_hook(self._start),
                         transformer.register_forward_hook(self._stop)]

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, *_):
        self._open = self._now()

    def _stop(self, *_):
        self.spans.append((self._open, self._now()))

    def take_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            out = [a.elapsed_time(b) for a, b in self.spans]
        else:
            out = [(b - a) * 1000 for a, b in self.spans]
        self.spans = []
        return out

    def remove(self):
        for handle in self._handles:
            handle.remove()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny generated architecture on the CPU (smoke test)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    ap.add_argument("--out", type=Path, required=True, help="folder for table.md and results.json")
    ap.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--runs", type=int, default=3, help="timed requests per row (median reported)")
    ap.add_argument("--warmup-runs", type=int, default=1, help="untimed requests per row before them")
    ap.add_argument("--attention-backend", help="the kernel of the attention rows (default: the fastest "
                    "available: flash3 on Hopper when installed, else cudnn)")
    ap.add_argument("--rows", help="comma-separated row names to run (default: all); see --list")
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--price-per-gpu-hour", type=float, default=2.5, help="USD, for the cost column")
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="start no new row after this many seconds (the rest are listed as not run)")
    ap.add_argument("--profiles", action="store_true", help="measure the memory profiles (see above) instead")
    ap.add_argument("--checkpoint", type=Path, help="--profiles: the folder the random weights are saved to and "
                    "loaded from (default: a temporary folder, removed afterwards)")
    return ap.parse_args(argv)


def best_attention(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest kernel that passes the start-up check and runs once here (FA3 on Hopper, else cuDNN)."""
    if device.type != "cuda":
        return "native"
    for backend in ("flash3", "cudnn"):
        try:
            check_speed(SpeedSettings(attention_backend=backend), device, dtype=dtype)
            probe_attention(backend, device=device, dtype=dtype)
            return backend
        except SpeedOptionError as exc:
            print(f"attention {backend}: {exc}", flush=True)
    return "native"


def plan(attention: str, device: torch.device, dtype: torch.dtype) -> list[Row]:
    """The rows, the goal rows first (stock, the bf16 engine, FP8, all, all + each step cache), so that a
    time budget cut leaves the single-option rows out, not the ones the goals are about."""
    base = SpeedSettings(prompt_cache=0)
    # "all": every speed option this device can do (the others are named in the row).
    everything, left_out = base, []
    for option in (dict(compile=True), dict(attention_backend=attention), dict(quantize="fp8"),
                   dict(prompt_cache=256)):
        try:
            check_speed(replace(base, **option), device, dtype=dtype)
            everything = replace(everything, **option)
        except SpeedOptionError:
            left_out.append(next(iter(option.values())) if "quantize" in option else next(iter(option)))
    name = "all" + (f" (no {', '.join(map(str, left_out))}: not on this device)" if left_out else "")
    rows = [
        Row("stock diffusers", None),
        Row("engine", base),
        Row("fp8", replace(base, quantize="fp8")),
        Row(name, everything),
    ]
    rows += [Row(f"all + {method}", everything, cache=method) for method in PAGE_CACHE_DEFAULTS]
    rows += [
        Row("prompt cache", replace(base, prompt_cache=256)),
        Row("compile", replace(base, compile=True)),
        Row(f"attention {attention}", replace(base, attention_backend=attention)),
        Row("fp8 storage", replace(base, fp8_storage=True)),
    ]
    return rows


def profile_rows() -> list[Row]:
    from k5serve.pipelines.config import MEMORY_PROFILES

    rows = [Row(f"profile {name}", SpeedSettings(), profile=name) for name in MEMORY_PROFILES]
    rows += [Row(f"text encoder {quant}", SpeedSettings(), profile="full",
                 load={"text_encoder_quant": quant, "explicit": frozenset({"text_encoder_quant"})})
             for quant in ("nf4", "int8", "fp8")]
    return rows


def measure_profile(row: Row, checkpoint: Path, spec: GenerationSpec, args, device, dtype) -> None:
    """Load `checkpoint` through the server's loader with the row's memory profile, capped to its card, and time
    the request; the plan's estimate of the peak beside the measured one."""
    from k5serve.pipelines.config import EngineConfig, LoadConfig
    from k5serve.pipelines.loader import load_engine
    from k5serve.pipelines.memory import CARD_FREE, case_name

    gc.collect()
    cuda = device.type == "cuda"
    budget = CARD_FREE.get(row.profile) if cuda else None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row.budget_gib = budget / 2**30 if budget else None
    load = LoadConfig(checkpoint, device=str(device), dtype=str(dtype).removeprefix("torch."),
                      memory_profile=row.profile, memory_budget=budget, **(row.load or {}))
    started = time.perf_counter()
    try:
        engine, info = load_engine(load, EngineConfig())
    except ValueError as exc:  # the plan does not fit, or the device cannot run the profile: the reason is the row
        row.skipped = str(exc)
        return
    try:
        row.setup_seconds = time.perf_counter() - started
        plan = info["memory_plan"]
        stages = plan["peaks"].get(case_name(spec.width, spec.height, 1))  # (a size the plan covers, or its peak)
        row.plan_gib = (max(stages.values()) if stages else plan["peak_bytes"]) / 2**30
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for index in range(args.warmup_runs):
            seconds = _timed(lambda: engine.generate(spec), device)[1]
            row.first_seconds = seconds if index == 0 else row.first_seconds
        for _ in range(args.runs):
            output, seconds = _timed(lambda: engine.generate(spec), device)
            row.seconds.append(seconds)
            row.image = np.asarray(output.images[0], dtype=np.uint8) if row.image is None else row.image
        row.first_seconds = row.seconds[0] if row.first_seconds is None else row.first_seconds
        if cuda:
            row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    finally:
        engine = None  # (the last reference: the weights go with it)
        gc.collect()
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()


def _timed(run, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def save_checkpoint(pipe, args) -> Path:
    """The pipeline's random weights as a diffusers folder (the tiny one is already a folder)."""
    import tempfile

    folder = args.checkpoint or Path(tempfile.mkdtemp(prefix="k5-bench-checkpoint-"))
    if not (folder / "model_index.json").exists():
        started = time.perf_counter()
        pipe.save_pretrained(folder)
        print(f"saved the random weights to {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def cache_config(method: str | None, steps: int) -> StepCacheConfig | None:
    if method is None:
        return None
    return StepCacheConfig(method, PAGE_CACHE_DEFAULTS[method], 0, steps, PAGE_MAX_CONSECUTIVE)


def build(args, device, dtype):
    """-> (pipeline, fresh_transformer()): the same weights every call."""
    from diffusers import Kandinsky5T2IPipeline

    if args.tiny:
        from k5serve.weights import tiny

        def fresh():  # float32, as built (a cast would leave the keep-in-fp32 modules behind)
            return tiny.make_transformer("t2i").to(device)

        pipe = K5T2IPipeline(**tiny.build_pipeline("t2i").components).to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe, fresh
    from k5serve.weights import full

    def fresh():
        return full.build_transformer(device, dtype, seed=0)

    assert issubclass(K5T2IPipeline, Kandinsky5T2IPipeline)
    return full.build_pipeline(K5T2IPipeline, device, dtype, seed=0), fresh


def run_once(pipe, row: Row, spec: GenerationSpec, device) -> tuple[np.ndarray, float, dict | None]:
    from diffusers import Kandinsky5T2IPipeline

    if row.speed is None:
        out, seconds = _timed(lambda: Kandinsky5T2IPipeline.__call__(
            pipe, prompt=spec.prompt, negative_prompt=spec.negative_prompt, height=spec.height, width=spec.width,
            num_inference_steps=spec.steps, guidance_scale=spec.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(spec.seed)), device)
        return np.asarray(out.image[0], dtype=np.uint8), seconds, None
    out, seconds = _timed(lambda: pipe.generate(spec, accel=AccelSettings()), device)
    return np.asarray(out.images[0], dtype=np.uint8), seconds, out.cache_stats


def count_flops(pipe, spec: GenerationSpec) -> float:
    """FLOPs of one transformer pass at this size and prompt, counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    captured = {}

    def grab(_module, args, kwargs):
        captured.setdefault("kwargs", kwargs)
        raise _Captured

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe.generate(replace(spec, steps=1))
    except _Captured:
        pass
    finally:
        handle.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe.transformer(**captured["kwargs"])
    return float(counter.get_total_flops())


class _Captured(Exception):
    pass


def measure(pipe, fresh, row: Row, spec: GenerationSpec, args, device, dtype, flops: float | None) -> None:
    pipe.transformer = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    transformer = fresh()
    pipe.transformer = transformer
    speed = row.speed or SpeedSettings(prompt_cache=0)
    try:
        check_speed(speed, device, dtype=dtype)
    except SpeedOptionError as exc:
        row.skipped = str(exc)
        return
    started = time.perf_counter()
    try:
        apply_speed(transformer, speed, device=device, dtype=dtype)
    except SpeedOptionError as exc:
        row.skipped = str(exc)
        return
    row.setup_seconds = time.perf_counter() - started
    pipe.prompt_cache = PromptCache(speed.prompt_cache) if speed.prompt_cache else None
    spec = replace(spec, cache=cache_config(row.cache, spec.steps))
    timer = PassTimer(transformer, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        for index in range(args.warmup_runs):
            _, seconds, _ = run_once(pipe, row, spec, device)
            if index == 0:
                row.first_seconds = seconds
        timer.take_ms()
        full_passes: list[float] = []
        for _ in range(args.runs):
            image, seconds, stats = run_once(pipe, row, spec, device)
            row.seconds.append(seconds)
            row.image = image if row.image is None else row.image
            spans = timer.take_ms()
            total = len(spans)
            computed = total if not stats or not stats.get("branches") else \
                sum(b["computed"] for b in stats["branches"].values())
            row.passes_total, row.passes_computed = total, computed
            # Passes that ran every block are the slow ones: the `computed` longest of this run.
            full_passes += sorted(spans)[total - computed:]
        if row.first_seconds is None:
            row.first_seconds = row.seconds[0]
        row.pass_ms = statistics.median(full_passes) if full_passes else None
        if row.pass_ms and flops:
            row.tflops = flops / (row.pass_ms / 1000) / 1e12
        if device.type == "cuda":
            row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
    finally:
        timer.remove()


def compare(row: Row, reference: np.ndarray | None) -> None:
    if reference is None or row.image is None:
        return
    diff = row.image.astype(np.float64) - reference.astype(np.float64)
    row.mae = float(np.abs(diff).mean())
    mse = float((diff**2).mean())
    row.psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def fmt(value, spec: str, none: str = "–") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return format(value, spec)


def table(rows: list[Row], args, device_name: str) -> str:
    if args.profiles:
        return profile_table(rows, args, device_name)
    stock = next((r.median for r in rows if r.speed is None and r.median), None)
    lines = [
        f"{device_name}; {args.size}, {args.steps} steps, CFG {args.cfg}; median of {args.runs} after "
        f"{args.warmup_runs} warm-up; ${args.price_per_gpu_hour:g}/GPU-hour",
        "",
        "| configuration | s/image | × stock | first s | setup s | ms/pass | TFLOP/s | passes | peak GiB "
        "| $/image | MAE vs engine | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.skipped or not r.seconds:
            lines.append(f"| {r.name} | not run: {r.skipped or 'no timed run'} |" + " |" * 11)
            continue
        cost = r.median * args.price_per_gpu_hour / 3600
        passes = f"{r.passes_computed}/{r.passes_total}" if r.passes_total else "–"
        lines.append(
            f"| {r.name} | {r.median:.3f} | {fmt(stock / r.median if stock else None, '.2f')} | "
            f"{fmt(r.first_seconds, '.2f')} | {r.setup_seconds:.2f} | {fmt(r.pass_ms, '.1f')} | "
            f"{fmt(r.tflops, '.3g')} | {passes} | {fmt(r.peak_gib, '.1f')} | {cost:.5f} | {fmt(r.mae, '.2f')} | "
            f"{fmt(r.psnr, '.1f')} |")
    return "\n".join(lines) + "\n"


def profile_table(rows: list[Row], args, device_name: str) -> str:
    lines = [
        f"{device_name}; {args.size}, {args.steps} steps, CFG {args.cfg}, one image; median of {args.runs} after "
        f"{args.warmup_runs} warm-up; memory capped to the card each profile is named for",
        "",
        "| configuration | card cap GiB | s/image | first s | load s | peak GiB | plan GiB | MAE vs full | PSNR dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.skipped or not r.seconds:
            lines.append(f"| {r.name} | {fmt(r.budget_gib, '.1f')} | not run: {r.skipped or 'no timed run'} |"
                         + " |" * 6)
            continue
        lines.append(f"| {r.name} | {fmt(r.budget_gib, '.1f')} | {r.median:.3f} | {fmt(r.first_seconds, '.2f')} | "
                     f"{r.setup_seconds:.1f} | {fmt(r.peak_gib, '.2f')} | {fmt(r.plan_gib, '.2f')} | "
                     f"{fmt(r.mae, '.2f')} | {fmt(r.psnr, '.1f')} |")
    return "\n".join(lines) + "\n"


def write(rows: list[Row], args, device_name: str, facts: dict) -> str:
    """Compare each row with the engine's image and write `table.md` and `results.json` (after every row, so
    a run cut short or a crash keeps what it measured). -> the table."""
    reference = next((r.image for r in rows if r.name in ("engine", "profile full")), None)
    for row in rows:
        compare(row, reference)
    text = table(rows, args, device_name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text)
    results = facts | {
        "device": device_name, "torch": torch.__version__, "size": args.size, "steps": args.steps,
        "cfg": args.cfg, "runs": args.runs, "warmup_runs": args.warmup_runs, "tiny": args.tiny,
        "price_per_gpu_hour": args.price_per_gpu_hour, "profiles": args.profiles,
        "rows": [{k: v for k, v in asdict(r).items() if k != "image"} | {"median_seconds": r.median,
                 "speed": asdict(r.speed) if r.speed else None} for r in rows],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return text


def main(argv=None) -> int:
    began = time.perf_counter()  # the time budget counts from here: building the model is part of the run
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU is visible; use --tiny for the CPU smoke test")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    width, height = map(int, args.size.lower().split("x"))
    attention = args.attention_backend or best_attention(device, dtype)
    rows = profile_rows() if args.profiles else plan(attention, device, dtype)
    if args.list:
        print("\n".join(r.name for r in rows))
        return 0
    if args.rows:
        wanted = [name.strip() for name in args.rows.split(",")]
        unknown = set(wanted) - {r.name for r in rows}
        if unknown:
            raise SystemExit(f"error: unknown rows {sorted(unknown)}; see --list")
        rows = [r for r in rows if r.name in wanted or r.name in ("engine", "profile full")]  # the baselines
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU ({torch.get_num_threads()} threads)")
    print(f"building the {'tiny' if args.tiny else 'full-size'} architecture on {device_name} ...", flush=True)
    started = time.perf_counter()
    pipe, fresh = build(args, device, dtype)
    build_seconds = time.perf_counter() - started
    spec = GenerationSpec(PROMPT, NEGATIVE, width=width, height=height, seed=0, steps=args.steps,
                          guidance_scale=args.cfg)
    if args.profiles:
        checkpoint = profile_checkpoint(pipe, args)
        pipe = fresh = None  # (the last references: the built weights leave the GPU before the first row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return run_profiles(rows, checkpoint, spec, args, device, dtype, device_name, began, build_seconds)
    try:
        flops = count_flops(pipe, spec)
    except Exception as exc:  # noqa: BLE001 - the figures without TFLOP/s beat no figures
        print(f"counting FLOPs failed ({type(exc).__name__}: {exc}); the TFLOP/s column stays empty", flush=True)
        flops = None
    print(f"built in {build_seconds:.1f} s; one transformer pass at {width}x{height}: "
          f"{flops / 1e12 if flops else float('nan'):.2f} TFLOP", flush=True)
    facts = {"build_seconds": round(build_seconds, 2), "tflop_per_pass": flops / 1e12 if flops else None,
             "attention_backend": attention}
    run_rows(rows, lambda row: measure(pipe, fresh, row, spec, args, device, dtype, flops), args, device_name, facts,
             began)
    return 0


def run_rows(rows: list[Row], measure_one, args, device_name: str, facts: dict, began: float) -> None:
    """Measure each row (`measure_one(row)`) until the time budget is spent; one row's failure is listed and the
    rest still run; the table is rewritten after every row, so a crash in a later one keeps what was measured."""
    for row in rows:
        if args.budget_seconds is not None and time.perf_counter() - began > args.budget_seconds:
            row.skipped = f"time budget of {args.budget_seconds:g} s spent"
            continue
        print(f"{row.name} ...", flush=True)
        try:
            measure_one(row)
        except torch.cuda.OutOfMemoryError as exc:
            row.skipped = f"out of memory: {str(exc).splitlines()[0]}"
            row.seconds.clear()
        except Exception as exc:  # noqa: BLE001 - one row's failure (a kernel, a compile) must not lose the rest
            traceback.print_exc()
            row.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            row.seconds.clear()
        print(f"  {row.skipped or f'{row.median:.3f} s/image'}", flush=True)
        write(rows, args, device_name, facts)
    print(write(rows, args, device_name, facts))  # (and the rows the budget skipped)


def profile_checkpoint(pipe, args) -> Path:
    """--profiles: the folder the rows load (the tiny checkpoint, or the built random weights saved once)."""
    if args.tiny:
        from k5serve.weights.tiny import ensure_tiny

        return ensure_tiny(args.out / "tiny-checkpoint", "t2i")
    return save_checkpoint(pipe, args)


def run_profiles(rows, checkpoint: Path, spec, args, device, dtype, device_name, began, build_seconds) -> int:
    """--profiles: load and measure each profile's row from `checkpoint` (removed afterwards if it was made
    here)."""
    import shutil

    facts = {"build_seconds": round(build_seconds, 2), "checkpoint": str(checkpoint)}
    try:
        run_rows(rows, lambda row: measure_profile(row, checkpoint, spec, args, device, dtype), args, device_name,
                 facts, began)
    finally:
        if not args.tiny and args.checkpoint is None:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
