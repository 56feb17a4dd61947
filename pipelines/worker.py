"""The generation worker interface and the plain data that crosses it. No torch here.

The server validates a request once and builds a `GenerationSpec`; the worker trusts it and answers, through
`Worker.submit(spec, on_progress, context=request_context)`, with a `concurrent.futures.Future` of a
`GenerationOutput`. Both are plain data (images as PIL), so a worker can run in this process
(`local.LocalWorker`, one engine on one device) or in another process or machine (Ray Serve replicas) without
the server changing. A front-end that only routes tasks imports this module and never loads torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from k5serve.accel import StepCacheConfig
from PIL import Image

from k5serve.context import RequestContext


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
    prompt_cache: dict | None = None  # {"hits", "misses"}: prompts this job took from the prompt cache or encoded
    nsfw: list[bool] | None = None  # per image, when check_content asked for it
    nsfw_scores: list[float] | None = None  # the classifier's NSFW probability per image
    queue_seconds: float = 0.0  # time the job waited in the worker's queue
    worker: str = ""  # which worker ran it, for logs and metrics: "local", or a Ray Serve replica id


class InvalidInput(Exception):
    """A request the worker cannot serve as asked (e.g. an unknown LoRA); fails its task with `code`."""

    def __init__(self, message: str, *, code: str, parameter: str | None = None, worker: str = ""):
        super().__init__(message)
        self.code = code
        self.parameter = parameter
        self.worker = worker  # which worker refused it, when one did (for logs and metrics)


# Called from the worker as steps finish: (step_done, total_steps).
ProgressCallback = Callable[[int, int], None]


class QueueFull(Exception):
    """The worker's queue is at its limit; retry later."""


class GenerationError(Exception):
    """A generation failed; the message says why. Only its own task fails."""

    def __init__(self, message: str, *, worker: str = ""):
        super().__init__(message)
        self.worker = worker  # which worker it failed on, when known (for logs and metrics)


class Worker(ABC):
    #: optional request features this worker serves (validation refuses the others clearly)
    features: frozenset[str] = frozenset()

    @abstractmethod
    def submit(self, spec: GenerationSpec, on_progress: ProgressCallback | None = None, *,
               context: RequestContext | None = None) -> Future:
        """Queue a job; raises InvalidInput for a request it cannot serve, QueueFull when it is full. `context`
        is who asked and how (the server passes the request's; None for work no client sent): the job's log
        lines carry its caller and request id."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def queue_depth(self) -> int: ...

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @property
    def max_queue(self) -> int | None:
        """Jobs that may wait (besides the running one) before submit refuses with QueueFull; None: no limit."""
        return None

    @property
    def queue_full(self) -> bool:
        return False

    def unready(self) -> str | None:
        """Why the worker cannot take work right now although it is alive (e.g. no replica running), or None."""
        return None

    def describe(self) -> dict[str, Any]:
        return {}

    def loras(self) -> list[str]:
        """The LoRA model ids this worker can apply (its LoRA folder's files); empty without one. May read a
        folder: call it off the event loop."""
        return []

    def memory(self) -> dict[str, int]:
        """Accelerator memory in bytes ({"allocated", "peak_allocated", "reserved"}); empty off CUDA."""
        return {}
