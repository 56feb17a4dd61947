"""Errors to the wire, in one place per transport: `TaskError` (code, message, parameter, HTTP status) in, a
Runware `errors` array out, as an HTTP answer (`http_error`, `batch_response`, and the app's handlers for
what fails outside a task) or as a WebSocket frame (`ws_error_frame`)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from ..protocol import wire
from ..protocol.errors import TaskError, request_error
from .openai.protocol import is_openai_path, openai_error

log = logging.getLogger("k5serve.app")


def _body(errors: tuple[TaskError, ...] | list[TaskError]) -> dict[str, Any]:
    return {"errors": [e.item.wire() for e in errors]}


# -- HTTP

def http_error(*errors: TaskError) -> wire.WireResponse:
    """One or more errors as an HTTP answer: the highest of their statuses, their headers."""
    headers: dict[str, str] = {}
    for error in errors:
        headers |= error.headers or {}
    return wire.WireResponse(_body(errors), status_code=max(e.http_status for e in errors), headers=headers or None)


def batch_response(results: list[tuple[list[dict], TaskError | None]], retry_after: int) -> wire.WireResponse:
    """The answer to a `POST /v1` batch: every task's items under `data`, every failed task's error under
    `errors`; 200 when any task produced items (or none failed), else the highest error status, with
    Retry-After on a 429 (the longest wait its refusals name, else `retry_after`)."""
    data = [item for items, _ in results for item in items]
    errors = [error for _, error in results if error is not None]
    body: dict[str, Any] = {"data": data} if data or not errors else {}
    if errors:
        body |= _body(errors)
    status = 200 if data or not errors else max(e.http_status for e in errors)
    if status != 429:
        return wire.WireResponse(body, status_code=status)
    return wire.WireResponse(body, status_code=status, headers={"Retry-After": str(retry_wait(errors, retry_after))})


def retry_wait(errors: list[TaskError], default: int) -> int:
    """The seconds a Retry-After header says for these errors: the longest wait their 429 refusals name (a
    tenant's minute), else `default` (--retry-after)."""
    return max((e.item.model_extra or {}).get("retryAfter", default) for e in errors if e.http_status == 429)


def _answer(request: Request, error: TaskError) -> wire.WireResponse:
    """In the shape of the API the path belongs to: OpenAI's under /v1/images and /v1/models, else Runware's."""
    return openai_error(error) if is_openai_path(request.url.path) else http_error(error)


async def _task_error(request: Request, exc: TaskError) -> wire.WireResponse:
    return _answer(request, exc)


async def _bad_request(request: Request, exc: RequestValidationError) -> wire.WireResponse:
    return _answer(request, request_error("invalidRequest", str(exc.errors()[0].get("msg", "invalid request"))))


async def _no_route(request: Request, exc: HTTPException) -> wire.WireResponse:
    """A path or method the server does not serve, answered in the error shape of the API it is under."""
    where = f"{getattr(request, 'method', 'WebSocket')} {request.url.path[:200]}"
    if exc.status_code == 405 and request.url.path.rstrip("/") == "/v1":
        message, code = (f"{where} is not served: send tasks as a JSON array with POST /v1, or open a WebSocket "
                         "to /v1."), "methodNotAllowed"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "another method")
        message, code = f"{where} is not served; {allowed} is.", "methodNotAllowed"
    elif exc.status_code == 404 and is_openai_path(request.url.path):
        message, code = (f"{where}: no such endpoint; the OpenAI Images API here is POST /v1/images/generations, "
                         "POST /v1/images/edits and GET /v1/models."), "notFound"
    elif exc.status_code == 404:
        message, code = (f"{where}: no such endpoint; the API is POST /v1 (and a WebSocket on /v1); /docs "
                         "describes every endpoint."), "notFound"
    else:
        message, code = str(exc.detail), "invalidRequest"
    return _answer(request, request_error(code, message, exc.status_code, headers=exc.headers))


async def _internal_error(request: Request, exc: Exception) -> wire.WireResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _answer(request, request_error("internalServerError",
                                          "Internal server error; the request was not completed.", 500))


def install_error_handlers(app: FastAPI) -> None:
    """Whatever fails outside a task's handler is answered in the Runware error shape too."""
    app.add_exception_handler(TaskError, _task_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(HTTPException, _no_route)
    app.add_exception_handler(Exception, _internal_error)


# -- WebSocket

def ws_error_frame(*errors: TaskError) -> str:
    """One or more errors as a WebSocket frame."""
    return wire.dumps(_body(errors))
