"""The imageInference task, start to end, each step once: validate, refuse what cannot run, fetch the input
image, create the durable record, queue the generation, and hand the result to `Delivery`.

The generation runs as its own asyncio job that outlives the request that started it: sync callers await
it, async callers get an acknowledgement and poll `getResponse`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from k5serve.pipelines.worker import GenerationError, GenerationSpec, InvalidInput, QueueFull

from k5serve.context import RequestContext

from ..config import ServerConfig
from ..outbound.safe_http import OutboundURLError, check_url
from ..protocol.errors import StoreUnavailable, TaskError, error_code, store_error, task_error
from ..protocol.models import ALLOWED_SIZES, ImageInferenceTask
from ..protocol.validation import FEATURES, image_input, parse_image_inference
from ..store import executors
from ..store.images import ImageStore
from ..store.task_records import TaskRecord, TaskStore
from .admission import TenantLimits
from .delivery import Delivery
from .input_images import ImageInputError, Limits, load_image_bytes, prepare
from .slot import ModelSlot
from .to_spec import input_error, to_spec

log = logging.getLogger("k5serve.dispatcher")

SERVER_FEATURES = frozenset({"async", "webhook", "upload"})  # served here; the worker adds its own
RUNNING_FOREVER = 365 * 86400  # a record in flight does not expire before it finishes


@dataclass
class ActiveTask:
    """A task this front-end has queued and not finished, for the queue view (`GET /tasks`)."""

    task_uuid: str
    width: int
    height: int
    steps: int
    number_results: int
    submitted: float  # time.time()
    caller: str = ""  # who sent it (`Caller.name`): the queue view shows a tenant only its own
    step: int = 0
    total: int = 0  # set by the first progress report (step 0 of N), when denoising starts

    @property
    def running(self) -> bool:
        return self.total > 0


class ImageInference:
    def __init__(self, config: ServerConfig, slot: ModelSlot, images: ImageStore, tasks: TaskStore,
                 delivery: Delivery, limits: Limits, check_room: Callable[[], None] = lambda: None,
                 tenant_limits: TenantLimits | None = None):
        self.config = config
        self.tenant_limits = tenant_limits  # a tenant's own max_queued / max_per_minute (tenants file)
        self.check_room = check_room  # raises StorageFull while the disk is too full to take work (ops.probes.Probes)
        self.slot = slot
        self.images = images
        self.tasks = tasks
        self.delivery = delivery
        self.accepting = True  # False while shutting down
        self._jobs: set[asyncio.Task] = set()
        self._limits = limits
        self.active: dict[str, ActiveTask] = {}  # in submission order
        self.finished = {"tasks": 0, "failed": 0, "images": 0}  # since start-up
        self.finished_by: dict[str, dict[str, int]] = {}  # the same, per caller

    async def __call__(self, raw: dict[str, Any], ctx: RequestContext) -> list[dict]:
        worker = self.slot.worker
        # Until the model has loaded, what it will serve is unknown: validate everything else, then answer
        # modelNotReady (a 503 the client retries) rather than refuse a feature it may well serve.
        features = SERVER_FEATURES | (self.slot.features if worker is not None else FEATURES)
        task = parse_image_inference(raw, model_aliases=self.config.model_aliases, features=features)

        def fail(code: str, message: str, status: int, **extra: Any) -> TaskError:
            return task_error(code, message, task_type=task.taskType, task_uuid=task.taskUUID,
                              http_status=status, **extra)

        if not self.accepting:
            raise fail("serviceUnavailable", "The server is shutting down; retry on another instance.", 503)
        if worker is None:
            if self.slot.error:
                raise fail("modelNotReady", "The model failed to load on this server (see /health); retry on "
                           "another instance.", 503)
            raise fail("modelNotReady", "The model is still loading; retry shortly.", 503)
        for parameter in ("webhookURL", "uploadEndpoint"):
            url = getattr(task, parameter)
            if url is not None:
                try:
                    await check_url(url, allow_private=self.config.allow_private_urls, purpose=parameter)
                except OutboundURLError as exc:
                    raise fail(error_code("invalid", parameter), str(exc), 400, parameter=parameter) from None
        refused = self.tenant_limits.take(ctx.caller.name) if self.tenant_limits is not None else None
        if refused is not None:
            why, wait = refused
            raise fail("rateLimitExceeded", f"Too many tasks: {why}; retry after {wait} s.", 429, retryAfter=wait)
        try:
            job = await self._start(task, worker, ctx, fail)
        except BaseException:
            if self.tenant_limits is not None:
                self.tenant_limits.release(ctx.caller.name)  # it never became a job
            raise
        if task.deliveryMethod == "async":
            return [{"taskType": task.taskType, "taskUUID": task.taskUUID}]
        return await asyncio.shield(job)

    async def _start(self, task: ImageInferenceTask, worker, ctx: RequestContext, fail) -> asyncio.Future:
        """Store the record, queue the generation, and start the job that finishes it (returned)."""
        self.check_room()  # refused before generating: a result could not be stored
        spec = to_spec(task, **await self._input_image(task))
        now = time.time()
        record = TaskRecord(task.taskUUID, task.taskType, expected_items=task.numberResults,
                            created_at=now, expires_at=now + RUNNING_FOREVER, webhook_url=task.webhookURL,
                            caller=ctx.caller.name)
        if not await executors.database(self.tasks.create, record):
            raise fail("conflictTaskUUID",
                       f"taskUUID {task.taskUUID} was already used; use getResponse to read its results.",
                       409, parameter="taskUUID")
        loop = asyncio.get_running_loop()

        def on_progress(step: int, total: int) -> None:  # called from the worker's thread
            loop.call_soon_threadsafe(self._record_progress, task.taskUUID, step, total)

        try:
            if self.tenant_limits is not None:
                ctx = self.tenant_limits.current(ctx)  # its share as the tenants file says now
            future = worker.submit(spec, on_progress, context=ctx)
            self.active[task.taskUUID] = ActiveTask(task.taskUUID, spec.width, spec.height, spec.steps,
                                                    spec.num_images, now, ctx.caller.name)
        except InvalidInput as exc:
            await executors.database(self.tasks.delete, task.taskUUID)
            raise input_error(exc, task.taskType, task.taskUUID) from None
        except QueueFull as exc:
            await executors.database(self.tasks.delete, task.taskUUID)  # never ran: the client may retry it
            raise fail("rateLimitExceeded", f"The server is busy ({exc}); retry after "
                       f"{self.config.retry_after} s.", 429) from None
        job = asyncio.ensure_future(self._finish(task, spec, future, ctx.base_url, ctx.caller.name))
        self._jobs.add(job)
        job.add_done_callback(functools.partial(self._job_done, ctx.caller.name))
        return job

    async def _input_image(self, task: ImageInferenceTask) -> dict[str, Any]:
        """Fetch, check and size the task's input image: {"reference_image" or "init_image": image} or {}."""
        given = image_input(task)
        if given is None:
            return {}
        size = (task.width, task.height) if task.width is not None and task.height is not None else None
        try:
            data = await load_image_bytes(given.ref, self.images, self._limits)
            image = await asyncio.to_thread(prepare, data, self._limits, size, ALLOWED_SIZES)
        except ImageInputError as exc:
            raise task_error(given.code, f"Invalid value for {given.parameter} parameter: {exc}.",
                             parameter=given.parameter, task_type=task.taskType, task_uuid=task.taskUUID) from None
        return {"reference_image" if given.edit else "init_image": image}

    def _record_progress(self, task_uuid: str, step: int, total: int) -> None:
        """On the loop: write the step off it (a database round trip); a lost update is only a stale percent."""
        active = self.active.get(task_uuid)
        if active is not None and step >= active.step:
            active.step, active.total = step, total
        job = asyncio.ensure_future(executors.database(self.tasks.progress, task_uuid, step, total))
        job.add_done_callback(lambda j: j.cancelled() or j.exception())  # StoreUnavailable: the next step retries

    def _count(self, caller: str, what: str, n: int = 1) -> None:
        self.finished[what] += n
        mine = self.finished_by.setdefault(caller, {"tasks": 0, "failed": 0, "images": 0})
        mine[what] += n

    def _job_done(self, caller: str, job: asyncio.Task) -> None:
        self._jobs.discard(job)
        if self.tenant_limits is not None:
            self.tenant_limits.done(caller)
        failed = job.cancelled() or job.exception() is not None  # async tasks have no awaiter: errors are in the record
        self._count(caller, "failed" if failed else "tasks")

    async def _finish(self, task: ImageInferenceTask, spec: GenerationSpec, future, base_url: str,
                      caller: str = "") -> list[dict]:
        """Await the generation, then deliver or record the failure. Runs to the end even if the requester
        went away."""
        worker = ""  # which worker failed it, when one did
        try:
            try:
                output = await asyncio.wrap_future(future)
            except InvalidInput as exc:
                worker = exc.worker
                raise input_error(exc, task.taskType, task.taskUUID) from None
            except GenerationError as exc:
                worker = exc.worker
                raise task_error("inferenceError", f"Image generation failed: {exc}", task_type=task.taskType,
                                 task_uuid=task.taskUUID, http_status=500) from None
            if output.nsfw is not None and any(output.nsfw) and self.config.safety_action == "block":
                flagged = sum(output.nsfw)
                raise task_error("nsfwContentDetected", f"The safety check flagged {flagged} of "
                                 f"{len(output.nsfw)} image(s) as NSFW; this server withholds flagged results.",
                                 parameter="safety", task_type=task.taskType, task_uuid=task.taskUUID)
            items = await self.delivery.succeed(task, spec, output, base_url, caller)
            self._count(caller, "images", len(output.images))
            return items
        except asyncio.CancelledError:
            future.cancel()
            self.delivery.fail_now(task, caller=caller, err=task_error(
                "inferenceError", "The server shut down before this task finished; run it again.",
                task_type=task.taskType, task_uuid=task.taskUUID, http_status=503))
            raise
        except TaskError as err:
            await self.delivery.fail(task, err, worker, caller)
            raise
        except StoreUnavailable as exc:  # the bucket, a full disk, the database away past the result's TTL
            log.warning("delivering task %s failed: %s", task.taskUUID, getattr(exc, "detail", exc))
            err = store_error(exc, task_type=task.taskType, task_uuid=task.taskUUID,
                              doing="Storing the result failed: ")
            await self.delivery.fail(task, err, caller=caller)
            raise err from None
        except Exception as exc:  # noqa: BLE001 - a bug: fail this task only
            log.exception("delivering task %s failed", task.taskUUID)
            err = task_error("internalServerError", f"Storing the result failed: {type(exc).__name__}",
                             task_type=task.taskType, task_uuid=task.taskUUID, http_status=500)
            await self.delivery.fail(task, err, caller=caller)
            raise err from None
        finally:
            self.active.pop(task.taskUUID, None)

    async def drain(self, timeout: float) -> int:
        """Stop taking tasks and wait for jobs in flight; returns how many were still running."""
        self.accepting = False
        pending = set(self._jobs)
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=timeout)
        for job in still:
            job.cancel()
        if still:
            await asyncio.wait(still, timeout=5)
        return len(still)
