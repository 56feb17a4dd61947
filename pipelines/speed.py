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


def check_speed(settings: SpeedSettings, device: torch.device, *, offload: str = "none") -> None:
    """Refuse, with a clear message, what `device` cannot do. Called before the weights are loaded."""
    cuda = device.type == "cuda"
    capability = torch.cuda.get_device_capability(device) if cuda else None
    where = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}.{capability[1]})" \
        if cuda else f"the {device.type.upper()}"
    if settings.prompt_cache < 0:
        raise SpeedOptionError("--prompt-cache must be 0 (off) or more")
    if settings.quantize is not None:
        if settings.quantize not in QUANTIZE:
            raise SpeedOptionError(f"--quantize {settings.quantize}: choose from {', '.join(QUANTIZE)}")
        if settings.fp8_storage:
            raise SpeedOptionError("--quantize fp8 already stores the transformer's weights in FP8; drop "
                                   "--fp8-storage")
        if not cuda or capability < (8, 9):
            raise SpeedOptionError(f"--quantize fp8 needs FP8 matrix units (an NVIDIA GPU of compute capability "
                                   f"8.9 or higher: Ada, Hopper, Blackwell); this run uses {where}. "
                                   "--fp8-storage halves the transformer's memory on any device")
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise SpeedOptionError("--quantize fp8 needs torchao: pip install 'k5serve[fp8]'") from None
        if offload == "sequential":
            raise SpeedOptionError("--quantize fp8 does not work with --offload sequential (use --offload model)")
    backend = settings.attention_backend
    if backend not in ATTENTION_BACKENDS:
        raise SpeedOptionError(f"--attention-backend {backend}: choose from {', '.join(ATTENTION_BACKENDS)}")
    if backend not in ("native", "math"):
        if not cuda:
            raise SpeedOptionError(f"--attention-backend {backend} needs a CUDA GPU; this run uses {where} "
                                   "(use native)")
        if backend == "flash3" and capability[0] != 9:
            raise SpeedOptionError(f"--attention-backend flash3 is FlashAttention 3, for Hopper GPUs (compute "
                                   f"capability 9.0); this run uses {where}")
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
                raise SpeedOptionError(f"--compile needs Triton for {where}: pip install triton")
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


def apply_speed(transformer: torch.nn.Module, settings: SpeedSettings) -> dict[str, float]:
    """Change a loaded transformer as `settings` asks (after `check_speed`); -> seconds each change took."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if settings.quantize == "fp8":
        quantize_fp8(transformer)
        seconds["quantize"] = time.perf_counter() - started
    elif settings.fp8_storage:
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=transformer.dtype)
        seconds["fp8_storage"] = time.perf_counter() - started
    if settings.attention_backend != "native":
        started = time.perf_counter()
        set_attention_backend(transformer, settings.attention_backend)
        seconds["attention_backend"] = time.perf_counter() - started
    if settings.compile:
        compile_blocks(transformer)
    return seconds


def quantize_fp8(transformer: torch.nn.Module) -> None:
    """FP8 weights and dynamic FP8 activations (per row) in the repeated blocks' linear layers.

    The embeddings, the output layer and the modulation layers (`_keep_in_fp32_modules`) stay as they are:
    they are a small part of the FLOPs and the most sensitive to precision."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    keep = tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    blocks = _repeated_blocks(transformer)

    def wanted(module: torch.nn.Module, name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and not any(part in keep for part in name.split("."))
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    for block in blocks:
        quantize_(block, config, filter_fn=wanted)


def set_attention_backend(transformer: torch.nn.Module, backend: str) -> None:
    """Route every attention of the transformer through `backend`, then run it once on the model's device."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    name = ATTENTION_BACKENDS[backend]
    transformer.set_attention_backend(name)
    param = next(transformer.parameters())
    dtype = param.dtype if param.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    # (batch, tokens, heads, head_dim), as the Kandinsky attention processor calls it
    q = torch.randn(1, 256, 2, 128, device=param.device, dtype=dtype)
    try:
        dispatch_attention_fn(q, q, q, backend=name)
        if param.device.type == "cuda":
            torch.cuda.synchronize(param.device)
    except Exception as exc:  # noqa: BLE001 - any kernel failure means the backend cannot be used here
        raise SpeedOptionError(f"--attention-backend {backend} failed on {param.device}: "
                               f"{type(exc).__name__}: {exc}") from None


def compile_blocks(transformer: torch.nn.Module) -> int:
    """Regional compilation: `torch.compile` each repeated block's forward (dynamic shapes, so the 7 sizes and
    every prompt length share one compiled graph per block class). -> the blocks compiled."""
    blocks = _repeated_blocks(transformer)
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)


def _repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        raise SpeedOptionError(f"{type(transformer).__name__} names no repeated blocks to compile or quantize")
    return blocks


def warm_up(generate: Callable, sizes: list[tuple[int, int]], *, steps: int = 2,
            on_status: Callable[[str], None] | None = None) -> float:
    """Generate once at each (width, height) so no request pays the compile or the first kernel launches.
    `generate(spec)` runs one `GenerationSpec`. -> the seconds it took."""
    from .worker import GenerationSpec

    started = time.perf_counter()
    for index, (width, height) in enumerate(sizes):
        if on_status is not None:
            on_status(f"warming up: {width}x{height}, {index + 1} of {len(sizes)} sizes")
        # CFG on, so both branches (and two prompt lengths) run through the compiled blocks.
        generate(GenerationSpec("warm-up", "a longer negative prompt for the warm-up", width=width,
                                height=height, seed=0, steps=steps, guidance_scale=2.0))
    seconds = time.perf_counter() - started
    log.info("warmed up %d sizes in %.1f s", len(sizes), seconds)
    return seconds
