"""How a worker's engine is built: where its checkpoints are, which device, which options. Plain data, no
torch, so the serving side (the command line, a front-end that starts remote replicas) can build and pass it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from k5serve.accel import AccelSettings


@dataclass(frozen=True)
class LoadConfig:
    path: Path
    device: str = "auto"  # "auto" = cuda when available, else cpu; or "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" = bfloat16 on cuda, float32 on cpu
    offload: str = "none"  # a name of OFFLOAD: where the weights live between uses (CUDA only but "none")
    text_encoder_quant: str = "none"  # a name of TEXT_ENCODER_QUANT: the Qwen2.5-VL encoder's weights
    text_encoder_offload: bool = False  # the text encoders on the GPU only while they encode (CUDA only)
    memory_profile: str = "auto"  # a name of MEMORY_PROFILES, or "auto": the fastest whose memory plan fits
    memory_budget: int | None = None  # bytes the plan must fit; None = the device's free memory at start-up
    # The PROFILE_FIELDS the operator gave (flag, environment, file), which no profile changes; None (a caller of
    # the library): every field not at its default counts as given.
    explicit: frozenset[str] | None = None


# Our names -> diffusers' AttentionBackendName values, with what each needs.
ATTENTION_BACKENDS = {
    "native": "native",  # torch's scaled_dot_product_attention, choosing its own kernel (the default)
    "math": "_native_math",  # SDPA's reference kernel (any device; slow: for checking the others)
    "cudnn": "_native_cudnn",  # SDPA forced onto cuDNN's fused attention (CUDA)
    "sdpa-flash": "_native_flash",  # SDPA forced onto its FlashAttention-2 kernel (CUDA)
    "sdpa-efficient": "_native_efficient",  # SDPA forced onto the memory-efficient kernel (CUDA)
    "flash": "flash",  # the flash-attn package (FlashAttention 2)
    "flash3": "_flash_3",  # FlashAttention 3 (flash_attn_interface, built from source; Hopper only)
    "sage": "sage",  # the sageattention package (INT8 QK, CUDA)
}
QUANTIZE = ("fp8",)
# Where weights live between uses: resident on the device, diffusers' model or sequential CPU offload, or group
# offloading of the transformer (its blocks streamed from pinned host memory; pipelines.device.place).
OFFLOAD = ("none", "model", "sequential", "group")
# The Qwen2.5-VL text encoder's weights: as loaded, torchao int8 or fp8 weight-only, bitsandbytes NF4
# (pipelines.text_encoder_quant says which library does which and why).
TEXT_ENCODER_QUANT = ("none", "int8", "fp8", "nf4")

# The memory profiles, fastest first: each is a combination of the options above (docs/performance.md, "Which
# card, which profile"). An option the operator gives explicitly overrides the profile's choice for it.
MEMORY_PROFILES: dict[str, dict[str, object]] = {
    # everything resident in the model dtype: about 30 GB of weights (40 GB cards and up)
    "full": {"offload": "none", "text_encoder_quant": "none", "fp8_storage": False},
    # the transformer resident in bfloat16, the text encoder resident in NF4 (16.6 -> 5.9 GB)
    "24gb": {"offload": "none", "text_encoder_quant": "nf4", "fp8_storage": False},
    # the transformer's weights stored in FP8 (13.3 -> 7.9 GB) and resident, the NF4 text encoder on the GPU only
    # while it encodes, the prompt cache on (64 entries) so that a repeated prompt, above all the negative one,
    # does not bring it back
    "16gb": {"offload": "none", "text_encoder_quant": "nf4", "text_encoder_offload": True, "fp8_storage": True,
             "prompt_cache": 64},
    # the same with group offloading of the transformer: its blocks streamed from host memory as they run
    "12gb": {"offload": "group", "text_encoder_quant": "nf4", "text_encoder_offload": True, "fp8_storage": True,
             "prompt_cache": 64},
}
PROFILE_FIELDS = ("offload", "text_encoder_quant", "text_encoder_offload", "fp8_storage", "prompt_cache")


def explicit_fields(given: set[str]) -> frozenset[str]:
    """The profile fields among the options the operator gave (by their dests, which are the field names)."""
    return frozenset(f for f in PROFILE_FIELDS if f in given)


@dataclass(frozen=True)
class SpeedSettings:
    """How the transformer runs (pipelines.speed checks each against the device at start-up)."""

    compile: bool = False  # torch.compile the repeated transformer blocks (regional compilation)
    warmup: bool = False  # generate once at every allowed size before the server reports ready
    attention_backend: str = "native"  # a name of speed.ATTENTION_BACKENDS
    quantize: str | None = None  # "fp8": FP8 matrix products in the transformer's linear layers (torchao)
    fp8_storage: bool = False  # transformer weights stored in FP8, computed in the model dtype (layerwise casting)
    prompt_cache: int = 256  # text-encoder outputs kept (LRU); 0 = encode every prompt


@dataclass(frozen=True)
class EngineConfig:
    i2i_path: Path | None = None  # None: no editing model
    i2i_load: str = "lazy"  # "lazy" (first editing request) or "eager" (at start-up)
    lora_dir: Path | None = None  # None: LoRA requests are refused
    max_loras: int = 8  # adapters kept loaded per pipeline (LRU)
    accel: AccelSettings = AccelSettings()  # step caching: TeaCache coefficients, DBCache Fn
    safety_path: Path | None = None  # NSFW image classifier folder; None: safety checks are refused
    safety_threshold: float = 0.5  # an image is flagged when P(unsafe) >= this
    offload: str = "none"  # the T2I pipeline's CPU offload mode; the I2I pipeline follows it
    text_encoder_offload: bool = False  # (the T2I pipeline's; the I2I pipeline shares its encoders)
    text_encoder_quant: str = "none"  # (the I2I pipeline loads its own encoder so only when not shared)
    speed: SpeedSettings = SpeedSettings()  # compile, attention kernel, FP8, prompt cache


@dataclass(frozen=True)
class WorkerConfig:
    """Where generation runs: in this process, or on Ray Serve replicas (one engine on one device each)."""

    kind: str = "local"  # "local" (a thread in this process) or "ray" (Ray Serve replicas)
    replicas: int | None = None  # ray: None = one per visible CUDA device, or 1 on CPU
    autoscale: tuple[int, int] | None = None  # ray: (min, max) replicas under Ray Serve's autoscaling
    ray_address: str | None = None  # ray: join this cluster ("auto" or host:port); None = start a local Ray
    ray_app: str = "k5serve"  # ray: the Serve application of this front-end's replicas (one per front-end)
    replica_threads: int | None = None  # ray on CPU: torch threads (and Ray CPUs) per replica; None = cores / replicas


def engine_features(config: EngineConfig) -> frozenset[str]:
    """The optional request features an engine built from `config` serves; validation refuses the others
    (before any input image is fetched)."""
    return frozenset({"image_input", "acceleration"} | ({"edit"} if config.i2i_path else set())
                     | ({"lora"} if config.lora_dir else set()) | ({"safety"} if config.safety_path else set()))
