"""The typed objects that cross the worker interface.

The server validates a request once and builds a `GenerationSpec`; the worker trusts it. The worker
answers with a `GenerationOutput`. Both are plain data (images as PIL), so a worker can live in another
process or on another machine (Ray Serve) without the server changing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from k5serve.accel import StepCacheConfig


@dataclass(frozen=True)
class GenerationSpec:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int  # image i uses seed + i
    steps: int = 20
    guidance_scale: float = 7.0
    scheduler: str | None = None  # a Runware scheduler name; None = the model's default (FlowMatch Euler)
    num_images: int = 1
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA model id, weight), applied together
    init_image: Image.Image | None = None  # image-to-image on the T2I model, already at width x height
    strength: float = 0.8  # how far into the schedule init_image is noised (1 = all the way)
    reference_image: Image.Image | None = None  # instruction editing on the I2I model, at width x height
    cache: StepCacheConfig | None = None  # step caching (acceleratorOptions); None = every pass computed
    check_content: bool = False  # run the safety classifier on every output image
    task_id: str = ""  # for logs only

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    seeds: list[int]
    width: int
    height: int
    seconds: float  # wall time the accelerator was busy with this job (queue wait excluded)
    step_seconds: list[float] = field(default_factory=list)
    cache_stats: dict | None = None  # transformer passes computed / reused per CFG branch (CacheStats.as_dict)
    nsfw: list[bool] | None = None  # per image, when check_content asked for it
    nsfw_scores: list[float] | None = None  # the classifier's NSFW probability per image
    queue_seconds: float = 0.0  # time the job waited in the worker's queue


class InvalidInput(Exception):
    """A request the worker cannot serve as asked (e.g. an unknown LoRA); fails its task with `code`."""

    def __init__(self, message: str, *, code: str, parameter: str | None = None):
        super().__init__(message)
        self.code = code
        self.parameter = parameter


# Called from the worker as steps finish: (step_done, total_steps).
ProgressCallback = Callable[[int, int], None]
