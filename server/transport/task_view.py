"""`GET /tasks`: what this front-end is generating right now, for the queue view and the playground's progress bars.

Read-only and keyed like `POST /v1` (an `Authorization: Bearer` key where the server has keys); a tenant sees
only its own tasks, an admin every tenant's, with the tenant's name. A task is named
by the first 8 characters of its taskUUID only: the whole UUID reads a task's results (`getResponse`), so the
listing must not hand other clients' UUIDs out; a client knows its own tasks by that prefix. Prompts are not
listed either. Each front-end lists the tasks it queued (with `--database`, every front-end keeps its own queue).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from k5serve.context import Caller

from ..protocol.wire import WireResponse
from .auth import bearer_caller
from .parts import parts

router = APIRouter()

ID_LENGTH = 8  # characters of the taskUUID shown


def listing(inference, worker, caller: Caller) -> dict[str, Any]:
    """The active tasks in submission order: running ones with their step, queued ones with their place in the
    whole queue. An admin sees every tenant's tasks (with the tenant's name) and the server's counts; any other
    caller only its own tasks and its own counts."""
    now, position, rows = time.time(), 0, []
    for active in list(inference.active.values()):
        if not active.running:
            position += 1
        if not caller.sees(active.caller):
            continue
        row: dict[str, Any] = {"id": active.task_uuid[:ID_LENGTH], "status": "running" if active.running else "queued",
                               "width": active.width, "height": active.height, "numberResults": active.number_results,
                               "step": active.step, "steps": active.total or active.steps,
                               "seconds": round(now - active.submitted, 1)}
        if not active.running:
            row["position"] = position
        if caller.operator:
            row["tenant"] = active.caller
        rows.append(row)
    done = inference.finished if caller.operator else inference.finished_by.get(caller.name, {})
    return {"tasks": rows, "running": sum(r["status"] == "running" for r in rows),
            "queued": sum(r["status"] == "queued" for r in rows),
            "queueLimit": worker.max_queue if worker is not None else None,
            "imagesGenerated": done.get("images", 0), "tasksCompleted": done.get("tasks", 0),
            "tasksFailed": done.get("failed", 0)}


@router.get("/tasks")
async def tasks(request: Request) -> WireResponse:
    app = parts(request)
    return WireResponse(listing(app.dispatcher.inference, app.slot.worker, bearer_caller(request, app.auth)))
