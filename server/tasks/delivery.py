"""What happens to a finished imageInference: its images stored, its record written, its webhook and upload
queued, its metrics counted, one log line. A task succeeds whole or fails whole: if any image or the
success record cannot be written, none of its images stays behind.

A result is not thrown away because the task database is away for a while: its images stay, and the record
write (then the webhook and upload) is retried until the database answers again or the result's TTL runs
out; only then does the task fail (serviceUnavailable). A full disk is not waited out: the task fails at once
with storageFull (new tasks are refused before generating while space is low, see `ops.probes.Probes`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from k5serve.pipelines.worker import GenerationOutput, GenerationSpec

from ..config import ServerConfig
from ..ops.metrics import Metrics
from ..outbound.outbox import Outbox
from ..protocol.errors import StorageFull, StoreUnavailable, TaskError, task_error
from ..protocol.models import ImageInferenceTask
from ..store import executors
from ..store.images import ImageStore, ImageStoreError, StoredImage
from ..store.task_records import ERROR, SUCCESS, TaskStore, Usage, recorded_error, webhook_error
from .result_items import describe_passes, result_items

log = logging.getLogger("k5serve.dispatcher")
T = TypeVar("T")

RETRY_DELAYS = (0.5, 5.0)  # first and longest wait between retries of a write the database did not take


class Delivery:
    def __init__(self, config: ServerConfig, images: ImageStore, tasks: TaskStore, outbox: Outbox | None = None,
                 metrics: Metrics | None = None):
        self.config = config
        self.images = images
        self.tasks = tasks
        self.outbox = outbox
        self.metrics = metrics
        self._later: set[asyncio.Task] = set()  # failures recorded once a full disk has room again

    def ttl(self, task: ImageInferenceTask) -> int:
        """Seconds a task's images and record are kept: its own `ttl`, else the operator's default."""
        return task.ttl if task.ttl is not None else self.config.image_ttl

    async def succeed(self, task: ImageInferenceTask, spec: GenerationSpec, output: GenerationOutput,
                      base_url: str, caller: str | None = None) -> list[dict[str, Any]]:
        """Store the images, record success, queue the webhook and upload; -> the task's result items."""
        stored: list[StoredImage] = []
        try:
            results = await executors.images(self._store, task, output, base_url, stored)
            items = [item for item, _, _ in results]
            expires_at = time.time() + self.ttl(task)
            written = await self._retrying(task, "its result", expires_at, self.tasks.update, task.taskUUID,
                                           status=SUCCESS, step=spec.steps, total_steps=spec.steps, items=items,
                                           expires_at=expires_at)
            if not written and not await self._took(task, lambda r: r.status == SUCCESS and r.items == items):
                raise task_error("inferenceError", "This task was recorded as failed before its result could be "
                                 "stored (its front-end was taken for gone); run it again.", task_type=task.taskType,
                                 task_uuid=task.taskUUID, http_status=500)
        except BaseException:
            await executors.images(self._remove, stored)  # the task fails whole: none of its images stays behind
            raise
        try:  # the task has succeeded: a failure from here on is logged, it does not undo the success
            if self.outbox is not None:
                for item, data, mime in results:
                    if task.webhookURL:
                        await self._retrying(task, "its webhook", expires_at, self.outbox.enqueue_webhook,
                                             task.webhookURL, {"data": [item]}, task.taskUUID)
                    if task.uploadEndpoint:
                        await self._retrying(task, "its upload", expires_at, self.outbox.enqueue_upload,
                                             task.uploadEndpoint, data, mime, task.taskUUID)
        except Exception:  # noqa: BLE001 - e.g. the outbox database is on a full disk
            log.exception("queueing the webhook/upload of task %s failed; its results are stored", task.taskUUID)
        if self.metrics is not None:
            self.metrics.generation_done(output)
        await self._used(Usage(task.taskUUID, caller, time.time(), False, len(output.images), output.seconds,
                               output.seconds * self.config.price_per_gpu_hour / 3600))
        log.info("task %s done: %d image(s) %dx%d, %d steps, %.2f s, %s, worker %s", task.taskUUID, len(items),
                 output.width, output.height, spec.steps, output.seconds, describe_passes(output.cache_stats),
                 output.worker or "?")
        return items

    async def fail(self, task: ImageInferenceTask, err: TaskError, worker: str = "", caller: str | None = None) -> None:
        """Record the task's error (with its HTTP status, kept for getResponse, never sent) and queue its
        webhook, retried like a result while the database is away. A task whose record is final already (failed
        by another front-end, which sent the webhook) is left as it is."""
        recorded = recorded_error(err.item.wire(), err.http_status)
        expires_at = time.time() + self.ttl(task)
        self._failed(task, err, worker)
        await self._used(Usage(task.taskUUID, caller, time.time(), True, 0, 0.0, 0.0))
        try:
            await self._record_failure(task, recorded, expires_at)
        except StorageFull as exc:  # the answer goes out now; the record is written once there is room
            log.warning("task %s: recording its failure: %s; retried until there is room", task.taskUUID, exc)
            job = asyncio.ensure_future(self._record_failure(task, recorded, expires_at, full_too=True))
            self._later.add(job)
            job.add_done_callback(self._later.discard)

    async def _record_failure(self, task: ImageInferenceTask, recorded: dict, expires_at: float,
                              full_too: bool = False) -> None:
        """Write the failure (retried as `_retrying` says), then queue its webhook if the write was ours. In the
        background (`full_too`), a failure to write by the deadline is logged."""
        try:
            written = await self._retrying(task, "its failure", expires_at, self.tasks.update, task.taskUUID,
                                           status=ERROR, errors=[recorded], expires_at=expires_at, full_too=full_too)
        except StoreUnavailable as exc:
            if not full_too:
                raise
            log.error("task %s: its failure could not be recorded before its TTL ran out: %s", task.taskUUID, exc)
            return
        if written or await self._took(task, lambda r: r.status == ERROR and r.errors == [recorded]):
            await self._error_webhook(task, recorded, expires_at)

    async def _error_webhook(self, task: ImageInferenceTask, recorded: dict, expires_at: float) -> None:
        if task.webhookURL and self.outbox is not None:
            try:
                await self._retrying(task, "its webhook", expires_at, self.outbox.enqueue_webhook, task.webhookURL,
                                     webhook_error(recorded), task.taskUUID)
            except StoreUnavailable as exc:
                log.error("task %s: its error webhook could not be queued: %s", task.taskUUID, exc)

    async def _took(self, task: ImageInferenceTask, ours) -> bool:
        """After an update that changed nothing: whether the record holds our write all the same (a retry
        after a write whose answer was lost) rather than another front-end's."""
        try:
            record = await executors.database(self.tasks.get, task.taskUUID)
        except StoreUnavailable:
            return False
        return record is not None and ours(record)

    def fail_now(self, task: ImageInferenceTask, err: TaskError, worker: str = "", caller: str | None = None) -> None:
        """`fail` in one try, on this thread (at shutdown, when there is no time to wait for the database)."""
        recorded = recorded_error(err.item.wire(), err.http_status)
        try:
            if self.tasks.update(task.taskUUID, status=ERROR, errors=[recorded],
                                 expires_at=time.time() + self.ttl(task)) and task.webhookURL and self.outbox:
                self.outbox.enqueue_webhook(task.webhookURL, webhook_error(recorded), task.taskUUID)
            self.tasks.add_usage(Usage(task.taskUUID, caller, time.time(), True, 0, 0.0, 0.0))
        except StoreUnavailable as exc:
            log.warning("recording the failure of task %s: %s", task.taskUUID, exc)
        self._failed(task, err, worker)

    async def _used(self, usage: Usage) -> None:
        """Into the usage ledger and the tenant's metrics. A ledger the database does not take is logged: the
        task's own outcome does not depend on it."""
        if self.metrics is not None:
            self.metrics.tenant_used(usage.caller or "", usage.failed, usage.images, usage.seconds, usage.cost)
        try:
            await executors.database(self.tasks.add_usage, usage)
        except StoreUnavailable as exc:
            log.warning("task %s: its usage could not be recorded: %s", usage.task_uuid, exc)

    def _failed(self, task: ImageInferenceTask, err: TaskError, worker: str) -> None:
        if self.metrics is not None:
            self.metrics.generation_failed(worker)
        log.warning("task %s failed: %s, worker %s", task.taskUUID, err.item.message, worker or "?")

    async def _retrying(self, task: ImageInferenceTask, what: str, deadline: float, call: Callable[..., T],
                        *args: Any, full_too: bool = False, **kwargs: Any) -> T:
        """`call` on the database's threads, again and again while the database is unavailable (and, with
        `full_too`, while a disk is full), until it goes through or `deadline` (wall-clock) passes; then the last
        error is raised."""
        delay, first = RETRY_DELAYS[0], True
        while True:
            try:
                return await executors.database(call, *args, **kwargs)
            except StorageFull:
                if not full_too or time.time() + delay > deadline:
                    raise
            except StoreUnavailable as exc:
                if isinstance(exc, ImageStoreError) or time.time() + delay > deadline:
                    raise
                if first:
                    log.warning("task %s: writing %s: %s; kept, and retried until the database answers", task.taskUUID,
                                what, exc)
                    first = False
            await asyncio.sleep(delay)
            delay = min(RETRY_DELAYS[1], delay * 2)

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
