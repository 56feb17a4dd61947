"""The memory plan: before any weight is loaded, what each component will hold on the device and in host memory,
and an estimate of the peak during a generation; the memory profiles, and `auto`, which picks the fastest profile
whose plan fits.

The weights' bytes are exact, not estimated: each component is built from its `config.json` on the meta device
(no memory, no weights read), in the dtype `from_pretrained` gives it (`_keep_in_fp32_modules` in float32), with
the chosen options applied the way loading applies them. `--fp8-storage` is diffusers' own layerwise casting,
applied to the meta model; a quantised text encoder is counted layer by layer with the storage formats of the
libraries (`quantised_bytes`), for exactly the linear layers transformers' quantisers convert (all but the output
embeddings). `tests/test_memory.py` checks these against the loaded tiny model under every option.

The activations are an estimate from the configuration (the largest tensors alive at once in each stage, below),
checked against `torch.cuda.max_memory_allocated` by `benchmarks/bench_gpu.py`'s profile rows. A generation has
three stages, and the peak is the largest of them:

* encode: the Qwen2.5-VL forward at the longest prompt (its hidden states of every layer, which the pipeline asks
  for, the logits and the MLP's intermediates);
* denoise: one transformer pass for `numberResults` images (a visual block's float32 norm-and-modulate temporaries
  or its feed-forward intermediates, whichever is larger), plus the latents and the text embeddings of both CFG
  branches;
* decode: the VAE decoding one image at a time (the engine turns on the VAE's slicing), whose largest moment is the
  upsampling into the last, full-resolution block.

Each stage adds what is on the device for good (resident components, the prompt cache's entries at their largest)
and what comes onto it only for that stage (an offloaded component). LoRA adapters are not in the plan.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import MEMORY_PROFILES, PROFILE_FIELDS, EngineConfig, LoadConfig, SpeedSettings
from .device import BLOCKS_PER_GROUP, pick_device, pick_dtype

log = logging.getLogger("k5serve.memory")

GB = 10**9
SIZES = ((1024, 1024), (1408, 640))  # the largest size and the widest, of the model page's seven
IMAGES = (1, 4)  # numberResults
T2I_TOKENS = 40 + 512  # the T2I template's 40 tokens, then the prompt at the pipeline's max_sequence_length
# I2I: its template's 54 tokens, the instruction at its max_sequence_length (1024), and the reference image's
# tokens (Qwen-VL sees it at half size: a 1024x1024 image is 512x512, 14-pixel patches merged 2x2, about 340)
I2I_TOKENS = 54 + 1024 + 400
RESERVE = 0.05  # of the budget kept free: the allocator's rounding and fragmentation, library workspaces
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bitsandbytes' 4-bit blocks, and the blocks of its double quantisation
# What a card of each profile's size leaves one process: its memory (GiB) less the CUDA context and the driver's
# reserve, about 0.6 GB on a Linux server (a desktop session on the same card takes more). The profiles are made
# to fit these by their plans (tests/test_memory.py), for the T2I model without an editing model loaded.
CONTEXT = 6 * 10**8
CARD_FREE = {"24gb": 24 * 2**30 - CONTEXT, "16gb": 16 * 2**30 - CONTEXT, "12gb": 12 * 2**30 - CONTEXT}


class MemoryPlanError(ValueError):
    """The plan does not fit (or no profile does); the message says by how much and what would fit."""


@dataclass
class ComponentPlan:
    weights: int  # the component's bytes (parameters and buffers, in their stored formats)
    device: int  # bytes on the device all the time
    while_used: int  # bytes that come onto the device only while the component runs
    host: int  # bytes held in host memory
    storage: str  # e.g. "bfloat16", "nf4", "fp8 storage"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MemoryPlan:
    profile: str
    device: str
    dtype: str
    options: dict[str, Any]
    components: dict[str, ComponentPlan]
    peaks: dict[str, dict[str, int]]  # "1024x1024 x1" -> {"encode": .., "denoise": .., "decode": ..}
    budget: int | None
    budget_source: str
    notes: list[str] = field(default_factory=list)
    host_budget: int | None = None  # host memory available (offloaded weights live there); None: not checked

    @property
    def peak(self) -> int:
        return max(max(stages.values()) for stages in self.peaks.values())

    def peak_of(self, images: int, size: tuple[int, int] | None = None) -> int:
        """The peak of a generation of `images` images at `size` (width, height), or at the largest of SIZES."""
        return max(max(self.peaks[case_name(*wh, images)].values()) for wh in ([size] if size else SIZES))

    @property
    def worst(self) -> str:
        return max(self.peaks, key=lambda case: max(self.peaks[case].values()))

    @property
    def usable(self) -> int | None:
        return None if self.budget is None else int(self.budget * (1 - RESERVE))

    @property
    def host(self) -> int:
        return sum(c.host for c in self.components.values())

    @property
    def host_fits(self) -> bool:
        return self.host_budget is None or self.host <= self.host_budget

    @property
    def fits(self) -> bool:
        return (self.usable is None or self.peak <= self.usable) and self.host_fits

    @property
    def device_weights(self) -> int:
        return sum(c.device for c in self.components.values())

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "device": self.device, "dtype": self.dtype, "options": self.options,
                "components": {name: c.as_dict() for name, c in self.components.items()},
                "peaks": self.peaks, "peak_bytes": self.peak, "peak_case": self.worst,
                "device_weights_bytes": self.device_weights,
                "host_bytes": self.host, "host_available_bytes": self.host_budget,
                "budget_bytes": self.budget, "usable_bytes": self.usable, "budget_source": self.budget_source,
                "fits": self.fits, "estimate": "weights exact; activations estimated", "notes": self.notes}

    def describe(self) -> str:
        """The plan as the log prints it at start-up."""
        options = ", ".join(f"{k} {v}" for k, v in self.options.items())
        lines = [f"memory plan ({self.profile}: {options}) on {self.device}, {self.dtype}:"]
        for name, c in self.components.items():
            lines.append(f"  {name:15} {c.storage:13} {human(c.weights):>9}: {human(c.device)} on the device, "
                         f"{human(c.while_used)} more while it runs, {human(c.host)} in host memory")
        for case, stages in self.peaks.items():
            lines.append(f"  peak {case:12} " + ", ".join(f"{stage} {human(value)}" for stage, value in stages.items()))
        budget = "no budget" if self.budget is None else \
            f"{human(self.usable)} usable of {human(self.budget)} ({self.budget_source})"
        host = "" if self.host_budget is None else \
            f"; host memory {human(self.host)} of {human(self.host_budget)} available"
        lines.append(f"  peak {human(self.peak)} ({self.worst}); {budget}{host}: "
                     f"{'fits' if self.fits else 'does NOT fit'}")
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])


def case_name(width: int, height: int, images: int) -> str:
    """A generation's key in `MemoryPlan.peaks`, e.g. "1024x1024 x4"."""
    return f"{width}x{height} x{images}"


def human(size: int | None) -> str:
    """Bytes for a person: GB (10^9) to two places, MB below 0.1 GB."""
    if size is None:
        return "-"
    return f"{size / GB:.2f} GB" if size >= GB // 10 else f"{size / 10**6:.2f} MB"


# ---------------------------------------------------------------------------------------------------------------
# The components on the meta device


def _import(library: str, name: str):
    return getattr(importlib.import_module(library), name)


def meta_component(library: str, class_name: str, folder: Path) -> torch.nn.Module:
    """A diffusers or transformers model built from `folder`'s config on the meta device (in float32)."""
    cls = _import(library, class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(cls.load_config(folder))
        from transformers import AutoConfig

        return cls._from_config(AutoConfig.from_pretrained(folder))


def meta_components(path: Path, *, i2i_path: Path | None = None, safety_path: Path | None = None
                    ) -> dict[str, torch.nn.Module]:
    """The T2I checkpoint's models (and the editing transformer and the safety classifier when configured), on
    the meta device, from their configs."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    components = {name: meta_component(*index[name], Path(path) / name)
                  for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    if i2i_path is not None:
        library, class_name = json.loads((Path(i2i_path) / "model_index.json").read_text())["transformer"]
        components["transformer_i2i"] = meta_component(library, class_name, Path(i2i_path) / "transformer")
    if safety_path is not None:
        from transformers import AutoConfig, AutoModelForImageClassification

        with torch.device("meta"):
            components["safety"] = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(safety_path))
    return components


def as_loaded(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`module` in the dtype `from_pretrained(dtype=...)` leaves it: `dtype`, but its `_keep_in_fp32_modules`."""
    module = torch.nn.Module.to(module, dtype)  # (not ModelMixin.to, which warns about the kept modules)
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if keep and dtype in (torch.float16, torch.bfloat16):
        for name, sub in module.named_modules():
            if keep & set(name.split(".")):
                sub.float()
    return module


# ---------------------------------------------------------------------------------------------------------------
# Bytes


def tensor_bytes(tensor: torch.Tensor) -> int:
    """A tensor's bytes in its stored format: the inner tensors of a torchao tensor, the packed data and the
    quantisation state of a bitsandbytes 4-bit parameter."""
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit: packed data + absmax + code (+ the nested state)
        total = tensor.numel() * tensor.element_size()
        states = [quant_state] + ([quant_state.state2] if getattr(quant_state, "nested", False) else [])
        for state in states:
            total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code))
        if getattr(quant_state, "nested", False):
            total += quant_state.offset.numel() * quant_state.offset.element_size()
        return total
    if hasattr(tensor, "__tensor_flatten__") and type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    """The bytes of a module's parameters and buffers (shared ones once)."""
    return sized(module, {id(t): tensor_bytes(t) for t in _tensors(module)})


def quantised_bytes(weight_shape: tuple[int, int], mode: str) -> int:
    """One linear layer's weight (out, in) stored by `mode`: bitsandbytes NF4 with double quantisation
    (packed 4-bit data, a uint8 absmax per 64 weights, a float32 absmax per 256 of those, the two code tables
    and the offset), torchao int8 (int8 data, float32 scale and int8 zero point per row) or float8 (float8 data,
    a float32 scale per row)."""
    out, inp = weight_shape
    n = out * inp
    if mode == "nf4":
        blocks = math.ceil(n / NF4_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_BLOCK2) + 4 * 256 + 4 * 16 + 4
    if mode == "int8":
        return n + out * (4 + 1)
    if mode == "fp8":
        return n + out * 4
    raise ValueError(mode)


def quantised_linears(model: torch.nn.Module) -> list[str]:
    """The linear layers transformers' quantisers convert: all but those `get_keys_to_not_convert` keeps (the
    output embeddings) and the model's `_keep_in_fp32_modules`."""
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(model)) | set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and not any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip)]


def loaded_sizes(name: str, module: torch.nn.Module, dtype: torch.dtype, load: LoadConfig,
                 speed: SpeedSettings) -> tuple[torch.nn.Module, dict[int, int]]:
    """Component `name` as loaded in `dtype` with the options, on the meta device, and the bytes of each of its
    tensors (by id) in their stored formats:

    * a transformer with `--fp8-storage`: diffusers' layerwise casting, applied to the meta model; with
      `--quantize fp8`: torchao FP8 weights with a float32 scale per row in the repeated blocks' linear layers that
      `speed.quantize_fp8` converts;
    * the text encoder with `--text-encoder-quant`: the storage format of that mode in each linear layer
      transformers' quantisers convert."""
    if name == "safety":  # (loaded without a dtype)
        module = module.float()
        return module, {id(t): tensor_bytes(t) for t in _tensors(module)}
    module = as_loaded(module, dtype)
    quantised: dict[int, int] = {}
    if name.startswith("transformer"):
        if speed.quantize == "fp8":
            from .speed import _repeated_blocks, fp8_wanted

            for block in _repeated_blocks(module):
                for sub_name, sub in block.named_modules():
                    if fp8_wanted(module, sub, sub_name):
                        quantised[id(sub.weight)] = quantised_bytes(tuple(sub.weight.shape), "fp8")
        elif speed.fp8_storage:  # (on a copy: the hooks stay with the model they are put on)
            module = copy.deepcopy(module)
            module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    elif name == "text_encoder" and load.text_encoder_quant != "none":
        modules = dict(module.named_modules())
        for linear in quantised_linears(module):
            weight = modules[linear].weight
            quantised[id(weight)] = quantised_bytes(tuple(weight.shape), load.text_encoder_quant)
    return module, {id(t): quantised.get(id(t), tensor_bytes(t)) for t in _tensors(module)}


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def sized(module: torch.nn.Module, sizes: Mapping[int, int]) -> int:
    """The bytes of `module`'s tensors by `sizes` (shared ones once)."""
    return sum(sizes[i] for i in {id(t) for t in _tensors(module)})


def largest(modules, sizes: Mapping[int, int]) -> int:
    return max((sized(m, sizes) for m in modules), default=0)


# ---------------------------------------------------------------------------------------------------------------
# Activations (estimates; see the module's docstring)


def transformer_activation(config: Mapping[str, Any], width: int, height: int, images: int, size: int,
                           vae_scale: int, text_tokens: int) -> int:
    d, f, in_text = config["model_dim"], config["ff_dim"], config["in_text_dim"]
    patch = config["patch_size"]
    latent = (height // vae_scale) * (width // vae_scale)
    tokens = (height // vae_scale // patch[1]) * (width // vae_scale // patch[2])
    # a visual block: x, its float32 copy, the float32 norm and modulation temporaries, q/k/v (rotary in float32),
    # or the feed-forward's input, hidden layer and activation
    block = tokens * max(24 * d, (2 * f + 3 * d) * size)
    loop = latent * config["out_visual_dim"] * 4 * 4 + 2 * text_tokens * in_text * size  # latents; CFG's embeddings
    return images * (block + loop)


def vae_activation(config: Mapping[str, Any], width: int, height: int, size: int) -> int:
    channels = config["block_out_channels"]
    # one image (VAE slicing): the upsampled output of the second-to-last block and the conv after it, then the
    # first resnet of the last block (its input at the wider channel count, norm and activation outputs)
    wide, last = channels[1] if len(channels) > 1 else channels[0], channels[0]
    return width * height * (3 * wide + 2 * last) * size + 3 * width * height * 4  # (+ the decoded image)


def text_encoder_activation(config: Any, size: int, tokens: int = T2I_TOKENS) -> int:
    text = getattr(config, "text_config", config)
    hidden, layers = text.hidden_size, text.num_hidden_layers
    return tokens * size * ((layers + 1) * hidden + text.vocab_size + 3 * text.intermediate_size)


# ---------------------------------------------------------------------------------------------------------------
# The plan


def plan(components: Mapping[str, torch.nn.Module], load: LoadConfig, speed: SpeedSettings, *,
         device: torch.device, dtype: torch.dtype, budget: int | None = None, budget_source: str = "",
         profile: str = "custom", host_budget: int | None = None) -> MemoryPlan:
    """The plan for `components` (from `meta_components`) loaded as `load` and `speed` say, on `device`."""
    offload, quant = load.offload, load.text_encoder_quant
    size = torch.tensor([], dtype=dtype).element_size()
    dtype_name = str(dtype).removeprefix("torch.")
    parts: dict[str, ComponentPlan] = {}
    for name, meta in components.items():
        module, sizes = loaded_sizes(name, meta, dtype, load, speed)
        total = sized(module, sizes)
        if name.startswith("transformer"):
            storage = "fp8 (torchao)" if speed.quantize == "fp8" else "fp8 storage" if speed.fp8_storage \
                else dtype_name
        elif name == "text_encoder" and quant != "none":
            storage = quant
        else:
            storage = "float32" if name == "safety" else dtype_name
        if offload == "model" and name != "safety":
            parts[name] = ComponentPlan(total, 0, total, total, storage)
        elif offload == "sequential" and name != "safety":  # one leaf module's weights at a time
            leaf = largest((m for m in module.modules() if not list(m.children())), sizes)
            parts[name] = ComponentPlan(total, 0, leaf, total, storage)
        elif offload == "group" and name.startswith("transformer"):  # blocks streamed; the rest during a pass
            blocks = [b for lst in module.children() if isinstance(lst, torch.nn.ModuleList) for b in lst]
            rest = total - sum(sized(b, sizes) for b in blocks)
            parts[name] = ComponentPlan(total, 0, rest + 2 * BLOCKS_PER_GROUP * largest(blocks, sizes), total,
                                        storage)
        else:
            parts[name] = ComponentPlan(total, total, 0, 0, storage)
        if load.text_encoder_offload and name.startswith("text_encoder") and offload in ("none", "group"):
            parts[name] = ComponentPlan(total, 0, total, total, storage)  # on the device only while encoding
    if offload in ("model", "sequential") and "transformer_i2i" in parts:
        notes_i2i = True  # the offloaded editing pipeline keeps its own encoders and VAE in host memory
        for name in ("text_encoder", "text_encoder_2", "vae"):
            parts[name].host += parts[name].weights
    else:
        notes_i2i = False

    vae_config = components["vae"].config
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    qwen_config = components["text_encoder"].config
    hidden = getattr(qwen_config, "text_config", qwen_config).hidden_size
    # An entry holds the last hidden state of the whole sequence (the pipeline's embedding is a view into it); with
    # an editing model, entries may be editing prompts, with the image's tokens.
    tokens = I2I_TOKENS if "transformer_i2i" in components else T2I_TOKENS
    cache = speed.prompt_cache * tokens * hidden * size  # the prompt cache's entries at their largest
    resident = sum(p.device for p in parts.values()) + cache
    # (under model offload too: the chain starts at the Qwen encoder, which nothing offloads before CLIP runs,
    # and the negative prompt brings Qwen back while CLIP is still on the device)
    encoders = sum(parts[n].while_used for n in ("text_encoder", "text_encoder_2"))
    transformer = max(p.while_used for n, p in parts.items() if n.startswith("transformer"))
    peaks = {}
    for width, height in SIZES:
        for images in IMAGES:
            peaks[case_name(width, height, images)] = {
                "encode": resident + encoders + text_encoder_activation(qwen_config, size, tokens),
                "denoise": resident + transformer + transformer_activation(
                    components["transformer"].config, width, height, images, size, vae_scale, tokens),
                "decode": resident + parts["vae"].while_used + vae_activation(vae_config, width, height, size),
            }
    notes = ["LoRA adapters are not in the plan: each loaded one adds its own size"]
    if notes_i2i:
        notes.append("the offloaded editing pipeline keeps its own text encoders and VAE in host memory")
    options = {"offload": offload, "text_encoder_quant": quant, "text_encoder_offload": load.text_encoder_offload,
               "fp8_storage": speed.fp8_storage,
               "quantize": speed.quantize, "prompt_cache": speed.prompt_cache}
    return MemoryPlan(profile, str(device), dtype_name, options, parts, peaks, budget, budget_source, notes,
                      host_budget)


# ---------------------------------------------------------------------------------------------------------------
# Budgets and profiles


def device_budget(device: torch.device, limit: int | None = None) -> tuple[int | None, str]:
    """-> (bytes a plan may use on `device`, where that figure comes from): the free memory of a GPU, the
    available host memory for the CPU, or `limit` (`--memory-budget`) when it is lower."""
    free, source = None, ""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        source = f"free on {torch.cuda.get_device_name(device)}, {total / GB:.1f} GB in all"
    elif device.type == "cpu":
        free = _available_host_memory()
        source = "available host memory" if free is not None else ""
    if limit is not None and (free is None or limit <= free):
        return limit, "--memory-budget"
    if limit is not None:
        source += f"; less than --memory-budget {limit / GB:.2f} GB"
    return free, source


def _available_host_memory() -> int | None:
    """The host memory this process may still take: the kernel's MemAvailable, or less where a cgroup (a
    container's memory limit) leaves less."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    try:  # cgroup v2
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = left if available is None else min(available, left)
    except (OSError, ValueError):
        pass
    return available


def with_profile(load: LoadConfig, engine: EngineConfig, profile: str) -> tuple[LoadConfig, EngineConfig]:
    """`load` and `engine` with `profile`'s choices for every option the operator did not give."""
    explicit = load.explicit
    if explicit is None:  # a library caller: what differs from the defaults was chosen
        defaults = {**asdict(SpeedSettings()), **{f: getattr(LoadConfig(load.path), f) for f in PROFILE_FIELDS
                                                   if hasattr(load, f)}}
        current = {**asdict(engine.speed), **{f: getattr(load, f) for f in PROFILE_FIELDS if hasattr(load, f)}}
        explicit = frozenset(f for f in PROFILE_FIELDS if current[f] != defaults[f])
    choices = {k: v for k, v in MEMORY_PROFILES[profile].items() if k not in explicit}
    if engine.speed.quantize == "fp8":  # FP8 products already store the weights in FP8
        choices.pop("fp8_storage", None)
    if "offload" in explicit and load.offload in ("model", "sequential"):  # these offload the encoders already
        choices.pop("text_encoder_offload", None)
        if load.offload == "sequential":  # (whose per-parameter hooks do not move quantised weights)
            choices.pop("text_encoder_quant", None)
    load = replace(load, memory_profile=profile, **{k: v for k, v in choices.items() if hasattr(load, k)})
    speed = replace(engine.speed, **{k: v for k, v in choices.items() if hasattr(engine.speed, k)})
    return load, replace(engine, speed=speed, offload=load.offload)


def why_not(load: LoadConfig, speed: SpeedSettings, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this device or install cannot run these options (the start-up checks' message), or None."""
    from .speed import SpeedOptionError, check_speed
    from .text_encoder_quant import QuantOptionError, check_text_encoder_quant

    if load.offload != "none" and device.type != "cuda":
        return f"--offload {load.offload} needs a CUDA device (this run uses {device})"
    if load.text_encoder_offload and load.offload in ("model", "sequential"):
        return f"--text-encoder-offload: --offload {load.offload} already offloads the text encoders"
    if load.text_encoder_offload and device.type != "cuda":
        return f"--text-encoder-offload needs a CUDA device (this run uses {device})"
    try:
        check_text_encoder_quant(load.text_encoder_quant, device, dtype, load.offload)
        check_speed(speed, device, dtype=dtype, offload=load.offload)
    except (QuantOptionError, SpeedOptionError) as exc:
        return str(exc)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # (the probes' tensors: not to be counted against the budget)
    return None


def resolve(load: LoadConfig, engine: EngineConfig, *, components: Mapping[str, torch.nn.Module] | None = None
            ) -> tuple[LoadConfig, EngineConfig, MemoryPlan]:
    """Apply `load.memory_profile` (or pick one for `auto`), check what it asks of the device, and plan its memory.
    -> (the load and engine configs as the profile sets them, the plan). MemoryPlanError when the plan does not
    fit the budget (naming a profile that would), or when no profile fits; the checks' own errors when an
    explicit profile asks for what the device cannot do."""
    device = pick_device(load.device)
    dtype = pick_dtype(load.dtype, device)
    if components is None:
        try:
            components = meta_components(load.path, i2i_path=engine.i2i_path, safety_path=engine.safety_path)
        except (OSError, KeyError, ValueError, ImportError, AttributeError) as exc:
            raise MemoryPlanError(f"cannot plan the memory of {load.path}: its model configuration does not read: "
                                  f"{type(exc).__name__}: {exc}") from None
    budget, source = device_budget(device, load.memory_budget)
    host_budget = _available_host_memory() if device.type == "cuda" else None  # (on the CPU: the budget itself)
    reason = why_not(load, engine.speed, device, dtype)  # what the operator gave, before any profile
    if reason is not None:
        raise MemoryPlanError(reason)

    def planned(name: str) -> tuple[LoadConfig, EngineConfig, MemoryPlan | str]:
        profile_load, profile_engine = with_profile(load, engine, name)
        reason = why_not(profile_load, profile_engine.speed, device, dtype)
        if reason is not None:
            return profile_load, profile_engine, reason
        return profile_load, profile_engine, plan(components, profile_load, profile_engine.speed, device=device,
                                                  dtype=dtype, budget=budget, budget_source=source, profile=name,
                                                  host_budget=host_budget)

    if load.memory_profile != "auto":
        chosen_load, chosen_engine, chosen = planned(load.memory_profile)
        if isinstance(chosen, str):
            raise MemoryPlanError(chosen)
        if chosen.fits:
            return chosen_load, chosen_engine, chosen
        others = [(name, result) for name in MEMORY_PROFILES if name != load.memory_profile
                  for *_, result in [planned(name)]]
        fitting = next((f"--memory-profile {name} fits (its peak: {human(p.peak)})" for name, p in others
                        if not isinstance(p, str) and p.fits), "no memory profile fits this device")
        raise MemoryPlanError(f"{_over(chosen)}; {fitting}")
    tried = []
    for name in MEMORY_PROFILES:
        chosen_load, chosen_engine, chosen = planned(name)
        if not isinstance(chosen, str) and chosen.fits:
            if tried:
                log.info("--memory-profile auto: %s (%s)", name, "; ".join(tried))
            return chosen_load, chosen_engine, chosen
        tried.append(f"{name}: {chosen}" if isinstance(chosen, str) else
                     f"{name} needs {human(chosen.peak)} ({chosen.worst}, {_stage(chosen)})"
                     + ("" if chosen.host_fits else f" and {human(chosen.host)} of host memory, over the "
                                                    f"{human(chosen.host_budget)} available"))
    raise MemoryPlanError(f"no memory profile fits {device} ({_usable(budget, source)}): " + "; ".join(tried))


def _stage(plan: MemoryPlan) -> str:
    stages = plan.peaks[plan.worst]
    return max(stages, key=stages.get)


def _usable(budget: int | None, source: str) -> str:
    return f"{human(int(budget * (1 - RESERVE)))} usable of {human(budget)}, {source}"


def _over(plan: MemoryPlan) -> str:
    if not plan.host_fits:
        return (f"the memory plan of --memory-profile {plan.profile} keeps {human(plan.host)} of weights in host "
                f"memory, over the {human(plan.host_budget)} available")
    return (f"the memory plan of --memory-profile {plan.profile} needs {human(plan.peak)} at its peak "
            f"({plan.worst}, {_stage(plan)}) on {plan.device}, over the {_usable(plan.budget, plan.budget_source)}")

