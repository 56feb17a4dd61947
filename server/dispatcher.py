"""The serving logic behind every transport: one JSON array of tasks in, Runware items out.

Transports (HTTP now, WebSocket next) parse frames, authenticate and hand the task list here. Each task
is validated once, at this edge, into a typed object; generation goes through the `Worker` interface;
results are encoded, stored by imageUUID and turned into result items. A failing task fails alone.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipelines.spec import GenerationOutput, GenerationSpec
from pipelines.worker import GenerationError, QueueFull, Worker

from .config import ServerConfig
from .encoding import encode
from .protocol import MAX_RANDOM_SEED, ImageInferenceTask, TaskError, task_error
from .store import ImageStore
from .validation import check_task_uuid, parse_image_inference

log = logging.getLogger("k5serve.dispatcher")


@dataclass
class Reply:
    """What a batch of tasks produced; `status` is the HTTP status a REST transport should use."""

    data: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    def add_error(self, err: TaskError) -> None:
        self.errors.append(err.item.wire())
        self.statuses.append(err.http_status)

    @property
    def status(self) -> int:
        return 200 if self.data or not self.statuses else max(self.statuses)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.data or not self.errors:
            out["data"] = self.data
        if self.errors:
            out["errors"] = self.errors
        return out


class Dispatcher:
    def __init__(self, config: ServerConfig, worker: Worker | None, store: ImageStore):
        self.config = config
        self.worker = worker  # None while the model is still loading
        self.store = store
        self._active: set[str] = set()  # taskUUIDs in flight

    async def run(self, tasks: list[Any], *, base_url: str) -> Reply:
        """Run every task of one request concurrently; items come back in task order."""
        results = await asyncio.gather(*(self._run_one(t, base_url) for t in tasks))
        reply = Reply()
        for items, error in results:
            reply.data.extend(items)
            if error is not None:
                reply.add_error(error)
        return reply

    async def _run_one(self, raw: Any, base_url: str) -> tuple[list[dict], TaskError | None]:
        try:
            return await self._task(raw, base_url), None
        except TaskError as err:
            return [], err

    async def _task(self, raw: Any, base_url: str) -> list[dict]:
        if not isinstance(raw, dict):
            raise task_error("invalidTask", "Each task must be a JSON object with a taskType.", parameter="taskType")
        task_type = raw.get("taskType")
        if not isinstance(task_type, str) or not task_type:
            raise task_error(
                "missingTaskType",
                "Missing required parameter: taskType.",
                parameter="taskType",
                task_uuid=raw.get("taskUUID") if isinstance(raw.get("taskUUID"), str) else None,
            )
        if task_type == "ping":
            return [{"taskType": "ping", "pong": True}]
        if task_type == "authentication":
            # The transport checked the key already; answer like Runware does.
            return [{"taskType": "authentication", "connectionSessionUUID": str(uuid.uuid4())}]
        if task_type == "imageInference":
            return await self._image_inference(raw, base_url)
        task_uuid = check_task_uuid(raw, task_type)
        raise task_error(
            "unsupportedTaskType",
            f"Task type '{task_type}' is not supported by this server; it serves imageInference.",
            parameter="taskType",
            task_type=task_type,
            task_uuid=task_uuid,
            allowedValues=["imageInference", "authentication", "ping"],
        )

    async def _image_inference(self, raw: dict, base_url: str) -> list[dict]:
        worker = self.worker
        features = worker.features if worker is not None else frozenset()
        task = parse_image_inference(raw, model_aliases=self.config.model_aliases, features=features)
        if worker is None:
            raise task_error(
                "modelNotReady",
                "The model is still loading; retry shortly.",
                task_type=task.taskType,
                task_uuid=task.taskUUID,
                http_status=503,
            )
        if task.taskUUID in self._active:
            raise task_error(
                "conflictTaskUUID",
                f"A task with taskUUID {task.taskUUID} is already running; taskUUIDs must be unique.",
                parameter="taskUUID",
                task_type=task.taskType,
                task_uuid=task.taskUUID,
                http_status=409,
            )
        spec = to_spec(task)
        self._active.add(task.taskUUID)
        try:
            try:
                future = worker.submit(spec)
            except QueueFull as exc:
                raise task_error(
                    "rateLimitExceeded",
                    f"The server is busy ({exc}); retry after {self.config.retry_after} s.",
                    task_type=task.taskType,
                    task_uuid=task.taskUUID,
                    http_status=429,
                ) from None
            try:
                output = await asyncio.wrap_future(future)
            except GenerationError as exc:
                raise task_error(
                    "inferenceError",
                    f"Image generation failed: {exc}",
                    task_type=task.taskType,
                    task_uuid=task.taskUUID,
                    http_status=500,
                ) from None
            items = await asyncio.to_thread(self._deliver, task, output, base_url)
        finally:
            self._active.discard(task.taskUUID)
        log.info(
            "task %s done: %d image(s) %dx%d, %d steps, %.2f s",
            task.taskUUID, len(items), output.width, output.height, spec.steps, output.seconds,
        )
        return items

    def _deliver(self, task: ImageInferenceTask, output: GenerationOutput, base_url: str) -> list[dict]:
        """Encode, store and describe each image (runs in a thread: encoding is CPU work)."""
        ttl = task.ttl if task.ttl is not None else self.config.image_ttl
        cost = output.seconds * self.config.price_per_gpu_hour / 3600 / len(output.images)
        url_base = (self.config.public_url or base_url).rstrip("/")
        items = []
        for image, seed in zip(output.images, output.seeds):
            data, ext, mime = encode(image, task.outputFormat, task.outputQuality)
            stored = self.store.put(data, ext, ttl)
            url = f"{url_base}/image/{stored.name}"
            items.append(result_item(task, stored.image_uuid, data, mime, url, seed, cost))
        return items


def result_item(
    task: ImageInferenceTask, image_uuid: str, data: bytes, mime: str, url: str, seed: int, cost: float
) -> dict[str, Any]:
    """One Runware result item, with the fields `outputType` asks for."""
    item: dict[str, Any] = {"taskType": task.taskType, "taskUUID": task.taskUUID, "imageUUID": image_uuid}
    for kind in task.outputType:
        if kind == "URL":
            item["imageURL"] = url
        elif kind == "base64Data":
            item["imageBase64Data"] = base64.b64encode(data).decode()
        else:
            item["imageDataURI"] = f"data:{mime};base64," + base64.b64encode(data).decode()
    item["seed"] = seed
    if task.includeCost:
        item["cost"] = round(cost, 6)
    return item


def to_spec(task: ImageInferenceTask) -> GenerationSpec:
    """The validated request, as the worker's input. A missing seed is drawn here and reported back."""
    assert task.width is not None and task.height is not None
    seed = task.seed if task.seed is not None else secrets.randbelow(MAX_RANDOM_SEED + 1)
    return GenerationSpec(
        prompt=task.positivePrompt,
        negative_prompt=task.negativePrompt or "",
        width=task.width,
        height=task.height,
        seed=seed,
        steps=task.steps,
        guidance_scale=task.CFGScale,
        scheduler=task.scheduler,
        num_images=task.numberResults,
        task_id=task.taskUUID,
    )
