"""What happens to a finished imageInference: its images stored, its record written, its webhook and upload
queued, its metrics counted, one log line. A task succeeds whole or fails whole: if any image or the
success record cannot be written, none of its images stays behind."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from k5serve.pipelines.worker import GenerationOutput, GenerationSpec

from .config import ServerConfig
from .metrics import Metrics
from .outbox import Outbox
from .protocol import ImageInferenceTask, TaskError
from .results import describe_passes, result_items
from .store import ImageStore, ImageStoreError, StoredImage
from .tasks import ERROR, SUCCESS, TaskStore

log = logging.getLogger("k5serve.dispatcher")


class Delivery:
    def __init__(self, config: ServerConfig, images: ImageStore, tasks: TaskStore, outbox: Outbox | None = None,
                 metrics: Metrics | None = None):
        self.config = config
        self.images = images
        self.tasks = tasks
        self.outbox = outbox
        self.metrics = metrics

    def ttl(self, task: ImageInferenceTask) -> int:
        """Seconds a task's images and record are kept: its own `ttl`, else the operator's default."""
        return task.ttl if task.ttl is not None else self.config.image_ttl

    async def succeed(self, task: ImageInferenceTask, spec: GenerationSpec, output: GenerationOutput,
                      base_url: str) -> list[dict[str, Any]]:
        """Store the images, record success, queue the webhook and upload; -> the task's result items."""
        stored: list[StoredImage] = []
        try:
            results = await asyncio.to_thread(self._store, task, output, base_url, stored)
            items = [item for item, _, _ in results]
            await asyncio.to_thread(self.tasks.update, task.taskUUID, status=SUCCESS, step=spec.steps,
                                    total_steps=spec.steps, items=items, expires_at=time.time() + self.ttl(task))
        except BaseException:
            await asyncio.to_thread(self._remove, stored)  # the task fails whole: none of its images stays behind
            raise
        try:  # the task has succeeded: a failure from here on is logged, it does not undo the success
            if self.outbox is not None:
                for item, data, mime in results:
                    if task.webhookURL:
                        self.outbox.enqueue_webhook(task.webhookURL, {"data": [item]}, task.taskUUID)
                    if task.uploadEndpoint:
                        self.outbox.enqueue_upload(task.uploadEndpoint, data, mime, task.taskUUID)
        except Exception:  # noqa: BLE001 - e.g. the outbox database is on a full disk
            log.exception("queueing the webhook/upload of task %s failed; its results are stored", task.taskUUID)
        if self.metrics is not None:
            self.metrics.generation_done(output)
        log.info("task %s done: %d image(s) %dx%d, %d steps, %.2f s, %s, worker %s", task.taskUUID, len(items),
                 output.width, output.height, spec.steps, output.seconds, describe_passes(output.cache_stats),
                 output.worker or "?")
        return items

    def fail(self, task: ImageInferenceTask, err: TaskError, worker: str = "") -> None:
        """Record the task's error (with its HTTP status, kept for getResponse, never sent) and queue its
        webhook."""
        self.tasks.update(task.taskUUID, status=ERROR,
                          errors=[err.item.wire() | {"status": "error", "httpStatus": err.http_status}],
                          expires_at=time.time() + self.ttl(task))
        if task.webhookURL and self.outbox is not None:
            self.outbox.enqueue_webhook(task.webhookURL, {"errors": [err.item.wire()]}, task.taskUUID)
        if self.metrics is not None:
            self.metrics.generation_failed(worker)
        log.warning("task %s failed: %s, worker %s", task.taskUUID, err.item.message, worker or "?")

    def _remove(self, stored: list[StoredImage]) -> None:
        for image in stored:
            try:
                self.images.delete(image)
            except (OSError, ImageStoreError) as exc:  # left for the sweep, once its TTL has passed
                log.warning("removing image %s of a failed task: %s", image.name, exc)

    def _store(self, task: ImageInferenceTask, output: GenerationOutput, base_url: str,
               stored: list[StoredImage]) -> list[tuple[dict[str, Any], bytes, str]]:
        """Encode and store each image (in a thread: encoding is CPU work); each image stored is appended to
        `stored` at once, so the caller can remove them all if the task fails."""
        ttl = self.ttl(task)

        def save(data: bytes, ext: str) -> tuple[str, str]:
            image = self.images.put(data, ext, ttl)
            stored.append(image)
            return image.image_uuid, self.images.url(image, self.config.public_url or base_url)

        return result_items(task, output, save, self.config.price_per_gpu_hour)
