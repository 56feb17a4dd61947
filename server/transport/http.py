"""The REST transport: `POST /v1` with a JSON array of tasks; images at `GET /image/{imageUUID}.{ext}`.

Thin on purpose: authenticate, read a bounded body, parse JSON, hand the tasks to the dispatcher, and
map its reply onto an HTTP status. It knows nothing about torch or the pipeline.

Memory for clients without a key is bounded: a request whose `Authorization: Bearer` key is valid may send
up to `max_body_bytes`; any other body is read only up to `max_unauthenticated_bytes` unless its first
task is an `authentication` task with a valid key, and is answered 401 past that.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..protocol import wire
from ..protocol.errors import ErrorItem, invalid_api_key
from ..protocol.validation import batch_error
from ..store import executors
from ..store.images import ImageStoreError, LiveImage
from .auth import bearer

log = logging.getLogger("k5serve.http")
router = APIRouter()

MISSING_KEY = "Missing API key: send Authorization: Bearer <key>, or an authentication task first."


def _errors(status: int, *items: ErrorItem) -> wire.WireResponse:
    return wire.WireResponse({"errors": [i.wire() for i in items]}, status_code=status)


class _Refused(Exception):
    def __init__(self, response: wire.WireResponse):
        self.response = response


def _leading_key(head: bytes) -> Any:
    """The apiKey of the body's first task when that task is a complete `authentication` object, else None."""
    text = head.decode("utf-8", "ignore").lstrip()
    if not text.startswith("["):
        return None
    try:
        first, _ = json.JSONDecoder().raw_decode(text, len(text) - len(text[1:].lstrip()))
    except (ValueError, RecursionError):
        return None
    return first.get("apiKey") if isinstance(first, dict) and first.get("taskType") == "authentication" else None


async def _read_body(request: Request, trusted: bool) -> bytes:
    """The whole body, within the limits above (checked before and while reading), or _Refused."""
    config, auth = request.app.state.config, request.app.state.auth
    limit = config.max_body_bytes

    def too_large() -> _Refused:
        return _Refused(_errors(413, ErrorItem(code="payloadTooLarge", message=f"Request body exceeds {limit} bytes.")))

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large()
        chunks.append(chunk)
        if not trusted and size > config.max_unauthenticated_bytes:
            head = b"".join(chunks)
            key = _leading_key(head)
            if not auth.check(key):
                offered = key or _bearer(request)
                raise _Refused(_errors(401, invalid_api_key() if offered else invalid_api_key(MISSING_KEY)))
            trusted, chunks = True, [head]
    return b"".join(chunks)


def _bearer(request: Request) -> str | None:
    return bearer(request.headers.get("authorization", ""))


@router.post("/v1")
@router.post("/v1/", include_in_schema=False)
async def post_tasks(request: Request) -> wire.WireResponse:
    state = request.app.state
    header_key = _bearer(request)
    try:
        body = await _read_body(request, trusted=state.auth.open or state.auth.check(header_key))
    except _Refused as refused:
        return refused.response
    try:
        tasks: Any = wire.parse(body)
    except wire.InvalidJSON as exc:
        return _errors(400, ErrorItem(code="invalidJSON", message=f"Request body is not valid JSON: {exc}."))
    problem = batch_error(tasks, state.config.max_tasks_per_request)
    if problem is not None:
        return _errors(400, problem)

    # Either a Bearer header or an authentication task as the first element.
    auth_task = tasks[0] if isinstance(tasks[0], dict) and tasks[0].get("taskType") == "authentication" else None
    key = auth_task.get("apiKey") if auth_task is not None else header_key
    caller = state.auth.identify(key)
    if caller is None:
        return _errors(401, invalid_api_key() if key else invalid_api_key(MISSING_KEY))

    reply = await state.dispatcher.run(tasks, base_url=str(request.base_url), caller=caller)
    headers = {"Retry-After": str(state.config.retry_after)} if reply.status == 429 else None
    return wire.WireResponse(reply.body(), status_code=reply.status, headers=headers)


@router.get("/image/{name}")
async def get_image(name: str, request: Request):
    try:
        found = await executors.images(request.app.state.store.lookup, name)
    except ImageStoreError as exc:
        log.warning("GET /image/%s: %s", name[:64], exc.detail)
        return _errors(503, ErrorItem(code="serviceUnavailable", message=f"{exc}; try again later."))
    if found is None:
        return _errors(404, ErrorItem(code="imageNotFound", message="No such image, or it has expired."))
    headers = {
        "Cache-Control": f"private, max-age={max(0, int(found.expires_at - time.time()))}",
        "Expires": email.utils.formatdate(found.expires_at, usegmt=True),
    }
    if found.created_at is not None:  # (a file's mtime, which FileResponse would send, is its expiry)
        headers["Last-Modified"] = email.utils.formatdate(found.created_at, usegmt=True)
    if found.path is not None:
        return FileResponse(found.path, media_type=found.media_type, headers=headers)
    if found.size is not None:
        headers["Content-Length"] = str(found.size)
    return StreamingResponse(_streamed(found), media_type=found.media_type, headers=headers,
                             background=BackgroundTask(found.close))  # also when the stream never started


def _streamed(found: LiveImage):
    """The object's bytes as they come from the store (read in Starlette's thread pool), released after."""
    try:
        yield from found.chunks
    finally:
        found.close()
