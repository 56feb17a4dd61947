"""The typed objects that cross the worker interface.

The server validates a request once and builds a `GenerationSpec`; the worker trusts it. The worker
answers with a `GenerationOutput`. Both are plain data (images as PIL), so a worker can live in another
process or on another machine (Ray Serve) without the server changing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from PIL import Image


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


# Called from the worker as steps finish: (step_done, total_steps).
ProgressCallback = Callable[[int, int], None]
