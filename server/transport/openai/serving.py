"""OpenAI requests as Runware tasks, Runware items as OpenAI answers: no second generation path.

A request is translated into one `imageInference` task (sync, one `taskUUID`), which the dispatcher runs like
any other: the same validation, limits, tenants, task record, worker, metrics and logs.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from ...protocol.models import ALLOWED_SIZES, MODEL_ID
from ...tasks.input_images import nearest_size
from .protocol import FORMATS, SHORT_MODEL_NAMES, STEPS, ImageEditRequest, ImageGenerationRequest, invalid, parse_size


def _size(request: ImageGenerationRequest | ImageEditRequest, default: tuple[int, int] | None):
    """(width, height) to ask for: a supported size as it is, any other at the supported size nearest in aspect
    ratio; `auto` (or none): `default` (None: the input image's aspect ratio)."""
    if request.size is None or request.size.strip().lower() == "auto":
        return default
    size = parse_size(request.size)
    if size is None:
        raise invalid("size", f"Invalid value for 'size': {request.size!r}; use auto or WIDTHxHEIGHT, e.g. "
                              "1024x1024 (" + ", ".join(f"{w}x{h}" for w, h in ALLOWED_SIZES) + " are served as "
                              "they are, any other size at the nearest of them in aspect ratio).")
    return size if size in ALLOWED_SIZES else nearest_size(*size, ALLOWED_SIZES)


def to_task(request: ImageGenerationRequest | ImageEditRequest, image: str | None = None) -> dict[str, Any]:
    """The Runware imageInference task for `request` (`image`: the image to edit, a data URI)."""
    if request.background == "transparent":
        raise invalid("background", "This model makes no transparent backgrounds; use opaque or auto.")
    if request.stream:
        raise invalid("stream", "Streaming is not supported: leave stream out or false, and the answer holds "
                                "every image.")
    model = request.model
    task: dict[str, Any] = {
        "taskType": "imageInference", "taskUUID": str(uuid.uuid4()),
        "model": MODEL_ID if model is None or model.lower() in SHORT_MODEL_NAMES else model,
        "positivePrompt": request.prompt, "numberResults": request.n or 1,
        "outputType": "URL" if request.response_format == "url" else "base64Data",
        "outputFormat": FORMATS[request.output_format or "png"], "deliveryMethod": "sync",
        "steps": request.num_inference_steps if request.num_inference_steps is not None
        else STEPS[request.quality or "auto"],
    }
    size = _size(request, None if image is not None else (1024, 1024))
    if size is not None:
        task["width"], task["height"] = size
    if request.output_compression is not None and task["outputFormat"] != "PNG":
        task["outputQuality"] = round(20 + request.output_compression * (99 - 20) / 100)
    extras = {"negativePrompt": request.negative_prompt, "seed": request.seed, "CFGScale": request.guidance_scale}
    task |= {name: value for name, value in extras.items() if value is not None}
    if image is not None:
        task["inputs"] = {"referenceImages": [image]}
    return task


def data_uri(data: bytes, content_type: str | None) -> str:
    """An uploaded file as the data URI a Runware image field takes (its bytes are checked there, once)."""
    kind = content_type if content_type and content_type.startswith("image/") else "application/octet-stream"
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def answer(task: dict[str, Any], items: list[dict], request: ImageGenerationRequest | ImageEditRequest):
    """OpenAI's answer for the task's items: each image as `b64_json` or `url`, with its seed (an extension);
    the size and format produced."""
    data = []
    for item in items:
        image = {"b64_json": item["imageBase64Data"]} if "imageBase64Data" in item else {"url": item["imageURL"]}
        data.append(image | {"seed": item.get("seed")})
    width = next((i["width"] for i in items if "width" in i), task.get("width"))
    height = next((i["height"] for i in items if "height" in i), task.get("height"))
    body: dict[str, Any] = {"created": int(time.time()), "data": data, "background": "opaque",
                            "output_format": request.output_format or "png"}
    if width and height:
        body["size"] = f"{width}x{height}"
    if request.quality is not None:
        body["quality"] = request.quality
    return body
