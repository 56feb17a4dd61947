"""Loading the Kandinsky 5 pipeline onto a device: the same `from_pretrained` for real and tiny weights."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import torch

from .config import EngineConfig, LoadConfig, SpeedSettings
from .device import pick_device, pick_dtype, place
from .engine import K5Engine
from .k5 import K5T2IPipeline
from .speed import apply_speed, check_speed, warm_up

log = logging.getLogger("k5serve.loader")

if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):  # transformers and huggingface_hub read it themselves
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()

def load_t2i(config: LoadConfig, speed: SpeedSettings = SpeedSettings()) -> tuple[K5T2IPipeline, dict]:
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    started = time.perf_counter()
    if config.offload != "none" and device.type != "cuda":
        raise ValueError(f"--offload {config.offload} needs a CUDA device (got {device})")
    check_speed(speed, device, dtype=dtype, offload=config.offload)  # before minutes of loading
    pipe = K5T2IPipeline.from_pretrained(config.path, dtype=dtype)
    place(pipe, device, config.offload)
    pipe.set_progress_bar_config(disable=True)
    speed_seconds = apply_speed(pipe.transformer, speed, device=device, dtype=dtype)
    weights = {name: sum(p.numel() * p.element_size() for p in module.parameters())
               for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}
    info = {
        "model_path": str(config.path),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "offload": config.offload,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "weights_bytes": sum(weights.values()),
        "load_seconds": round(time.perf_counter() - started, 2),
        "speed": {"compile": speed.compile, "attention_backend": speed.attention_backend,
                  "quantize": speed.quantize, "fp8_storage": speed.fp8_storage, "prompt_cache": speed.prompt_cache,
                  **{f"{name}_seconds": round(value, 2) for name, value in speed_seconds.items()}},
    }
    if device.type == "cuda":
        info["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(device)
    log.info("loaded %s on %s (%s, offload %s): %.2f GB of weights%s", config.path, device, info["dtype"],
             config.offload, info["weights_bytes"] / 1e9,
             f", {info['gpu_memory_allocated_bytes'] / 1e9:.2f} GB allocated on the GPU"
             if device.type == "cuda" else "")
    return pipe, info


def load_engine(config: LoadConfig, engine: EngineConfig = EngineConfig(), *,
                on_status=None) -> tuple[K5Engine, dict]:
    """The T2I pipeline plus the (shared-encoder) I2I editing pipeline and LoRA support; with `--warmup`, one
    generation at every size the pipeline serves before it is handed over (`on_status` hears the progress)."""
    pipe, info = load_t2i(config, engine.speed)
    if config.offload != "none":
        engine = replace(engine, offload=config.offload)
    k5 = K5Engine(pipe, engine)
    if engine.speed.warmup:
        sizes = list(pipe.resolutions)  # (width, height): the 7 sizes of the model page
        seconds = warm_up(k5.generate, sizes, on_status=on_status)
        if engine.i2i_path is not None and engine.i2i_load == "eager":  # (a lazy editing model stays unloaded)
            seconds += warm_up(k5.generate, list(k5.i2i().resolutions), edit=True, on_status=on_status)
        info["warmup_seconds"] = round(seconds, 2)
    return k5, info
