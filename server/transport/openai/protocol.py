"""The OpenAI Images API on the wire: the request fields this server takes, and errors in OpenAI's shape.

Only what OpenAI's API has and Runware's has not is checked here (`n`, `size`, `response_format`, `quality`,
...): a field both have (`prompt`, `seed`, `num_inference_steps`, ...) is passed on untouched and checked once,
by the Runware task's validation, whose errors are then named by the OpenAI field (`PARAMETERS`); their types and
ranges are only shown in the OpenAPI document.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ...protocol import wire
from ...protocol.errors import ErrorItem, TaskError

Quality = Literal["low", "medium", "high", "auto", "standard", "hd"]
Format = Literal["png", "jpeg", "webp"]


class _Common(BaseModel):
    """The fields of both routes. Unknown fields are refused by name, as OpenAI's API does."""

    model_config = ConfigDict(extra="forbid")

    prompt: Any = Field(description="What to draw (the Runware task's positivePrompt)",
                        json_schema_extra={"type": "string", "minLength": 2, "maxLength": 32000})
    model: str | None = Field(None, description="This model's Runware id, or kandinsky-5.0-image-lite")
    n: int | None = Field(None, ge=1, le=10, description="Images to make (numberResults)")
    size: str | None = Field(None, max_length=32, description="auto or WIDTHxHEIGHT; served at the supported "
                                                               "size nearest in aspect ratio")
    response_format: Literal["url", "b64_json"] | None = Field(None, description="Default b64_json")
    output_format: Format | None = Field(None, description="Default png")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg and webp: onto outputQuality")
    quality: Quality | None = Field(None, description="Steps: low 10, medium/standard/auto 20, high 30, hd 50")
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description="transparent: refused")
    user: str | None = Field(None, max_length=256, description="Accepted and ignored (the key names the caller)")
    safety_identifier: str | None = Field(None, max_length=256, description="Accepted and ignored")
    stream: bool | None = Field(None, description="false only: results come in one answer")
    partial_images: int | None = Field(None, ge=0, le=0, description="0 only (no streaming)")
    # Extensions, as vLLM-Omni takes them (the SDKs send them in extra_body).
    negative_prompt: Any = Field(None, description="negativePrompt",
                                 json_schema_extra={"type": "string", "minLength": 2, "maxLength": 3000})
    seed: Any = Field(None, description="The first image's seed; image i has seed + i",
                      json_schema_extra={"type": "integer", "minimum": 0, "maximum": 2**63 - 1})
    num_inference_steps: Any = Field(None, description="steps; overrides quality",
                                     json_schema_extra={"type": "integer", "minimum": 10, "maximum": 50})
    guidance_scale: Any = Field(None, description="CFGScale",
                                json_schema_extra={"type": "number", "minimum": 2, "maximum": 10})


class ImageGenerationRequest(_Common):
    """`POST /v1/images/generations` (JSON)."""

    moderation: Literal["low", "auto"] | None = Field(None, description="Accepted; the server's content check "
                                                                         "(the safety field) is what applies")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted and ignored (DALL-E 3 only)")


class ImageEditRequest(_Common):
    """`POST /v1/images/edits` (multipart/form-data; the image in `image` or `image[]`)."""

    input_fidelity: Literal["low", "high"] | None = Field(None, description="Accepted and ignored")


class ImageData(BaseModel):
    b64_json: str | None = Field(None, description="The image, base64 (response_format b64_json)")
    url: str | None = Field(None, description="The image's URL on this server (response_format url)")
    seed: int | None = Field(None, description="The image's seed (an extension)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str | None = Field(None, description="The size produced, WIDTHxHEIGHT")
    output_format: str | None = None
    quality: str | None = None
    background: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


STATUSES = {
    400: "A field that is unknown, missing or invalid; the error's param names it",
    401: "No valid API key (Authorization: Bearer)",
    413: "The body is larger than the server accepts",
    429: "The caller's limits or the generation queue are full; see Retry-After",
    500: "The generation failed",
    503: "The model is loading, the server is shutting down, a store is unreachable or a disk is full",
}


def responses(ok: type[BaseModel], statuses: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route: `ok` on 200, OpenAI's error shape on each of `statuses`."""
    return {200: {"model": ok, "description": "Success"}} | {
        status: {"model": ErrorResponse, "description": STATUSES[status]} for status in statuses}


STEPS = {"low": 10, "medium": 20, "standard": 20, "auto": 20, "high": 30, "hd": 50}
FORMATS = {"png": "PNG", "jpeg": "JPG", "webp": "WEBP"}
SHORT_MODEL_NAMES = ("kandinsky-5.0-image-lite", "kandinsky-5-image-lite")

# A Runware task's parameter -> the OpenAI field it came from (for errors); others keep their Runware name.
PARAMETERS = {"positivePrompt": "prompt", "negativePrompt": "negative_prompt", "numberResults": "n",
              "width": "size", "height": "size", "steps": "num_inference_steps", "CFGScale": "guidance_scale",
              "seed": "seed", "outputFormat": "output_format", "outputQuality": "output_compression",
              "outputType": "response_format", "model": "model", "inputs.referenceImages": "image",
              "referenceImages": "image", "inputs.image": "image"}
_RENAMED = re.compile(r"\b(positivePrompt|negativePrompt|numberResults|CFGScale|outputQuality)\b")


def parse_size(text: str) -> tuple[int, int] | None:
    """`WIDTHxHEIGHT` -> (width, height), or None when it is not one (`auto` is the caller's)."""
    match = re.fullmatch(r"\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*", text)
    if match is None or 0 in (int(match[1]), int(match[2])):
        return None
    return int(match[1]), int(match[2])


def invalid(param: str, message: str, code: str = "invalid_value") -> TaskError:
    """A 400 about one OpenAI field."""
    return TaskError(ErrorItem(code=code, message=message, parameter=param), 400)


def from_validation(exc: ValidationError) -> TaskError:
    """pydantic's first complaint about a request, as a 400 naming the field."""
    error = exc.errors()[0]
    param = ".".join(str(part) for part in error["loc"]) or None
    if error["type"] == "extra_forbidden":
        return invalid(param, f"Unknown parameter: '{param}'.", "unknown_parameter")
    if error["type"] == "missing":
        return invalid(param, f"Missing required parameter: '{param}'.", "missing_required_parameter")
    return invalid(param, f"Invalid value for '{param}': {error['msg']}.")


_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
          429: "rate_limit_error"}


def error_body(error: TaskError) -> dict[str, Any]:
    """OpenAI's `{"error": {message, type, param, code}}` for an error from anywhere in the server: the
    Runware parameter named by its OpenAI field, Runware's code kept (it says what went wrong)."""
    item = error.item
    message, param = item.message, item.parameter
    field = PARAMETERS.get(re.sub(r"\[\d+\]", "", param or ""))  # inputs.referenceImages[0] -> image
    if field is not None:
        message, param = message.replace(param, field), field
    elif param == "apiKey":  # (Runware's authentication task); OpenAI's clients send the key in a header
        param = None
    message = _RENAMED.sub(lambda m: PARAMETERS[m[1]], message)
    status = error.http_status
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": item.code}}


def openai_error(error: TaskError) -> wire.WireResponse:
    """`error` as an HTTP answer in OpenAI's shape (its status and headers: Retry-After on 429 and 503)."""
    return wire.WireResponse(error_body(error), status_code=error.http_status, headers=error.headers)


def is_openai_path(path: str) -> bool:
    """The paths answered in OpenAI's error shape, also where nothing is routed (404, 405)."""
    return path.startswith("/v1/images") or path.rstrip("/") == "/v1/models"
