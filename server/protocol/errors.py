"""Errors in the Runware shape: the `ErrorItem` every transport sends, and the exceptions that carry one.

An exception raised anywhere below the transports carries its data (code, message, parameter, HTTP status);
each transport turns it into its wire form in one place (`transport/errors.py`). A store that cannot be
reached or is full raises `StoreUnavailable` / `StorageFull` (plain exceptions, defined here so that the
stores, below the protocol's users, can raise what the protocol answers with).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

DOCS_URL = "https://runware.ai/docs/models/kandinsky-5-0-image-lite"  # the model's API page


class StoreUnavailable(Exception):
    """A store (the task database, the image store) cannot be reached; the message says why. The task at hand
    fails with it (serviceUnavailable)."""


class StorageFull(StoreUnavailable):
    """A write failed because the disk (or the file system's quota) is full; the task fails with
    storageFull (503) rather than a generic server error."""


class SchemaError(Exception):
    """The database holds a schema this version cannot use (one from a newer k5serve)."""


class ErrorItem(BaseModel):
    """One entry of an `errors` array. `taskUUID` is on every task error and absent on auth errors."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str
    parameter: str | None = None
    type: str | None = None
    taskType: str | None = None
    taskUUID: str | None = None
    documentation: str | None = None
    allowedValues: list[Any] | None = None
    min: float | int | None = None
    max: float | int | None = None

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class TaskError(Exception):
    """Raised anywhere a task or a request fails; carries its data: the Runware-shaped error item (code,
    message, parameter, the task's ids) and the HTTP status. Transports turn it into their wire form in one
    place each (`transport.errors`)."""

    def __init__(self, item: ErrorItem, http_status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(item.message)
        self.item = item
        self.http_status = http_status
        self.headers = headers  # what an HTTP answer adds (Retry-After, Allow)

    @property
    def code(self) -> str:
        return self.item.code

    @property
    def parameter(self) -> str | None:
        return self.item.parameter


def request_error(code: str, message: str, status: int = 400, *, parameter: str | None = None,
                  headers: dict[str, str] | None = None, **extra: Any) -> TaskError:
    """An error of the request as a whole (its body, its key, its path), not of one of its tasks."""
    return TaskError(ErrorItem(code=code, message=message, parameter=parameter, **extra), status, headers)


def error_code(prefix: str, *names: str) -> str:
    """Runware's error codes are camelCase: ("invalid", "webhookURL") -> "invalidWebhookURL",
    ("invalid", "lora", "weight") -> "invalidLoraWeight"."""
    return prefix + "".join(name[:1].upper() + name[1:] for name in names)


def task_error(
    code: str,
    message: str,
    *,
    parameter: str | None = None,
    task_type: str | None = None,
    task_uuid: str | None = None,
    http_status: int = 400,
    **extra: Any,
) -> TaskError:
    doc = f"{DOCS_URL}#request-{parameter.split('.')[0].split('[')[0].lower()}" if parameter else None
    item = ErrorItem(
        code=code,
        message=message,
        parameter=parameter,
        taskType=task_type,
        taskUUID=task_uuid,
        documentation=doc,
        **extra,
    )
    return TaskError(item, http_status)


def store_error(exc: Exception, *, task_type: str | None, task_uuid: str | None, doing: str = "") -> TaskError:
    """A store that failed (StoreUnavailable and its kinds) as the task's 503: `storageFull` when a disk is
    full, else `serviceUnavailable`; the message says what failed (`doing`, e.g. "Storing the result failed: ")
    and that a retry may work."""
    text = str(exc) or type(exc).__name__
    code = "storageFull" if isinstance(exc, StorageFull) else "serviceUnavailable"
    message = f"{doing}{text}; retry later." if doing else f"{text[0].upper()}{text[1:]}; retry later."
    return task_error(code, message, task_type=task_type, task_uuid=task_uuid, http_status=503)


MISSING_KEY = "Missing API key: send Authorization: Bearer <key>, or an authentication task first."


def invalid_api_key(message: str = "Invalid API key. Get one at https://my.runware.ai/signup") -> TaskError:
    """The auth failure every client recognises (401): taskType "authentication" and no taskUUID."""
    return TaskError(ErrorItem(code="invalidApiKey", message=message, parameter="apiKey", taskType="authentication"),
                     401)
