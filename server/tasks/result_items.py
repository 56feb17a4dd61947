"""The worker's `GenerationOutput` as Runware result items with their cost, shared by the server and
`k5serve generate`; `to_spec` is the other direction (a validated task to the worker's `GenerationSpec`)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from k5serve.pipelines.worker import GenerationOutput

from ..protocol.models import ImageInferenceTask, ImageResult
from ..protocol.output_formats import encode

# save(encoded bytes, file extension) -> (imageUUID, imageURL): where the caller keeps an image.
SaveImage = Callable[[bytes, str], tuple[str, str]]


def cost_per_image(output: GenerationOutput, price_per_gpu_hour: float) -> float:
    """USD: the seconds the accelerator was busy with the task, at the operator's price, split per image."""
    return output.seconds * price_per_gpu_hour / 3600 / max(1, len(output.images))


def result_items(task: ImageInferenceTask, output: GenerationOutput, save: SaveImage,
                 price_per_gpu_hour: float) -> list[tuple[dict[str, Any], bytes, str]]:
    """Encode each image, hand it to `save`, describe it: -> [(result item, encoded bytes, MIME type)].
    Runs in a thread where it matters: encoding is CPU work."""
    cost = cost_per_image(output, price_per_gpu_hour)
    out = []
    for index, (image, seed) in enumerate(zip(output.images, output.seeds, strict=True)):
        data, ext, mime = encode(image, task.outputFormat, task.outputQuality)
        image_uuid, url = save(data, ext)
        item = result_item(task, image_uuid, data, mime, url, seed, cost,
                           nsfw=output.nsfw[index] if output.nsfw is not None else None)
        if task.width is None:  # the size came from the input image: say what was produced
            item.update(width=output.width, height=output.height)
        out.append((item, data, mime))
    return out


def result_item(
    task: ImageInferenceTask, image_uuid: str, data: bytes, mime: str, url: str, seed: int, cost: float,
    nsfw: bool | None = None,
) -> dict[str, Any]:
    """One Runware result item, with the fields `outputType` asks for."""
    b64 = base64.b64encode(data).decode() if {"base64Data", "dataURI"} & set(task.outputType) else None
    return ImageResult(
        taskType=task.taskType,
        taskUUID=task.taskUUID,
        imageUUID=image_uuid,
        imageURL=url if "URL" in task.outputType else None,
        imageBase64Data=b64 if "base64Data" in task.outputType else None,
        imageDataURI=f"data:{mime};base64,{b64}" if "dataURI" in task.outputType else None,
        seed=seed,
        NSFWContent=nsfw,  # only when the task asked for the safety check
        cost=round(cost, 6) if task.includeCost else None,
    ).wire()


def describe_passes(stats: dict | None) -> str:
    """For the task log line: 'passes cond 12/20 uncond 12/20 computed (fbcache)'."""
    if not stats:
        return "passes unknown"
    counts = " ".join(f"{name} {b['computed']}/{b['computed'] + b['skipped']}" for name, b in stats["branches"].items())
    return f"passes {counts} computed ({stats['method'] or 'no step cache'})"
