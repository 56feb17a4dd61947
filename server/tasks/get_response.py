"""The getResponse task: the cumulative state of an earlier task, read from its durable record.

A finished record never changes, so the answer for it is built once and shared: requests for the same task
that are in flight at the same time share one database read, and every request that comes while an earlier
answer is still held (waiting to be sent to a slow client, say) gets that same answer, whose frame is encoded
once (`wire.SharedItem`). A client asking for a large result many times costs one copy of it, not one per
request.

A task belongs to the caller that sent it (its record's `caller`): another tenant's taskUUID is answered
exactly as an unknown one, at once, whatever the task's state (an admin reads every tenant's tasks).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any

from k5serve.context import RequestContext

from ..protocol.errors import ErrorItem, TaskError, task_error
from ..protocol.models import GetResponseTask
from ..protocol.validation import parse
from ..protocol.wire import SharedItem
from ..store import executors
from ..store.task_records import ERROR, TaskRecord, TaskStore


class _Answer(list):
    """The success items of a finished task, shared while anyone holds them (a list subclass: weakly referable)."""

    expires_at: float
    caller: str | None


class GetResponse:
    def __init__(self, tasks: TaskStore, poll_wait: float):
        self.tasks = tasks
        self.poll_wait = poll_wait  # seconds to wait for an unfinished task before answering
        self._reads: dict[str, asyncio.Future] = {}  # taskUUID -> the read in flight
        self._answers: weakref.WeakValueDictionary[str, _Answer] = weakref.WeakValueDictionary()

    async def __call__(self, raw: dict[str, Any], ctx: RequestContext) -> list[dict]:
        task_uuid = parse(GetResponseTask, raw).taskUUID
        answer = self._answers.get(task_uuid)
        if answer is not None and answer.expires_at > time.time() and ctx.caller.sees(answer.caller):
            return answer
        record = await self._read(task_uuid)
        if record is not None and not ctx.caller.sees(record.caller):
            record = None  # another tenant's: as unknown, and as fast
        deadline = time.monotonic() + self.poll_wait
        while record is not None and not record.done and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            record = await self._read(task_uuid)
        if record is None:
            raise task_error("taskFailedOrNotFound", f"No task with taskUUID {task_uuid} (unknown or expired).",
                             parameter="taskUUID", task_type="getResponse", task_uuid=task_uuid, http_status=404)
        if record.status == ERROR:
            err = dict(record.errors[0])
            status = err.pop("httpStatus", 500)  # records written before it was kept: 500
            raise TaskError(ErrorItem(**err), http_status=status)
        if record.done:
            return self._answer(record)
        items = [item | {"status": "success"} for item in record.items]
        return items + [{"taskType": record.task_type, "taskUUID": task_uuid, "status": "processing",
                         "progress": record.progress}]

    async def _read(self, task_uuid: str) -> TaskRecord | None:
        """One database read for every request that wants this record at the same moment."""
        read = self._reads.get(task_uuid)
        if read is None:
            read = self._reads[task_uuid] = asyncio.ensure_future(executors.database(self.tasks.get, task_uuid))
            read.add_done_callback(lambda _: self._reads.pop(task_uuid, None))
        return await asyncio.shield(read)

    def _answer(self, record: TaskRecord) -> _Answer:
        answer = self._answers.get(record.task_uuid)
        if answer is None:
            answer = _Answer(SharedItem(item, status="success") for item in record.items)
            answer.expires_at = record.expires_at
            answer.caller = record.caller
            self._answers[record.task_uuid] = answer
        return answer
