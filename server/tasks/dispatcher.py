"""The serving logic behind every transport: Runware tasks in, Runware items out.

Transports (HTTP, WebSocket) parse frames, authenticate, build the request's `RequestContext` and hand
tasks here with it. The dispatcher runs the tasks of one request concurrently and routes each by `taskType`
to the handler that owns that job, a module named after it: `image_inference.ImageInference`,
`get_response.GetResponse`, `image_upload.ImageUpload`, `model_search.ModelSearch` (and
`ping`/`authentication`, answered here). Every handler is called as `handler(raw task, context)`. Each
validates its task once, at this edge. A task that fails gets its own error (a `TaskError`); the others
go on.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from k5serve.context import Caller, RequestContext, current_request
from k5serve.logcontext import current_task

from ..config import ServerConfig
from ..ops.metrics import Metrics
from ..outbound.outbox import Outbox
from ..protocol.errors import StoreUnavailable, TaskError, store_error, task_error
from ..protocol.models import TASK_TYPES
from ..protocol.validation import check_task_uuid, well_formed_uuid
from ..protocol.wire import encodable
from ..store.images import ImageStore
from ..store.task_records import TaskStore
from ..tenants import Tenants
from .admission import Admission, Connection, TenantLimits
from .delivery import Delivery
from .get_response import GetResponse
from .image_inference import ImageInference
from .image_upload import ImageUpload
from .input_images import Limits
from .model_search import ModelSearch
from .slot import ModelSlot

log = logging.getLogger("k5serve.dispatcher")

# A task handler: (the raw task, a JSON object with a string taskType; who sent it, how) -> items.
Handler = Callable[[dict[str, Any], RequestContext], Awaitable[list[dict]]]


async def ping(raw: dict[str, Any], ctx: RequestContext) -> list[dict]:
    return [{"taskType": "ping", "pong": True}]


async def authentication(raw: dict[str, Any], ctx: RequestContext) -> list[dict]:
    # The transport checked the key already; answer like Runware does.
    return [{"taskType": "authentication", "connectionSessionUUID": str(uuid.uuid4())}]


class Dispatcher:
    def __init__(
        self,
        config: ServerConfig,
        slot: ModelSlot,
        images: ImageStore,
        tasks: TaskStore,
        outbox: Outbox | None = None,
        metrics: Metrics | None = None,
        check_room: Callable[[], None] = lambda: None,
        tenants: Tenants | None = None,
    ):
        self.metrics = metrics
        self.retry_after = config.retry_after
        self.admission = Admission(config.max_tasks_per_connection, config.max_tasks_per_key)
        limits = Limits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels,
                        allow_private_urls=config.allow_private_urls)  # for every input image, whatever the task
        self.inference = ImageInference(config, slot, images, tasks, Delivery(config, images, tasks, outbox, metrics),
                                        limits, check_room,
                                        TenantLimits(tenants, config.retry_after) if tenants is not None else None)
        self.handlers: dict[str, Handler] = {
            "imageInference": self.inference,
            "getResponse": GetResponse(tasks, config.poll_wait),
            "imageUpload": ImageUpload(config, images, limits, check_room),
            "modelSearch": ModelSearch(slot),
            "authentication": authentication,
            "ping": ping,
        }
        assert tuple(self.handlers) == TASK_TYPES

    @property
    def accepting(self) -> bool:
        """False once shutdown began: new imageInference tasks are refused."""
        return self.inference.accepting

    async def run(self, tasks: list[Any], ctx: RequestContext) -> list[tuple[list[dict], TaskError | None]]:
        """Run every task of one request concurrently, each admitted for its caller (`Admission`): each task's
        items, or its error, in task order."""

        async def admitted(raw: Any) -> tuple[list[dict], TaskError | None]:
            refused = self.admit(raw, ctx.caller)
            if refused is not None:
                return [], refused
            try:
                return await self.run_one(raw, ctx)
            finally:
                self.admission.leave(ctx.caller.name)

        return list(await asyncio.gather(*(admitted(t) for t in tasks)))

    def admit(self, raw: Any, caller: Caller, connection: Connection | None = None) -> TaskError | None:
        """Take `raw` into `caller`'s tasks in flight (then `admission.leave` it once answered), or the 429 that
        refuses it (counted like any answer)."""
        why = self.admission.enter(caller.name, connection)
        if why is None:
            return None
        task_type, task_uuid = _ids(raw)
        error = task_error("rateLimitExceeded", f"Too many tasks in flight: {why}; retry after {self.retry_after} s.",
                           task_type=task_type, task_uuid=task_uuid, http_status=429, retryAfter=self.retry_after)
        if self.metrics is not None:
            self.metrics.task_answered(task_type, error.item.code)
        return error

    async def run_one(self, raw: Any, ctx: RequestContext) -> tuple[list[dict], TaskError | None]:
        task_type, task_uuid = _ids(raw)
        # Every log line about this task (here, in jobs it starts, in the worker, and the transport's after it
        # answered) carries its taskUUID, its caller and its request id. Each task runs in an asyncio task of its
        # own (the transports see to it): these stay with it, and are not reset.
        current_task.set(task_uuid if well_formed_uuid(task_uuid) else None)  # never a client's free text
        current_request.set(ctx)
        try:
            items, error = await self._route(raw)(raw, ctx), None
        except TaskError as err:
            items, error = [], err
        except StoreUnavailable as exc:  # a store is away or full: this task fails now, it does not hang
            log.warning("task failed: %s", getattr(exc, "detail", exc))
            items, error = [], store_error(exc, task_type=task_type, task_uuid=task_uuid)
        except Exception:  # noqa: BLE001 - a bug must fail its task, not the connection
            log.exception("task failed unexpectedly")
            items, error = [], task_error("internalServerError", "Internal server error while handling this task.",
                                          task_type=task_type, task_uuid=task_uuid, http_status=500)
        if self.metrics is not None:
            self.metrics.task_answered(task_type, error.item.code if error is not None else None)
        return items, error

    async def drain(self, timeout: float) -> int:
        """Stop taking tasks and wait for jobs in flight; returns how many were still running."""
        return await self.inference.drain(timeout)

    def _route(self, raw: Any) -> Handler:
        if not isinstance(raw, dict):
            raise task_error("invalidTask", "Each task must be a JSON object with a taskType.", parameter="taskType")
        task_type = raw.get("taskType")
        task_uuid = raw.get("taskUUID") if isinstance(raw.get("taskUUID"), str) else None
        if not isinstance(task_type, str) or not task_type:
            raise task_error("missingTaskType", "Missing required parameter: taskType.", parameter="taskType",
                             task_uuid=task_uuid)
        handler = self.handlers.get(task_type)
        if handler is None:
            task_uuid = check_task_uuid(raw, task_type)  # a bad taskUUID is reported first, as for any task
            raise task_error(
                "unsupportedTaskType",
                f"Task type {_echo(task_type)}is not supported by this server; it serves "
                + ", ".join(TASK_TYPES[:4]) + ".",
                parameter="taskType",
                task_type=task_type,
                task_uuid=task_uuid,
                allowedValues=list(TASK_TYPES),
            )
        return handler


def _ids(raw: Any) -> tuple[str | None, str | None]:
    """A raw task's (taskType, taskUUID) where they are strings: what the error items that answer it carry."""
    if not isinstance(raw, dict):
        return None, None
    task_type, task_uuid = raw.get("taskType"), raw.get("taskUUID")
    return (task_type if isinstance(task_type, str) else None), (task_uuid if isinstance(task_uuid, str) else None)


def _echo(value: str) -> str:
    """A client's string, quoted for a message when it is short and encodable (else nothing)."""
    return f"'{value}' " if len(value) <= 64 and encodable(value) else ""
