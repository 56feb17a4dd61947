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
    offload: str = "none"  # "none", "model" or "sequential": diffusers' CPU offload (CUDA only)


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
