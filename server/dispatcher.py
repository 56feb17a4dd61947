"""The serving logic behind every transport: Runware tasks in, Runware items out.

Transports (HTTP, WebSocket) parse frames, authenticate and hand tasks here. Each task is validated once,
at this edge, into a typed object. An imageInference gets one durable record (`TaskStore`) and runs as
its own asyncio job that outlives the request that started it: sync callers await the job, async
callers get an acknowledgement and poll `getResponse`, webhooks and uploads go to the outbox. Generation
goes through the `Worker` interface. A failing task fails alone.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from k5serve.accel import StepCacheConfig, resolve_window
from k5serve.logcontext import current_task
from k5serve.pipelines.spec import GenerationOutput, GenerationSpec, InvalidInput
from k5serve.pipelines.worker import GenerationError, QueueFull, Worker

from .config import ServerConfig
from .encoding import encode
from .images import ImageInputError, Limits, decode, load_image_bytes, prepare
from .metrics import Metrics
from .outbound import OutboundURLError, Outbox, check_url
from .protocol import (
    ALLOWED_SIZES,
    MAX_RANDOM_SEED,
    MODEL_ID,
    TASK_TYPES,
    ErrorItem,
    GetResponseTask,
    ImageInferenceTask,
    ImageResult,
    ImageUploadTask,
    ModelSearchTask,
    TaskError,
    task_error,
)
from .store import ImageStore, StoredImage
from .wire import encodable
from .tasks import ERROR, RUNNING, SUCCESS, TaskRecord, TaskStore
from .validation import check_task_uuid, parse_image_inference, parse_task, strip_nulls, well_formed_uuid

log = logging.getLogger("k5serve.dispatcher")

SERVER_FEATURES = frozenset({"async", "webhook", "upload"})  # served here; the worker adds its own
RUNNING_FOREVER = 365 * 86400  # a record in flight does not expire before it finishes


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
    def __init__(
        self,
        config: ServerConfig,
        worker: Worker | None,
        images: ImageStore,
        tasks: TaskStore,
        outbox: Outbox | None = None,
        metrics: Metrics | None = None,
    ):
        self.config = config
        self.metrics = metrics
        self.worker = worker  # None while the model is still loading
        self.images = images
        self.tasks = tasks
        self.outbox = outbox
        self.accepting = True  # False while shutting down
        self._jobs: set[asyncio.Task] = set()
        self._limits = Limits(
            max_bytes=config.max_image_bytes,
            max_pixels=config.max_image_pixels,
            allow_private_urls=config.allow_private_urls,
        )

    # -- entry points ---------------------------------------------------------------------------------------

    async def run(self, tasks: list[Any], *, base_url: str) -> Reply:
        """Run every task of one request concurrently; items come back in task order."""
        results = await asyncio.gather(*(self.run_one(t, base_url=base_url) for t in tasks))
        reply = Reply()
        for items, error in results:
            reply.data.extend(items)
            if error is not None:
                reply.add_error(error)
        return reply

    async def run_one(self, raw: Any, *, base_url: str) -> tuple[list[dict], TaskError | None]:
        task_uuid = raw.get("taskUUID") if isinstance(raw, dict) else None
        task_type = raw.get("taskType") if isinstance(raw, dict) else None
        # Every log line about this task (here, in jobs it starts, in the worker) carries its taskUUID.
        current_task.set(task_uuid if well_formed_uuid(task_uuid) else None)  # never a client's free text
        try:
            items, error = await self._task(raw, base_url), None
        except TaskError as err:
            items, error = [], err
        except Exception:  # noqa: BLE001 - a bug must fail its task, not the connection
            log.exception("task failed unexpectedly")
            items, error = [], task_error(
                "internalServerError", "Internal server error while handling this task.",
                task_type=task_type if isinstance(task_type, str) else None,
                task_uuid=task_uuid if isinstance(task_uuid, str) else None, http_status=500,
            )
        if self.metrics is not None:
            self.metrics.task_answered(task_type, error.item.code if error is not None else None)
        return items, error

    async def drain(self, timeout: float) -> int:
        """Stop taking tasks and wait for jobs in flight; returns how many were still running."""
        self.accepting = False
        pending = set(self._jobs)
        if pending:
            _, still = await asyncio.wait(pending, timeout=timeout)
            for job in still:
                job.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
            return len(still)
        return 0

    # -- task types -----------------------------------------------------------------------------------------

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
        raw = strip_nulls(raw)  # `null` counts as absent, as for imageInference
        if task_type == "getResponse":
            return await self._get_response(parse_task(GetResponseTask, raw, task_uuid).taskUUID)
        if task_type == "imageUpload":
            return await self._image_upload(parse_task(ImageUploadTask, raw, task_uuid), base_url)
        if task_type == "modelSearch":
            return [_model_search(parse_task(ModelSearchTask, raw, task_uuid))]
        raise task_error(
            "unsupportedTaskType",
            f"Task type {_echo(task_type)}is not supported by this server; it serves "
            + ", ".join(TASK_TYPES[:4]) + ".",
            parameter="taskType",
            task_type=task_type,
            task_uuid=task_uuid,
            allowedValues=list(TASK_TYPES),
        )

    async def _image_inference(self, raw: dict, base_url: str) -> list[dict]:
        worker = self.worker
        features = SERVER_FEATURES | (worker.features if worker is not None else frozenset())
        task = parse_image_inference(raw, model_aliases=self.config.model_aliases, features=features)

        def fail(code: str, message: str, status: int, **extra: Any) -> TaskError:
            return task_error(code, message, task_type=task.taskType, task_uuid=task.taskUUID,
                              http_status=status, **extra)

        if not self.accepting:
            raise fail("serviceUnavailable", "The server is shutting down; retry on another instance.", 503)
        if worker is None:
            raise fail("modelNotReady", "The model is still loading; retry shortly.", 503)
        for parameter in ("webhookURL", "uploadEndpoint"):
            url = getattr(task, parameter)
            if url is not None:
                try:
                    await check_url(url, allow_private=self.config.allow_private_urls, purpose=parameter)
                except OutboundURLError as exc:
                    raise fail(f"invalid{parameter[0].upper()}{parameter[1:]}", str(exc), 400,
                               parameter=parameter) from None

        inputs = await self._image_inputs(task)
        now = time.time()
        record = TaskRecord(task.taskUUID, task.taskType, expected_items=task.numberResults,
                            created_at=now, expires_at=now + RUNNING_FOREVER)
        if not self.tasks.create(record):
            raise fail(
                "conflictTaskUUID",
                f"taskUUID {task.taskUUID} was already used; use getResponse to read its results.",
                409,
                parameter="taskUUID",
            )
        spec = to_spec(task, **inputs)
        loop = asyncio.get_running_loop()

        def on_progress(step: int, total: int) -> None:  # called from the worker thread
            update = functools.partial(self.tasks.update, task.taskUUID, status=RUNNING, step=step,
                                       total_steps=total)
            loop.call_soon_threadsafe(update)

        try:
            future = worker.submit(spec, on_progress)
        except InvalidInput as exc:
            self.tasks.delete(task.taskUUID)
            raise fail(exc.code, str(exc), 400, parameter=exc.parameter) from None
        except QueueFull as exc:
            self.tasks.delete(task.taskUUID)  # never ran: the client may retry with the same taskUUID
            raise fail("rateLimitExceeded", f"The server is busy ({exc}); retry after "
                       f"{self.config.retry_after} s.", 429) from None
        job = asyncio.ensure_future(self._finish(task, spec, future, base_url))
        self._jobs.add(job)
        job.add_done_callback(self._job_done)
        if task.deliveryMethod == "async":
            return [{"taskType": task.taskType, "taskUUID": task.taskUUID}]
        return await asyncio.shield(job)

    async def _image_inputs(self, task: ImageInferenceTask) -> dict[str, Any]:
        """Fetch, check and size the request's input image: an editing reference or an img2img seed."""
        inputs = task.inputs
        edit = [(f"inputs.referenceImages[{i}]", ref) for i, ref in enumerate(inputs.referenceImages or [])] if inputs else []
        edit += [("inputs.image", inputs.image)] if inputs and inputs.image else []
        edit += [(f"referenceImages[{i}]", ref) for i, ref in enumerate(task.referenceImages or [])]
        seed = [(p, v) for p, v in (("inputs.seedImage", inputs and inputs.seedImage), ("seedImage", task.seedImage)) if v]
        mask = "maskImage" if task.maskImage else "inputs.mask" if inputs and inputs.mask else None

        def fail(code: str, message: str, parameter: str) -> TaskError:
            return task_error(code, message, parameter=parameter, task_type=task.taskType, task_uuid=task.taskUUID)

        if mask:
            raise fail("unsupportedMaskImage", "Inpainting (a mask image) is not supported by this model.", mask)
        if len(edit) > 1:
            raise fail("invalidReferenceImages", "This model edits one reference image per task.", edit[1][0])
        if len(seed) > 1 or (edit and seed):
            raise fail("conflictImageInputs", "Give one input image: a reference image (editing) or a seedImage "
                       "(image-to-image), not both.", (seed[1] if len(seed) > 1 else seed[0])[0])
        if not edit and not seed:
            return {}
        parameter, ref = (edit or seed)[0]
        name = parameter.split("[")[0].split(".")[-1]
        code = {"seedImage": "invalidSeedImage", "referenceImages": "invalidReferenceImages"}.get(name, "invalidImage")
        size = (task.width, task.height) if task.width is not None and task.height is not None else None
        try:
            data = await load_image_bytes(ref, self.images, self._limits)
            image = await asyncio.to_thread(prepare, data, self._limits, size, ALLOWED_SIZES)
        except ImageInputError as exc:
            raise fail(code, f"Invalid value for {parameter} parameter: {exc}.", parameter) from None
        return {"reference_image" if edit else "init_image": image}

    def _job_done(self, job: asyncio.Task) -> None:
        self._jobs.discard(job)
        if not job.cancelled():
            job.exception()  # async tasks have no awaiter; their errors live in the record

    async def _finish(self, task: ImageInferenceTask, spec: GenerationSpec, future, base_url: str) -> list[dict]:
        """Await the generation, deliver, record. Runs to the end even if the requester went away."""
        try:
            try:
                output = await asyncio.wrap_future(future)
            except InvalidInput as exc:
                raise task_error(exc.code, str(exc), parameter=exc.parameter, task_type=task.taskType,
                                 task_uuid=task.taskUUID) from None
            except GenerationError as exc:
                raise task_error("inferenceError", f"Image generation failed: {exc}", task_type=task.taskType,
                                 task_uuid=task.taskUUID, http_status=500) from None
            if output.nsfw is not None and any(output.nsfw) and self.config.safety_action == "block":
                flagged = sum(output.nsfw)
                raise task_error("nsfwContentDetected", f"The safety check flagged {flagged} of "
                                 f"{len(output.nsfw)} image(s) as NSFW; this server withholds flagged results.",
                                 parameter="safety", task_type=task.taskType, task_uuid=task.taskUUID)
            stored: list[StoredImage] = []
            try:
                items, files = await asyncio.to_thread(self._deliver, task, output, base_url, stored)
                self.tasks.update(task.taskUUID, status=SUCCESS, step=spec.steps, total_steps=spec.steps,
                                  items=items, expires_at=time.time() + self._ttl(task))
            except BaseException:
                for image in stored:  # the task fails whole: none of its images stays behind
                    self.images.delete(image)
                raise
        except asyncio.CancelledError:
            future.cancel()
            self._record_error(task, task_error(
                "inferenceError", "The server shut down before this task finished; run it again.",
                task_type=task.taskType, task_uuid=task.taskUUID, http_status=503))
            raise
        except TaskError as err:
            self._record_error(task, err)
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. disk full while storing: fail this task only
            log.exception("delivering task %s failed", task.taskUUID)
            err = task_error("internalServerError", f"Storing the result failed: {type(exc).__name__}",
                             task_type=task.taskType, task_uuid=task.taskUUID, http_status=500)
            self._record_error(task, err)
            raise err from None
        if self.outbox is not None:
            for item, (data, mime) in zip(items, files):
                if task.webhookURL:
                    self.outbox.enqueue_webhook(task.webhookURL, {"data": [item]}, task.taskUUID)
                if task.uploadEndpoint:
                    self.outbox.enqueue_upload(task.uploadEndpoint, data, mime, task.taskUUID)
        if self.metrics is not None:
            self.metrics.generation_done(output)
        log.info("task %s done: %d image(s) %dx%d, %d steps, %.2f s, %s", task.taskUUID, len(items),
                 output.width, output.height, spec.steps, output.seconds, describe_passes(output.cache_stats))
        return items

    def _record_error(self, task: ImageInferenceTask, err: TaskError) -> None:
        # The HTTP status is kept with the error (not sent): a getResponse for the task answers with it too.
        self.tasks.update(task.taskUUID, status=ERROR,
                          errors=[err.item.wire() | {"status": "error", "httpStatus": err.http_status}],
                          expires_at=time.time() + self._ttl(task))
        if task.webhookURL and self.outbox is not None:
            self.outbox.enqueue_webhook(task.webhookURL, {"errors": [err.item.wire()]}, task.taskUUID)
        if self.metrics is not None:
            self.metrics.generation_failed()
        log.warning("task %s failed: %s", task.taskUUID, err.item.message)

    def _ttl(self, task: ImageInferenceTask) -> int:
        """Seconds a task's images and record are kept: its own `ttl`, else the operator's default."""
        return task.ttl if task.ttl is not None else self.config.image_ttl

    def _deliver(self, task: ImageInferenceTask, output: GenerationOutput, base_url: str,
                 stored: list[StoredImage]):
        """Encode, store and describe each image (runs in a thread: encoding is CPU work); each image stored
        is appended to `stored` at once, so the caller can remove them all if the task fails."""
        ttl = self._ttl(task)
        cost = output.seconds * self.config.price_per_gpu_hour / 3600 / len(output.images)
        url_base = (self.config.public_url or base_url).rstrip("/")
        items, files = [], []
        for index, (image, seed) in enumerate(zip(output.images, output.seeds)):
            data, ext, mime = encode(image, task.outputFormat, task.outputQuality)
            image_file = self.images.put(data, ext, ttl)
            stored.append(image_file)
            url = f"{url_base}/image/{image_file.name}"
            item = result_item(task, image_file.image_uuid, data, mime, url, seed, cost,
                               nsfw=output.nsfw[index] if output.nsfw is not None else None)
            if task.width is None:  # the size came from the input image: say what was produced
                item.update(width=output.width, height=output.height)
            items.append(item)
            files.append((data, mime))
        return items, files

    async def _get_response(self, task_uuid: str) -> list[dict]:
        """Cumulative state of an earlier task; waits up to `poll_wait` seconds for it to finish."""
        record = self.tasks.get(task_uuid)
        deadline = time.monotonic() + self.config.poll_wait
        while record is not None and not record.done and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            record = self.tasks.get(task_uuid)
        if record is None:
            raise task_error("taskFailedOrNotFound", f"No task with taskUUID {task_uuid} (unknown or expired).",
                             parameter="taskUUID", task_type="getResponse", task_uuid=task_uuid, http_status=404)
        if record.status == ERROR:
            err = dict(record.errors[0])
            status = err.pop("httpStatus", 500)  # records written before it was kept: 500
            raise TaskError(ErrorItem(**err), http_status=status)
        items = [item | {"status": "success"} for item in record.items]
        if not record.done:
            items.append({"taskType": record.task_type, "taskUUID": task_uuid, "status": "processing",
                          "progress": record.progress})
        return items

    async def _image_upload(self, task: ImageUploadTask, base_url: str) -> list[dict]:
        task_uuid = task.taskUUID
        try:
            data = await load_image_bytes(task.image, self.images, self._limits)
            decoded = await asyncio.to_thread(decode, data, self._limits)
        except ImageInputError as exc:
            raise task_error("invalidImage", f"Invalid value for image parameter: {exc}.", parameter="image",
                             task_type="imageUpload", task_uuid=task_uuid) from None
        stored = await asyncio.to_thread(self.images.put, decoded.data, decoded.ext, self.config.upload_ttl)
        url_base = (self.config.public_url or base_url).rstrip("/")
        return [{"taskType": "imageUpload", "taskUUID": task_uuid, "imageUUID": stored.image_uuid,
                 "imageURL": f"{url_base}/image/{stored.name}"}]


def _echo(value: str) -> str:
    """A client's string, quoted for a message when it is short and encodable (else nothing)."""
    return f"'{value}' " if len(value) <= 64 and encodable(value) else ""


def _model_search(task: ModelSearchTask) -> dict:
    """This server hosts one model; a search finds it when the terms match (or are absent)."""
    task_uuid = task.taskUUID
    terms = (task.search or "").lower().split()
    name = "Kandinsky 5.0 Image Lite"
    hit = all(t in f"{MODEL_ID} {name}".lower() for t in terms)
    model = {"air": MODEL_ID, "name": name, "version": "1", "category": "checkpoint",
             "architecture": "kandinsky5", "tags": ["text-to-image"], "private": False}
    results = [model] if hit else []
    return {"taskType": "modelSearch", "taskUUID": task_uuid, "results": results[task.offset:task.offset + task.limit],
            "totalResults": len(results)}


def result_item(
    task: ImageInferenceTask, image_uuid: str, data: bytes, mime: str, url: str, seed: int, cost: float,
    nsfw: bool | None = None,
) -> dict[str, Any]:
    """One Runware result item, with the fields `outputType` asks for."""
    b64 = base64.b64encode(data).decode() if {"base64Data", "dataURI"} & set(task.outputType) else None
    return ImageResult(
        taskType=task.taskType,
        taskUUID=task.taskUUID,
        imageUUID=image_uuid,
        imageURL=url if "URL" in task.outputType else None,
        imageBase64Data=b64 if "base64Data" in task.outputType else None,
        imageDataURI=f"data:{mime};base64,{b64}" if "dataURI" in task.outputType else None,
        seed=seed,
        NSFWContent=nsfw,  # only when the task asked for the safety check
        cost=round(cost, 6) if task.includeCost else None,
    ).wire()


def to_spec(task: ImageInferenceTask, *, init_image=None, reference_image=None) -> GenerationSpec:
    """The validated request, as the worker's input. A missing seed is drawn here and reported back;
    without width/height the (already sized) input image decides the size."""
    seed = task.seed if task.seed is not None else secrets.randbelow(MAX_RANDOM_SEED + 1)
    sized = init_image or reference_image
    width, height = (task.width, task.height) if sized is None else sized.size
    return GenerationSpec(
        prompt=task.positivePrompt,
        negative_prompt=task.negativePrompt or "",
        width=width,
        height=height,
        seed=seed,
        steps=task.steps,
        guidance_scale=task.CFGScale,
        scheduler=task.scheduler,
        num_images=task.numberResults,
        loras=tuple((lora.model, lora.weight) for lora in task.lora),
        init_image=init_image,
        strength=task.strength,
        reference_image=reference_image,
        cache=step_cache(task),
        check_content=task.safety_check,
        task_id=task.taskUUID,
    )


def describe_passes(stats: dict | None) -> str:
    """For the task log line: 'passes cond 12/20 uncond 12/20 computed (fbcache)'."""
    if not stats:
        return "passes unknown"
    counts = " ".join(f"{name} {b['computed']}/{b['computed'] + b['skipped']}" for name, b in stats["branches"].items())
    return f"passes {counts} computed ({stats['method'] or 'no step cache'})"


def step_cache(task: ImageInferenceTask) -> StepCacheConfig | None:
    """acceleratorOptions (validated: one method, a non-empty window) as the pipeline's cache config."""
    acc = task.acceleratorOptions
    if acc is None or not acc.any_method:
        return None
    method, threshold = (("teacache", acc.teaCacheDistance) if acc.teaCache else
                         ("fbcache", acc.fbCacheThreshold) if acc.fbCache else ("dbcache", acc.dbCacheThreshold))
    start, end = resolve_window(task.steps, acc.cacheStartStep, acc.cacheEndStep, acc.cacheStartStepPercentage,
                                acc.cacheEndStepPercentage)
    return StepCacheConfig(method=method, threshold=threshold, start_step=start, end_step=end,
                           max_consecutive=acc.cacheMaxConsecutiveSteps, skip_interval=acc.dbCacheSkipInterval)
