"""Where a pipeline runs: the device and dtype an operator names, and placing a pipeline there (or under
diffusers' CPU offload, or group offloading)."""

from __future__ import annotations

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
           "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} requested but CUDA is not available")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


# Group offloading: transformer blocks per group. One block of the full model is 117 M parameters (234 MB in
# bfloat16): with the next group prefetched on a CUDA stream, two blocks are on the GPU at a time.
BLOCKS_PER_GROUP = 1
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def place(pipe, device: torch.device, offload: str, text_encoder_offload: bool = False) -> None:
    """Move a pipeline onto its device, or hand it to diffusers' CPU offload or group offloading.

    `group`: diffusers' block-level group offloading of the transformer (one block per group, the next group
    copied on a CUDA stream while the current one computes, `record_stream` so that no copy waits for the compute
    stream to finish with its tensors, pinned host memory); the other components resident.
    `text_encoder_offload` (with `none` or `group`): the text encoders on the device only while they encode, by
    accelerate's offload hook (the mechanism of model offload): moved on their first forward, moved back by
    `offload_text_encoders` once the request's prompts are encoded."""
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
        return
    if offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        return
    if offload == "none" and not text_encoder_offload:
        pipe.to(device)
        return
    kept = set(TEXT_ENCODERS) if text_encoder_offload else set()
    if text_encoder_offload:  # first: a quantised encoder may have loaded onto the device; make room
        from accelerate import cpu_offload_with_hook

        for name in TEXT_ENCODERS:
            module = getattr(pipe, name)
            if getattr(module, "_k5_offload_hook", None) is None:  # (shared with the T2I pipeline: hooked once)
                _, module._k5_offload_hook = cpu_offload_with_hook(module.to("cpu"), execution_device=device)
    if offload == "group":
        stream = device.type == "cuda"
        pipe.transformer.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=BLOCKS_PER_GROUP, use_stream=stream, record_stream=stream, low_cpu_mem_usage=False)
        kept.add("transformer")
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in kept:
            component.to(device)


def offload_text_encoders(pipe) -> None:
    """Under `--text-encoder-offload`: the text encoders back to host memory once the prompts are encoded."""
    for name in TEXT_ENCODERS:
        hook = getattr(getattr(pipe, name, None), "_k5_offload_hook", None)
        if hook is not None:
            hook.offload()
