"""The REST transport: `POST /v1` with a JSON array of tasks; images at `GET /image/{imageUUID}.{ext}`.

Thin on purpose: read a bounded body, parse JSON, authenticate, hand the tasks to the dispatcher, and
map its reply onto an HTTP status. It knows nothing about torch or the pipeline.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse

from .encoding import MEDIA_TYPES
from .protocol import ErrorItem, invalid_api_key

log = logging.getLogger("k5serve.http")
router = APIRouter()

def _errors(status: int, *items: ErrorItem) -> JSONResponse:
    return JSONResponse({"errors": [i.wire() for i in items]}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it exceeds `limit` bytes (checked before and while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


@router.post("/v1")
@router.post("/v1/")
async def post_tasks(request: Request) -> JSONResponse:
    state = request.app.state
    limit = state.config.max_body_bytes
    body = await _read_body(request, limit)
    if body is None:
        return _errors(413, ErrorItem(code="payloadTooLarge", message=f"Request body exceeds {limit} bytes."))
    try:
        tasks: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _errors(400, ErrorItem(code="invalidJSON", message=f"Request body is not valid JSON: {exc}."))
    if not isinstance(tasks, list) or not tasks:
        return _errors(
            400,
            ErrorItem(
                code="invalidRequestBody",
                message="Request body must be a non-empty JSON array of task objects.",
                type="array",
            ),
        )

    # Either a Bearer header or an authentication task as the first element.
    auth_task = tasks[0] if isinstance(tasks[0], dict) and tasks[0].get("taskType") == "authentication" else None
    key = auth_task.get("apiKey") if auth_task is not None else _bearer(request)
    if not state.auth.check(key):
        missing = "Missing API key: send Authorization: Bearer <key>."
        return _errors(401, invalid_api_key() if key else invalid_api_key(missing))

    reply = await state.dispatcher.run(tasks, base_url=str(request.base_url))
    headers = {"Retry-After": str(state.config.retry_after)} if reply.status == 429 else None
    return JSONResponse(reply.body(), status_code=reply.status, headers=headers)


@router.get("/image/{name}")
async def get_image(name: str, request: Request):
    found = request.app.state.store.lookup(name)
    if found is None:
        return _errors(404, ErrorItem(code="imageNotFound", message="No such image, or it has expired."))
    path, expires_at = found
    headers = {
        "Cache-Control": f"private, max-age={max(0, int(expires_at - time.time()))}",
        "Expires": email.utils.formatdate(expires_at, usegmt=True),
    }
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix[1:]], headers=headers)
