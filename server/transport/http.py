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
from ..protocol.errors import MISSING_KEY, invalid_api_key, request_error
from ..protocol.validation import batch_error
from ..store import executors
from ..store.images import ImageStoreError, LiveImage
from .auth import bearer, request_context
from .errors import batch_response
from .parts import Parts, parts

log = logging.getLogger("k5serve.http")
router = APIRouter()


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


async def read_body(request: Request, app: Parts, trusted: bool) -> bytes:
    """The whole body, within the limits above (checked before and while reading), or a TaskError (413, 401)."""
    limit = app.config.max_body_bytes
    too_large = request_error("payloadTooLarge", f"Request body exceeds {limit} bytes.", 413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not trusted and size > app.config.max_unauthenticated_bytes:
            head = b"".join(chunks)
            key = _leading_key(head)
            if not app.auth.check(key):
                raise invalid_api_key() if key or _bearer(request) else invalid_api_key(MISSING_KEY)
            trusted, chunks = True, [head]
    return b"".join(chunks)


def _bearer(request: Request) -> str | None:
    return bearer(request.headers.get("authorization", ""))


def _parse_batch(body: bytes, max_tasks: int) -> list[Any]:
    try:
        tasks: Any = wire.parse(body)
    except wire.InvalidJSON as exc:
        raise request_error("invalidJSON", f"Request body is not valid JSON: {exc}.") from None
    problem = batch_error(tasks, max_tasks)
    if problem is not None:
        raise problem
    return tasks


@router.post("/v1")
@router.post("/v1/", include_in_schema=False)
async def post_tasks(request: Request) -> wire.WireResponse:
    app = parts(request)
    header_key = _bearer(request)
    body = await read_body(request, app, trusted=app.auth.open or app.auth.check(header_key))
    tasks = _parse_batch(body, app.config.max_tasks_per_request)
    # Either a Bearer header or an authentication task as the first element.
    auth_task = tasks[0] if isinstance(tasks[0], dict) and tasks[0].get("taskType") == "authentication" else None
    key = auth_task.get("apiKey") if auth_task is not None else header_key
    caller = app.auth.identify(key)
    if caller is None:
        raise invalid_api_key() if key else invalid_api_key(MISSING_KEY)
    ctx = request_context(request, caller, "http", str(request.base_url))
    return batch_response(await app.dispatcher.run(tasks, ctx), app.config.retry_after)


@router.get("/image/{name}")
async def get_image(name: str, request: Request):
    try:
        found = await executors.images(parts(request).images.lookup, name)
    except ImageStoreError as exc:
        log.warning("GET /image/%s: %s", name[:64], exc.detail)
        raise request_error("serviceUnavailable", f"{exc}; try again later.", 503) from None
    if found is None:
        raise request_error("imageNotFound", "No such image, or it has expired.", 404)
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
