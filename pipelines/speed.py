"""How fast the transformer runs: FP8 weights or matrix products, the attention kernel, compiled blocks, warm-up.

Each option is checked against the device before anything is loaded (`check_speed`), so an operator who asks
for what the GPU cannot do gets one clear message at start-up, not a failure on the first request. Then
`apply_speed` changes a loaded transformer, in this order:

1. `--quantize fp8`: torchao's `Float8DynamicActivationFloat8WeightConfig` on the linear layers of the
   repeated blocks (FP8 weights, activations quantised per row on the fly, `torch._scaled_mm` products; needs
   compute capability 8.9 or higher), or `--fp8-storage`: diffusers' layerwise casting (weights stored in
   float8_e4m3fn and cast up to the model dtype layer by layer: about half the transformer's memory, no faster);
2. `--attention-backend`: diffusers' attention dispatcher (`set_attention_backend`), then one attention call on
   the device to prove the kernel runs there;
3. `--compile`: regional compilation, one `torch.compile` per block class in the model's `_repeated_blocks`
   (the 50 visual and 2 text blocks).

The blocks' `forward` is compiled rather than the module (`block.compile()`, as diffusers'
`compile_repeated_blocks` does): the step-cache hooks (`accel/`) wrap `forward`, so they stay outside the
compiled graph and their Python decisions never make it recompile.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable

import torch

from .config import ATTENTION_BACKENDS, QUANTIZE, SpeedSettings

log = logging.getLogger("k5serve.speed")



class SpeedOptionError(ValueError):
    """An option the device cannot do; the message says which and why."""


# Compiled variants kept per block class (dynamo's `recompile_limit`): one per set of active LoRA adapters seen.
RECOMPILE_LIMIT = 64

# Kernels that take only half-precision inputs (PyTorch's cuDNN and flash SDPA, flash-attn, FA3, SageAttention).
HALF_ONLY_BACKENDS = frozenset({"cudnn", "sdpa-flash", "flash", "flash3", "sage"})


def check_speed(settings: SpeedSettings, device: torch.device, *, dtype: torch.dtype = torch.bfloat16,
                offload: str = "none") -> None:
    """Refuse, with a clear message, what `device` cannot do in `dtype` (the model's compute dtype). Called
    before the weights are loaded; it touches the GPU only when an option needs its compute capability."""
    cuda = device.type == "cuda"

    def capability() -> tuple[int, int]:
        return torch.cuda.get_device_capability(device)

    def where() -> str:
        if not cuda:
            return f"the {device.type.upper()}"
        major, minor = capability()
        return f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"

    dtype_name = str(dtype).removeprefix("torch.")
    if settings.prompt_cache < 0:
        raise SpeedOptionError("--prompt-cache must be 0 (off) or more")
    if settings.quantize is not None:
        if settings.quantize not in QUANTIZE:
            raise SpeedOptionError(f"--quantize {settings.quantize}: choose from {', '.join(QUANTIZE)}")
        if settings.fp8_storage:
            raise SpeedOptionError("--quantize fp8 already stores the transformer's weights in FP8; drop "
                                   "--fp8-storage")
        if not cuda or capability() < (8, 9):
            raise SpeedOptionError(f"--quantize fp8 needs FP8 matrix units (an NVIDIA GPU of compute capability "
                                   f"8.9 or higher: Ada, Hopper, Blackwell); this run uses {where()}. "
                                   "--fp8-storage halves the transformer's memory on any device")
        if dtype != torch.bfloat16:
            raise SpeedOptionError(f"--quantize fp8 needs --dtype bfloat16 (torchao's per-row FP8 scales "
                                   f"bfloat16 weights); this run uses {dtype_name}")
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise SpeedOptionError("--quantize fp8 needs torchao: pip install 'k5serve[fp8]'") from None
        except Exception as exc:  # noqa: BLE001 - a broken install (e.g. built for another torch)
            raise SpeedOptionError(f"--quantize fp8: torchao does not import: {type(exc).__name__}: {exc}") \
                from None
        if offload == "sequential":
            raise SpeedOptionError("--quantize fp8 does not work with --offload sequential (use --offload model)")
    backend = settings.attention_backend
    if backend not in ATTENTION_BACKENDS:
        raise SpeedOptionError(f"--attention-backend {backend}: choose from {', '.join(ATTENTION_BACKENDS)}")
    if backend not in ("native", "math"):
        if not cuda:
            raise SpeedOptionError(f"--attention-backend {backend} needs a CUDA GPU; this run uses {where()} "
                                   "(use native)")
        if backend == "flash3" and capability()[0] != 9:
            raise SpeedOptionError(f"--attention-backend flash3 is FlashAttention 3, for Hopper GPUs (compute "
                                   f"capability 9.0); this run uses {where()}")
        if backend in HALF_ONLY_BACKENDS and dtype not in (torch.float16, torch.bfloat16):
            raise SpeedOptionError(f"--attention-backend {backend} takes only float16 or bfloat16; this run uses "
                                   f"{dtype_name} (use --dtype bfloat16, or sdpa-efficient or native)")
        from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

        try:
            _check_attention_backend_requirements(AttentionBackendName(ATTENTION_BACKENDS[backend]))
        except RuntimeError as exc:
            raise SpeedOptionError(f"--attention-backend {backend}: {exc}") from None
    if settings.compile:
        if offload == "sequential":
            raise SpeedOptionError("--compile does not work with --offload sequential (use --offload model)")
        if cuda:
            from torch.utils._triton import has_triton

            if not has_triton():
                raise SpeedOptionError(f"--compile needs Triton for {where()}: pip install triton")
        elif device.type == "cpu":
            compiler = os.environ.get("CXX", "g++")
            if shutil.which(compiler) is None:
                raise SpeedOptionError(f"--compile on the CPU needs a C++ compiler ({compiler!r} is not on the "
                                       "PATH; set CXX or install g++)")
        else:
            raise SpeedOptionError(f"--compile is supported on CUDA and the CPU, not on {device}")
    if settings.warmup and not settings.compile:
        log.info("--warmup without --compile: start-up generates once per size anyway (CUDA kernels and "
                 "allocator warm)")


def place_with_speed(pipe, settings: SpeedSettings, *, device: torch.device, dtype: torch.dtype, offload: str,
                     text_encoder_offload: bool = False) -> dict[str, float]:
    """Place a loaded pipeline (`device.place`) and change its transformer as `settings` asks, in the order the
    offload mode needs: FP8 storage before placing (the transformer reaches the device at half its size), and under
    group offloading FP8 quantisation too, because group offloading keeps its own pinned host copy of every weight
    as it is when it is applied; otherwise the pipeline is placed first (FP8 quantisation is done on the device).
    -> seconds each change took."""
    from .device import place

    weights_first = offload == "group" or (settings.fp8_storage and settings.quantize is None)
    seconds = apply_speed(pipe.transformer, settings, device=device, dtype=dtype, stages=("weights",)) \
        if weights_first else {}
    place(pipe, device, offload, text_encoder_offload)
    return seconds | apply_speed(pipe.transformer, settings, device=device, dtype=dtype,
                                 stages=("kernels",) if weights_first else ("weights", "kernels"))


def apply_speed(transformer: torch.nn.Module, settings: SpeedSettings, *, device: torch.device,
                dtype: torch.dtype, stages: tuple[str, ...] = ("weights", "kernels")) -> dict[str, float]:
    """Change a loaded transformer as `settings` asks (after `check_speed`); `device` is where it computes
    (under offload its weights may be elsewhere), `dtype` its compute dtype. `stages`: "weights" (FP8
    quantisation or storage), "kernels" (the attention backend, compilation). -> seconds each change took."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if "weights" in stages and settings.quantize == "fp8":
        quantize_fp8(transformer)
        seconds["quantize"] = time.perf_counter() - started
    elif "weights" in stages and settings.fp8_storage:
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        seconds["fp8_storage"] = time.perf_counter() - started
    if "kernels" not in stages:
        return seconds
    if settings.attention_backend != "native":
        started = time.perf_counter()
        set_attention_backend(transformer, settings.attention_backend, device=device, dtype=dtype)
        seconds["attention_backend"] = time.perf_counter() - started
    if settings.compile:
        compile_blocks(transformer)
    return seconds


def quantize_fp8(transformer: torch.nn.Module) -> None:
    """FP8 weights and dynamic FP8 activations (per row) in the repeated blocks' linear layers.

    The embeddings, the output layer and the modulation layers (`_keep_in_fp32_modules`) stay as they are:
    they are a small part of the FLOPs and the most sensitive to precision."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    blocks = _repeated_blocks(transformer)

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return fp8_wanted(transformer, module, name)

    # set_inductor_config=False: torchao would otherwise switch on inductor's coordinate-descent tuning for the
    # whole process (longer compiles for every model, compiled before or after, not only this one).
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), set_inductor_config=False)
    for block in blocks:
        quantize_(block, config, filter_fn=wanted)


def fp8_wanted(transformer: torch.nn.Module, module: torch.nn.Module, name: str) -> bool:
    """Whether `quantize_fp8` converts `module` (named `name` inside a repeated block of `transformer`)."""
    keep = tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    return (isinstance(module, torch.nn.Linear) and not any(part in keep for part in name.split("."))
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def set_attention_backend(transformer: torch.nn.Module, backend: str, *, device: torch.device,
                          dtype: torch.dtype) -> None:
    """Route every attention of this transformer through `backend`, then run the kernel once on `device`.

    diffusers' `set_attention_backend` also makes the backend the process-wide default for processors that
    name none; that default is put back, so the option stays with this model (the benchmark and the tests load
    several models in one process)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = ATTENTION_BACKENDS[backend]
    default = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(name)
    finally:
        _AttentionBackendRegistry.set_active_backend(default)
    probe_attention(backend, device=device, dtype=dtype)


def probe_attention(backend: str, *, device: torch.device, dtype: torch.dtype) -> None:
    """Run `backend`'s kernel once on `device` in `dtype`; SpeedOptionError (with the kernel's error) if it
    cannot run there."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    # (batch, tokens, heads, head_dim), as the Kandinsky attention processor calls it
    q = torch.randn(1, 256, 2, 128, device=device, dtype=dtype)
    try:
        dispatch_attention_fn(q, q, q, backend=AttentionBackendName(ATTENTION_BACKENDS[backend]))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any kernel failure means the backend cannot be used here
        raise SpeedOptionError(f"--attention-backend {backend} failed on {device} in "
                               f"{str(dtype).removeprefix('torch.')}: {type(exc).__name__}: {exc}") from None


def compile_blocks(transformer: torch.nn.Module) -> int:
    """Regional compilation: `torch.compile` each repeated block's forward (dynamic shapes, so the 7 sizes and
    every prompt length share one compiled graph per block class). -> the blocks compiled."""
    blocks = _repeated_blocks(transformer)
    transformer.requires_grad_(False)  # inference only; the LoRA manager keeps it so (compiled code guards on it)
    # Each new set of active LoRA adapters compiles the blocks once more; past dynamo's limit (8 by default)
    # they would silently run eagerly, so a server that serves many adapter sets keeps more compiled variants.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)


def _repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        raise SpeedOptionError(f"{type(transformer).__name__} names no repeated blocks to compile or quantize")
    return blocks


def warm_up(generate: Callable, sizes: list[tuple[int, int]], *, steps: int = 2, edit: bool = False,
            on_status: Callable[[str], None] | None = None) -> float:
    """Generate once at each (width, height) so no request pays the compile or the first kernel launches.
    `generate(spec)` runs one `GenerationSpec`; `edit`: through the editing model, on a grey reference image.
    -> the seconds it took."""
    from PIL import Image

    from .worker import GenerationSpec

    started = time.perf_counter()
    what = "editing" if edit else "sizes"
    for index, (width, height) in enumerate(sizes):
        if on_status is not None:
            on_status(f"warming up: {width}x{height}, {index + 1} of {len(sizes)} {what}")
        reference = Image.new("RGB", (width, height), (128, 128, 128)) if edit else None
        # CFG on, so both branches (and two prompt lengths) run through the compiled blocks.
        generate(GenerationSpec("warm-up", "a longer negative prompt for the warm-up", width=width,
                                height=height, seed=0, steps=steps, guidance_scale=2.0, reference_image=reference))
    seconds = time.perf_counter() - started
    log.info("warmed up %d %s in %.1f s", len(sizes), what, seconds)
    return seconds
