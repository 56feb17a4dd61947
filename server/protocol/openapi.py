"""The OpenAPI document at `/openapi.json`, from the same pydantic models that validate the tasks.

`POST /v1` reads its body itself (bounded, authenticated before it is read in full), so FastAPI cannot see
what it takes; this module describes it: an array of task objects told apart by `taskType`, answered by
`{data, errors}` with the status codes the server uses. The other routes get their answers described too,
so schema-driven tools (schemathesis, client generators) see the whole API.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from .models import MODEL_ID, TASK_MODELS, TaskResponse, task_type_of

REF = "#/components/schemas/{model}"

# Every status `POST /v1` answers with, and when.
V1_STATUSES = {
    "200": "Results (and any per-task errors) in task order; async tasks are acknowledged",
    "400": "Invalid JSON, an invalid body, or every task failed validation",
    "401": "No valid API key (invalidApiKey)",
    "404": "getResponse for an unknown or expired task (taskFailedOrNotFound)",
    "409": "A taskUUID that was already used (conflictTaskUUID)",
    "413": "The body is larger than the server accepts (payloadTooLarge)",
    "429": "The generation queue is full, or the caller has too many tasks in flight (rateLimitExceeded); see "
           "Retry-After",
    "500": "A generation failed (inferenceError)",
    "503": "The model is loading (modelNotReady), the server is shutting down or a store is unreachable "
           "(serviceUnavailable), or a disk is full (storageFull)",
}

EXAMPLE = [{"taskType": "imageInference", "taskUUID": "6bb2cc2c-32ed-46fc-875c-ed8935da82b4", "model": MODEL_ID,
            "positivePrompt": "a red fox in the snow", "width": 1024, "height": 1024, "steps": 10,
            "deliveryMethod": "async"}]


class Readiness(BaseModel):
    """/ready (and /health, which adds `status`); device and queue fields appear once the model has loaded."""

    model_config = ConfigDict(extra="allow")

    ready: bool
    model: Literal["loading", "loaded", "error"]
    uptimeSeconds: float
    reasons: list[str] | None = None
    workerAlive: bool | None = None
    queue: int | None = None
    queueLimit: int | None = None


class Health(Readiness):
    status: Literal["ok", "error"]


class ActiveTaskRow(BaseModel):
    id: str = Field(description="the first 8 characters of the taskUUID")
    status: Literal["queued", "running"]
    position: int | None = Field(None, description="place among the queued tasks, from 1")
    step: int
    steps: int
    width: int
    height: int
    numberResults: int
    seconds: float = Field(description="since the task was queued")
    tenant: str | None = Field(None, description="whose task it is (in an admin's listing only)")


class TaskListing(BaseModel):
    """`GET /tasks`: this front-end's queued and running imageInference tasks, in submission order."""

    tasks: list[ActiveTaskRow]
    running: int
    queued: int
    queueLimit: int | None
    imagesGenerated: int
    tasksCompleted: int
    tasksFailed: int


class UsageRow(BaseModel):
    tenant: str
    tasks: int = Field(description="imageInference tasks finished (succeeded or failed)")
    images: int
    failures: int
    generationSeconds: float = Field(description="worker time")
    costUSD: float = Field(description="at --price-per-gpu-hour, as includeCost computes it")


class UsageListing(BaseModel):
    """`GET /usage`: per tenant, what the tasks that finished since `since` used."""

    since: float
    until: float
    tenants: list[UsageRow]


def _json(ref: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model=ref)}}}}


def build(app: FastAPI, max_tasks: int) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    models = [(m, "validation") for m in TASK_MODELS] + [(m, "serialization") for m in (TaskResponse, Readiness,
                                                                                         Health, TaskListing,
                                                                                         UsageListing)]
    _, defs = models_json_schema(models, ref_template=REF)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs["$defs"])
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)

    paths = schema["paths"]
    tasks = {"oneOf": [{"$ref": REF.format(model=m.__name__)} for m in TASK_MODELS],
             "discriminator": {"propertyName": "taskType", "mapping": {
                 task_type_of(m): REF.format(model=m.__name__)
                 for m in TASK_MODELS}}}
    paths["/v1"]["post"] |= {
        "summary": "Run Runware tasks",
        "description": "A JSON array of tasks (at most the server's --max-tasks-per-request). Authenticate with "
                       "`Authorization: Bearer <key>` or an `authentication` task first. The same tasks go over "
                       "the WebSocket at `/v1`, one array per frame.",
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"type": "array", "minItems": 1, "maxItems": max_tasks, "items": tasks},
            "example": EXAMPLE}}},
        "responses": {code: _json("TaskResponse", text) for code, text in V1_STATUSES.items()},
    }
    image = paths["/image/{name}"]["get"]
    image["responses"] = {
        "200": {"description": "The image, until its TTL runs out",
                "content": {mime: {"schema": {"type": "string", "format": "binary"}}
                            for mime in ("image/jpeg", "image/png", "image/webp")}},
        "404": _json("TaskResponse", "No such image, or it has expired (imageNotFound)"),
    }
    paths["/health"]["get"]["responses"] = {
        "200": _json("Health", "Alive: the model is loading or loaded"),
        "503": _json("Health", "Only a restart helps: the model failed to load or the worker died"),
    }
    paths["/ready"]["get"]["responses"] = {
        "200": _json("Readiness", "Ready for work"),
        "503": _json("Readiness", "Not ready; `reasons` says why"),
    }
    paths["/tasks"]["get"] |= {
        "summary": "Tasks queued and running",
        "description": "What this front-end is generating: each task by the first 8 characters of its taskUUID "
                       "(whole UUIDs read results, so they are not listed), with its step or its place in the "
                       "queue. Keyed like POST /v1: `Authorization: Bearer <key>`.",
        "responses": {"200": _json("TaskListing", "The tasks, oldest first, and counts since start-up"),
                      "401": _json("TaskResponse", "No valid API key (invalidApiKey)")},
    }
    paths["/usage"]["get"] |= {
        "summary": "Usage per tenant",
        "description": "Per tenant, the imageInference tasks that finished since `since` (a Unix time or an ISO "
                       "8601 date or time; default: the last 24 hours): tasks, images, failures, generation "
                       "seconds and cost. A tenant sees its own, an admin every tenant's. Keyed like POST /v1.",
        "responses": {"200": _json("UsageListing", "Usage per tenant"),
                      "400": _json("TaskResponse", "A `since` that is neither form (invalidSince)"),
                      "401": _json("TaskResponse", "No valid API key (invalidApiKey)")},
    }
    paths["/metrics"]["get"]["responses"] = {
        "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
    }
    return schema


def install(app: FastAPI, max_tasks: int) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, max_tasks)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
