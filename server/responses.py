"""The getResponse task: the cumulative state of an earlier task, read from its durable record."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from . import executors
from .protocol import ErrorItem, GetResponseTask, TaskError, task_error
from .tasks import ERROR, TaskStore
from .validation import parse


class GetResponse:
    def __init__(self, tasks: TaskStore, poll_wait: float):
        self.tasks = tasks
        self.poll_wait = poll_wait  # seconds to wait for an unfinished task before answering

    async def __call__(self, raw: dict[str, Any], base_url: str) -> list[dict]:
        task_uuid = parse(GetResponseTask, raw).taskUUID
        record = await executors.database(self.tasks.get, task_uuid)
        deadline = time.monotonic() + self.poll_wait
        while record is not None and not record.done and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            record = await executors.database(self.tasks.get, task_uuid)
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
