"""Loading the Kandinsky 5 pipeline onto a device: the same `from_pretrained` for real and tiny weights."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import replace

import torch

from .config import EngineConfig, LoadConfig, SpeedSettings
from .device import pick_device, pick_dtype
from .engine import K5Engine
from .k5 import K5T2IPipeline
from .memory import human, module_bytes, resolve, why_not
from .speed import place_with_speed, warm_up
from .text_encoder_quant import pipeline_quantization

log = logging.getLogger("k5serve.loader")

if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):  # transformers and huggingface_hub read it themselves
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()

def load_t2i(config: LoadConfig, speed: SpeedSettings = SpeedSettings()) -> tuple[K5T2IPipeline, dict]:
    """The T2I pipeline as `config` and `speed` say (after `memory.resolve` has applied the memory profile)."""
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    started = time.perf_counter()
    reason = why_not(config, speed, device, dtype)  # before minutes of loading
    if reason is not None:
        raise ValueError(reason)
    # (on CUDA, bitsandbytes loads the NF4 encoder straight onto the current device: make that the chosen one)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        pipe = K5T2IPipeline.from_pretrained(
            config.path, dtype=dtype, quantization_config=pipeline_quantization(config.text_encoder_quant, dtype))
    pipe.text_encoder_quant = config.text_encoder_quant
    speed_seconds = place_with_speed(pipe, speed, device=device, dtype=dtype, offload=config.offload,
                                     text_encoder_offload=config.text_encoder_offload)
    pipe.vae.enable_slicing()  # numberResults images decoded one at a time: the plan's decode peak is one image's
    pipe.set_progress_bar_config(disable=True)
    weights = {name: module_bytes(module) for name, module in pipe.components.items()
               if isinstance(module, torch.nn.Module)}
    info = {
        "model_path": str(config.path),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "offload": config.offload,
        "text_encoder_quant": config.text_encoder_quant,
        "text_encoder_offload": config.text_encoder_offload,
        "memory_profile": config.memory_profile,
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "weights_bytes": sum(weights.values()),
        "load_seconds": round(time.perf_counter() - started, 2),
        "speed": {"compile": speed.compile, "attention_backend": speed.attention_backend,
                  "quantize": speed.quantize, "fp8_storage": speed.fp8_storage, "prompt_cache": speed.prompt_cache,
                  **{f"{name}_seconds": round(value, 2) for name, value in speed_seconds.items()}},
    }
    if device.type == "cuda":
        info["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(device)
    log.info("loaded %s on %s (%s, offload %s, text encoder %s%s): %s of weights%s", config.path, device,
             info["dtype"], config.offload, config.text_encoder_quant,
             ", offloaded" if config.text_encoder_offload else "", human(info["weights_bytes"]),
             f", {human(info['gpu_memory_allocated_bytes'])} allocated on the GPU" if device.type == "cuda" else "")
    return pipe, info


def load_engine(config: LoadConfig, engine: EngineConfig = EngineConfig(), *,
                on_status=None) -> tuple[K5Engine, dict]:
    """The T2I pipeline plus the (shared-encoder) I2I editing pipeline and LoRA support; with `--warmup`, one
    generation at every size the pipeline serves before it is handed over (`on_status` hears the progress).

    First the memory profile is applied and the memory plan made (`memory.resolve`): a plan over the budget stops
    here, before any weight is read. With `--memory-budget` on a GPU, the allocator is held to it."""
    config, engine, plan = resolve(config, engine)
    log.info("%s", plan.describe())
    device = pick_device(config.device)
    if config.memory_budget is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config.memory_budget / total), device)
    pipe, info = load_t2i(config, engine.speed)
    info["memory_plan"] = plan.as_dict()
    engine = replace(engine, offload=config.offload, text_encoder_offload=config.text_encoder_offload,
                     text_encoder_quant=config.text_encoder_quant)
    k5 = K5Engine(pipe, engine)
    if engine.speed.warmup:
        sizes = list(pipe.resolutions)  # (width, height): the 7 sizes of the model page
        seconds = warm_up(k5.generate, sizes, on_status=on_status)
        if engine.i2i_path is not None and engine.i2i_load == "eager":  # (a lazy editing model stays unloaded)
            seconds += warm_up(k5.generate, list(k5.i2i().resolutions), edit=True, on_status=on_status)
        info["warmup_seconds"] = round(seconds, 2)
    return k5, info
