"""The OpenAI Images API's routes: `POST /v1/images/generations`, `POST /v1/images/edits`, `GET /v1/models`.

Thin: authenticate (`Authorization: Bearer`, the same keys and tenants), read a bounded body, parse it into the
request model, translate it into one Runware task (`serving`) and run that through the dispatcher; answer in
OpenAI's shape, errors included (`protocol.error_body`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ...protocol import wire
from ...protocol.models import MODEL_ID
from ..auth import bearer_caller, request_context
from ..errors import retry_wait
from ..http import read_body
from ..parts import Parts, parts
from . import serving
from .protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    from_validation,
    invalid,
    responses,
)

router = APIRouter()
TASK_HEADER = "X-Task-UUID"  # the Runware taskUUID of the answer's task (getResponse reads it again)
MAX_FORM_FIELDS = 64
MAX_FIELD_BYTES = 256 * 1024  # a text field (the prompt is at most 32,000 characters)


def _body_schema(model: type, media: str, files: tuple[str, ...] = ()) -> dict[str, Any]:
    """The request body for OpenAPI: `model`'s fields, and the file fields `files` (required) of a form."""
    schema = model.model_json_schema()
    for name in files:
        schema["properties"][name] = {"type": "string", "format": "binary", "description": "The image to edit"}
        schema["required"] = [*schema.get("required", []), name]
    return {"requestBody": {"required": True, "content": {media: {"schema": schema}}}}


GENERATION_STATUSES = (400, 401, 413, 429, 500, 503)


async def _run(request: Request, app: Parts, caller, parsed, image: str | None = None) -> wire.WireResponse:
    task = serving.to_task(parsed, image)
    ctx = request_context(request, caller, "openai", str(request.base_url))
    [(items, error)] = await app.dispatcher.run([task], ctx)
    if error is not None:
        if error.http_status == 429 and "Retry-After" not in (error.headers or {}):
            error.headers = (error.headers or {}) | {"Retry-After": str(retry_wait([error], app.config.retry_after))}
        raise error
    return wire.WireResponse(serving.answer(task, items, parsed), headers={TASK_HEADER: task["taskUUID"]})


@router.post("/v1/images/generations", openapi_extra=_body_schema(ImageGenerationRequest, "application/json"),
             summary="Generate images (OpenAI Images API)", tags=["OpenAI"],
             responses=responses(ImagesResponse, GENERATION_STATUSES))
async def generations(request: Request) -> wire.WireResponse:
    app = parts(request)
    caller = bearer_caller(request, app.auth)
    body = await read_body(request, app, trusted=True)
    try:
        raw = wire.parse(body)
    except wire.InvalidJSON as exc:
        raise invalid(None, f"The body is not valid JSON: {exc}.", "invalid_json") from None
    if not isinstance(raw, dict):
        raise invalid(None, "The body must be a JSON object.", "invalid_json")
    try:
        parsed = ImageGenerationRequest.model_validate(raw, strict=True)  # JSON: its own types (n: true is no 1)
    except ValidationError as exc:
        raise from_validation(exc) from None
    return await _run(request, app, caller, parsed)


async def _form(request: Request, body: bytes):
    """The multipart form of `body` (already read within the size limit)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise invalid(None, "Send the edit as multipart/form-data, the image in the field image.", "invalid_body")

    async def once():
        yield body
        yield b""

    try:
        return await MultiPartParser(request.headers, once(), max_files=8, max_fields=MAX_FORM_FIELDS,
                                     max_part_size=MAX_FIELD_BYTES).parse()
    except MultiPartException as exc:
        raise invalid(None, f"The multipart body cannot be read: {exc.message.rstrip('.')}.", "invalid_body") from None


def _number(value: str, kind: type) -> Any:
    try:
        return kind(value)
    except ValueError:
        return value  # the task's validation names it


@router.post("/v1/images/edits", openapi_extra=_body_schema(ImageEditRequest, "multipart/form-data", ("image",)),
             summary="Edit an image (OpenAI Images API)", tags=["OpenAI"],
             responses=responses(ImagesResponse, GENERATION_STATUSES))
async def edits(request: Request) -> wire.WireResponse:
    app = parts(request)
    caller = bearer_caller(request, app.auth)
    form = await _form(request, await read_body(request, app, trusted=True))
    try:
        if form.getlist("mask"):
            raise invalid("mask", "A mask is not supported: this model edits the whole image, it does not inpaint.",
                          "unsupported_mask")
        files = [f for name in ("image", "image[]") for f in form.getlist(name)]
        if not files or not all(isinstance(f, UploadFile) for f in files):
            raise invalid("image", "Missing required parameter: 'image' (the image to edit, as a file).",
                          "missing_required_parameter")
        if len(files) > 1:
            raise invalid("image", f"{len(files)} images were sent; this model edits one image at a time.")
        fields: dict[str, Any] = {}
        for name, value in form.multi_items():
            if name in ("image", "image[]"):
                continue
            if isinstance(value, UploadFile) or name in fields:
                raise invalid(name, f"'{name}' must be sent once, as a text field.")
            fields[name] = value
        for name, kind in (("seed", int), ("num_inference_steps", int), ("guidance_scale", float)):
            if name in fields:
                fields[name] = _number(fields[name], kind)
        try:
            parsed = ImageEditRequest.model_validate(fields)
        except ValidationError as exc:
            raise from_validation(exc) from None
        image = serving.data_uri(await files[0].read(), files[0].content_type)
    finally:
        await form.close()
    return await _run(request, app, caller, parsed, image)


@router.get("/v1/models", summary="The model (OpenAI's list shape)", tags=["OpenAI"],
            responses=responses(ModelList, (401,)))
async def models(request: Request) -> wire.WireResponse:
    app = parts(request)
    bearer_caller(request, app.auth)
    names = (MODEL_ID, *app.config.model_aliases)
    return wire.WireResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": int(app.started), "owned_by": "k5serve"} for name in names]})

