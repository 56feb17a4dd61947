"""Validation at the edge: a raw JSON task becomes a typed `ImageInferenceTask`, or a `TaskError`.

pydantic checks types and ranges; this module turns its first complaint into Runware's error shape
(`invalidWidth`, `missingPositivePrompt`, ... naming the parameter), then applies the rules pydantic
cannot express (allowed size pairs, model ids, the cache window against `steps`, features this server
does not serve yet). Nothing reaches the worker without passing through here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from k5serve.accel import resolve_window
from pydantic import BaseModel, ValidationError

from . import client_shapes
from .errors import ErrorItem, TaskError, error_code, task_error
from .models import (
    ALLOWED_SIZES,
    ALLOWED_VALUES,
    MODEL_ID,
    SCHEDULER_NAMES,
    SDK_ACCELERATOR_ALIASES,
    TASK_MODELS,
    AcceleratorOptions,
    ImageInferenceTask,
    Inputs,
    Safety,
    task_type_of,
)
from .wire import encodable

# The names client_shapes.normalize takes as known (anything else is ignored and logged once).
_KNOWN = set(ImageInferenceTask.model_fields)
_KNOWN_NESTED = {"inputs": set(Inputs.model_fields), "safety": set(Safety.model_fields),
                 "acceleratorOptions": set(AcceleratorOptions.model_fields) | set(SDK_ACCELERATOR_ALIASES)}

# Nested objects whose leaf names are well known on their own (`invalidTeaCacheDistance`).
_FLAT_PARENTS = {"acceleratorOptions", "inputs"}

_TYPE_NAMES = {
    "string": "string",
    "int": "integer",
    "float": "float",
    "bool": "boolean",
    "list": "array",
    "model": "object",
    "dict": "object",
}


def strip_nulls(value: Any) -> Any:
    """`null` counts as absent, at every level."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


def _param_path(loc: Iterable[Any]) -> tuple[str, list[str]]:
    """('lora', 0, 'weight') -> ("lora[0].weight", ["lora", "weight"])."""
    text, names = "", []
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
            names.append(str(part))
    return text, names


def _code(prefix: str, names: list[str]) -> str:
    if len(names) > 1 and names[0] in _FLAT_PARENTS:
        names = names[-1:]
    return error_code(prefix, *names)


def _from_pydantic(err: dict[str, Any], task_uuid: str, task_type: str) -> TaskError:
    parameter, names = _param_path(err["loc"])
    if names == ["outputType"]:
        parameter = "outputType"  # a string or a list of them; name the field, not the list slot
    kind = err["type"]
    ctx = err.get("ctx") or {}
    extra: dict[str, Any] = {}
    if kind == "missing":
        return task_error(
            _code("missing", names),
            f"Missing required parameter: {parameter}.",
            parameter=parameter,
            task_type=task_type,
            task_uuid=task_uuid,
        )
    type_name = _TYPE_NAMES.get(kind.split("_")[0])
    if kind.endswith("_type") and type_name:
        extra["type"] = type_name
        reason = f"must be a{'n' if type_name[0] in 'aeiou' else ''} {type_name}"
    elif kind in ("greater_than_equal", "greater_than"):
        extra["min"] = ctx.get("ge", ctx.get("gt"))
        reason = f"must be at least {extra['min']}"
    elif kind in ("less_than_equal", "less_than"):
        extra["max"] = ctx.get("le", ctx.get("lt"))
        reason = f"must be at most {extra['max']}"
    elif kind in ("string_too_short", "too_short"):
        extra["min"] = ctx.get("min_length")
        unit = "characters" if kind.startswith("string") else "items"
        reason = f"must have at least {extra['min']} {unit}"
    elif kind in ("string_too_long", "too_long"):
        extra["max"] = ctx.get("max_length")
        unit = "characters" if kind.startswith("string") else "items"
        reason = f"must have at most {extra['max']} {unit}"
    elif kind == "string_unicode":  # a lone surrogate: no UTF-8 encoder could write it back
        reason = "must be valid Unicode text (it holds a lone surrogate)"
    elif kind == "literal_error":
        key = ".".join(names)
        allowed = ALLOWED_VALUES.get(key)
        if allowed is None:
            allowed = [e.strip(" '") for e in str(ctx.get("expected", "")).replace(" or ", ",").split(",")]
        extra["allowedValues"] = allowed
        reason = "must be one of: " + ", ".join(map(str, allowed))
    else:
        reason = err.get("msg", "is invalid")
    return task_error(
        _code("invalid", names),
        f"Invalid value for {parameter} parameter: {reason}.",
        parameter=parameter,
        task_type=task_type,
        task_uuid=task_uuid,
        **extra,
    )


def parse_task(model: type[BaseModel], raw: dict[str, Any], task_uuid: str) -> Any:
    """Validate one raw task against its model; the first complaint becomes a Runware error."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise _from_pydantic(exc.errors()[0], task_uuid, task_type_of(model)) from None


def parse(model: type[BaseModel], raw: dict[str, Any]) -> Any:
    """A raw task of `model`'s type (getResponse, imageUpload, modelSearch): its taskUUID checked first, so
    every later error echoes it; `null` counts as absent, as for imageInference."""
    task_uuid = check_task_uuid(raw, task_type_of(model))
    return parse_task(model, strip_nulls(raw), task_uuid)


def batch_error(tasks: Any, max_tasks: int) -> TaskError | None:
    """What is wrong with a request body or frame as a whole, if anything: the same answer on every transport."""
    if not isinstance(tasks, list) or not tasks:
        return TaskError(ErrorItem(code="invalidRequestBody", type="array",
                                   message="The request must be a non-empty JSON array of task objects."))
    if len(tasks) > max_tasks:
        return TaskError(ErrorItem(code="maxTasksExceeded", max=max_tasks,
                                   message=f"A request may hold at most {max_tasks} tasks; it held {len(tasks)}. "
                                           "Send the rest in further requests."))
    return None


def well_formed_uuid(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def check_task_uuid(raw: dict[str, Any], task_type: str | None) -> str:
    """Every task but authentication and ping carries a client-chosen UUID; errors must echo it."""
    value = raw.get("taskUUID")
    if value is None:
        raise task_error(
            "missingTaskUUID",
            "Missing required parameter: taskUUID (a UUID v4 string).",
            parameter="taskUUID",
            task_type=task_type,
        )
    if not isinstance(value, str):
        raise task_error(
            "invalidTaskUUID",
            "Invalid value for taskUUID parameter: must be a UUID v4 string.",
            parameter="taskUUID",
            task_type=task_type,
            type="string",
        )
    if not well_formed_uuid(value):
        raise task_error(
            "invalidTaskUUID",
            "Invalid value for taskUUID parameter: must be a UUID v4 string.",
            parameter="taskUUID",
            task_type=task_type,
            task_uuid=value if encodable(value) else None,
        )
    return value


def parse_image_inference(
    raw: dict[str, Any],
    *,
    model_aliases: Iterable[str] = (),
    features: frozenset[str] = frozenset(),
) -> ImageInferenceTask:
    """Validate one raw `imageInference` task. `features` names the optional features this server serves."""
    raw = strip_nulls(raw)
    task_uuid = check_task_uuid(raw, "imageInference")
    raw = client_shapes.normalize(raw, task_uuid, _KNOWN, _KNOWN_NESTED)
    raw = _sdk_aliases(raw, task_uuid)
    task = parse_task(ImageInferenceTask, raw, task_uuid)

    def fail(code: str, message: str, parameter: str, **extra: Any) -> TaskError:
        return task_error(
            code, message, parameter=parameter, task_type="imageInference", task_uuid=task_uuid, **extra
        )

    accepted_models = {MODEL_ID, *model_aliases}
    if task.model not in accepted_models:
        raise fail(
            "unknownModel",
            f"Unknown model '{task.model}'. This server serves {MODEL_ID}.",
            "model",
            allowedValues=sorted(accepted_models),
        )
    _check_size(task, fail)
    if task.scheduler is not None and task.scheduler not in SCHEDULER_NAMES:
        raise fail(
            "invalidScheduler",
            f"Invalid value for scheduler parameter: '{task.scheduler}' is not a scheduler of this model.",
            "scheduler",
            allowedValues=list(SCHEDULER_NAMES),
        )
    if task.acceleratorOptions is not None:
        _check_accelerator_options(task, fail)
    if task.safety is not None and task.safety.checkInputs:
        raise fail(
            "unsupportedCheckInputs",
            "safety.checkInputs is not supported by this server (only the output images are checked); "
            "send it as false or leave it out.",
            "safety.checkInputs",
        )
    _check_features(task, features, fail)
    _check_image_inputs(task, fail)
    return task


@dataclass(frozen=True)
class ImageInput:
    """The one input image a validated task gives: an editing reference or an image-to-image seed."""

    parameter: str  # where it was given, e.g. "inputs.referenceImages[0]"
    ref: str  # a data URI, base64 data, a URL or an imageUUID
    edit: bool  # True: a reference image (editing model); False: a seedImage (image-to-image)

    @property
    def code(self) -> str:
        """The error code for a value that cannot be used (not found, too large, not an image)."""
        name = self.parameter.split("[")[0].split(".")[-1]
        return {"seedImage": "invalidSeedImage", "referenceImages": "invalidReferenceImages"}.get(name, "invalidImage")


def image_input(task: ImageInferenceTask) -> ImageInput | None:
    """The task's input image, if any (the task was validated: at most one, no mask)."""
    edit, seed, _ = _image_inputs(task)
    if edit or seed:
        parameter, ref = (edit or seed)[0]
        return ImageInput(parameter, ref, edit=bool(edit))
    return None


def _image_inputs(task: ImageInferenceTask) -> tuple[list[tuple[str, str]], list[tuple[str, str]], str | None]:
    """-> (editing references, seed images, the mask's parameter), each reference as (parameter, value)."""
    inputs = task.inputs
    edit = [(f"inputs.referenceImages[{i}]", ref) for i, ref in enumerate((inputs and inputs.referenceImages) or [])]
    edit += [("inputs.image", inputs.image)] if inputs and inputs.image else []
    edit += [(f"referenceImages[{i}]", ref) for i, ref in enumerate(task.referenceImages or [])]
    seed = [(p, v) for p, v in (("inputs.seedImage", inputs and inputs.seedImage), ("seedImage", task.seedImage)) if v]
    mask = "maskImage" if task.maskImage else "inputs.mask" if inputs and inputs.mask else None
    return edit, seed, mask


def _check_image_inputs(task: ImageInferenceTask, fail) -> None:
    edit, seed, mask = _image_inputs(task)
    if mask:
        raise fail("unsupportedMaskImage", "Inpainting (a mask image) is not supported by this model.", mask)
    if len(edit) > 1:
        raise fail("invalidReferenceImages", "This model edits one reference image per task.", edit[1][0])
    if len(seed) > 1 or (edit and seed):
        raise fail("conflictImageInputs", "Give one input image: a reference image (editing) or a seedImage "
                   "(image-to-image), not both.", (seed[1] if len(seed) > 1 else seed[0])[0])


def _check_size(task: ImageInferenceTask, fail) -> None:
    if task.width is None and task.height is None:
        if task.has_image_input:
            return  # size follows the input image (image-to-image)
        raise fail("missingWidth", "Missing required parameters: width and height.", "width")
    if task.width is None or task.height is None:
        missing = "width" if task.width is None else "height"
        raise fail(
            f"missing{missing.capitalize()}",
            "Parameters width and height must be used together.",
            missing,
        )
    if (task.width, task.height) in ALLOWED_SIZES:
        return
    sizes = [f"{w}x{h}" for w, h in ALLOWED_SIZES]
    param = "width" if task.width not in ALLOWED_VALUES["width"] else "height"
    raise fail(
        f"invalid{param.capitalize()}",
        f"Unsupported dimensions {task.width}x{task.height}. Allowed width x height: {', '.join(sizes)}.",
        param,
        allowedValues=sizes,
    )


def _sdk_aliases(raw: dict[str, Any], task_uuid: str) -> dict[str, Any]:
    """acceleratorOptions as the Python SDK spells them (`fbcache`, `cacheDistance`, `cacheStopStep`) -> the
    page's names."""
    acc = raw.get("acceleratorOptions")
    if not isinstance(acc, dict) or not SDK_ACCELERATOR_ALIASES.keys() & acc.keys():
        return raw
    acc = dict(acc)
    for alias, name in SDK_ACCELERATOR_ALIASES.items():
        if alias not in acc:
            continue
        if name in acc and acc[name] != acc[alias]:
            raise task_error(
                error_code("conflict", alias),
                f"acceleratorOptions.{alias} and acceleratorOptions.{name} are the same option with different "
                "values; send one.",
                parameter=f"acceleratorOptions.{alias}",
                task_type="imageInference",
                task_uuid=task_uuid,
            )
        acc[name] = acc.pop(alias)
    return {**raw, "acceleratorOptions": acc}


def _check_accelerator_options(task: ImageInferenceTask, fail) -> None:
    acc = task.acceleratorOptions
    assert acc is not None
    if acc.deepCache:
        raise fail(
            "unsupportedDeepCache",
            "DeepCache is not available for this model; use teaCache, fbCache or dbCache.",
            "acceleratorOptions.deepCache",
        )
    if acc.cacheStartStep is not None and acc.cacheStartStepPercentage is not None:
        raise fail(
            "conflictCacheStartStep",
            "Use either cacheStartStep or cacheStartStepPercentage, not both.",
            "acceleratorOptions.cacheStartStep",
        )
    if acc.cacheEndStep is not None and acc.cacheEndStepPercentage is not None:
        raise fail(
            "conflictCacheEndStep",
            "Use either cacheEndStep or cacheEndStepPercentage, not both.",
            "acceleratorOptions.cacheEndStep",
        )
    if acc.cacheEndStep is not None and acc.cacheEndStep > task.steps:
        raise fail(
            "invalidCacheEndStep",
            f"cacheEndStep ({acc.cacheEndStep}) must be less than or equal to steps ({task.steps}).",
            "acceleratorOptions.cacheEndStep",
            max=task.steps,
        )
    pstart, pend = acc.cacheStartStepPercentage, acc.cacheEndStepPercentage
    if pstart is not None and pend is not None and pstart >= pend:
        raise fail(
            "invalidCacheStartStepPercentage",
            f"cacheStartStepPercentage ({pstart}) must be less than cacheEndStepPercentage ({pend}).",
            "acceleratorOptions.cacheStartStepPercentage",
        )
    # Any mix of the step and percentage forms: the window in steps must not be empty.
    start, end = resolve_window(task.steps, acc.cacheStartStep, acc.cacheEndStep, pstart, pend)
    if start >= end:
        start_name = "cacheStartStep" if acc.cacheStartStep is not None else "cacheStartStepPercentage"
        end_name = ("cacheEndStep" if acc.cacheEndStep is not None else
                    "cacheEndStepPercentage" if pend is not None else "steps")
        raise fail(
            error_code("invalid", start_name),
            f"{start_name} (step {start} of {task.steps}) must be less than {end_name} (step {end}).",
            f"acceleratorOptions.{start_name}",
        )
    methods = [name for name in ("teaCache", "fbCache", "dbCache") if getattr(acc, name)]
    if len(methods) > 1:
        raise fail(
            "conflictAcceleratorOptions",
            f"Use one step cache per task; {' and '.join(methods)} were both switched on.",
            f"acceleratorOptions.{methods[1]}",
        )


# The one place a requested feature is checked against what this server serves (`features`: the
# server's own plus its worker's), before any input image is fetched or decoded.
def _check_features(task: ImageInferenceTask, features: frozenset[str], fail) -> None:
    edit, image = _edit_param(task), _image_param(task)
    wanted: list[tuple[str, str, str, bool]] = [  # feature, error code's name, parameter, requested
        ("lora", "lora", "lora", bool(task.lora)),
        ("acceleration", "acceleratorOptions", "acceleratorOptions",
         bool(task.acceleratorOptions and task.acceleratorOptions.any_method)),
        ("safety", "safety", "safety", task.safety_check),
        ("webhook", "webhookURL", "webhookURL", task.webhookURL is not None),
        ("async", "deliveryMethod", "deliveryMethod", task.deliveryMethod == "async"),
        ("upload", "uploadEndpoint", "uploadEndpoint", task.uploadEndpoint is not None),
        ("image_input", image.split(".")[0], image, task.has_image_input),
        ("edit", "referenceImages", edit or "referenceImages", edit is not None),
    ]
    for feature, name, parameter, requested in wanted:
        if requested and feature not in features:
            raise fail(
                error_code("unsupported", name),
                f"The {parameter} feature is not available on this server as configured"
                f"{_FEATURE_HINTS.get(feature, '')}; the request was not run.",
                parameter,
            )


# Every optional feature a request may ask for (a server serves some of them).
FEATURES = frozenset({"lora", "acceleration", "safety", "webhook", "async", "upload", "image_input", "edit"})

# What the operator would start the server with to serve the feature.
_FEATURE_HINTS = {"lora": " (no --lora-dir)", "edit": " (no editing model: --i2i-model)",
                  "safety": " (no safety classifier: --safety-model)"}


def _edit_param(task: ImageInferenceTask) -> str | None:
    """The parameter that asks for instruction editing (a reference image), if any."""
    inputs = task.inputs
    if task.referenceImages:
        return "referenceImages"
    if inputs and inputs.referenceImages:
        return "inputs.referenceImages"
    if inputs and inputs.image:
        return "inputs.image"
    return None


def _image_param(task: ImageInferenceTask) -> str:
    for name in ("seedImage", "referenceImages", "maskImage"):
        if getattr(task, name):
            return name
    return "inputs"


# Codes raised with a fixed name (everything else is derived from a parameter name below).
_FIXED_CODES = (
    "invalidApiKey", "missingApiKey", "invalidJSON", "invalidRequestBody", "payloadTooLarge", "maxTasksExceeded",
    "invalidTask", "internalServerError", "serviceUnavailable", "modelNotReady", "rateLimitExceeded",
    "inferenceError", "nsfwContentDetected", "taskFailedOrNotFound", "unknownModel", "imageNotFound",
    "invalidRequest", "unsupportedCheckInputs", "conflictImageInputs", "storageFull",
    "methodNotAllowed", "notFound", "invalidSince",
)


def error_codes() -> frozenset[str]:
    """Every error code this server can answer with: a closed set (metrics label outcomes with it)."""
    codes = set(_FIXED_CODES) | client_shapes.unsupported_codes()
    codes |= {error_code("conflict", alias) for alias in SDK_ACCELERATOR_ALIASES}
    for model in TASK_MODELS:
        for names in _field_names(model):
            codes |= {_code(prefix, names) for prefix in ("invalid", "missing", "unsupported", "conflict")}
    return frozenset(codes)


def _field_names(model: type[BaseModel], parents: tuple[str, ...] = ()) -> list[list[str]]:
    """[["taskType"], ..., ["lora", "model"], ...]: the name paths of every field, nested models included."""
    out = []
    for name, info in model.model_fields.items():
        out.append([*parents, name])
        for inner in _models_in(info.annotation):
            out += _field_names(inner, (*parents, name))
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]
