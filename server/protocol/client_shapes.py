"""What the official Runware clients send in an `imageInference` task, beyond the model page: each field served
(mapped onto the page's field), refused by name, or accepted and ignored; nothing dropped without a word.

The clients: the Python SDK `runware` 0.5.x, the new `runware-sdk` 1.8.x, `@runware/sdk-js` and the Runware CLI
(docs/api.md lists each field and what happens to it). Applied to the raw task before it is parsed:
- `inputImage` (the CLI's image-to-image) is `seedImage`;
- an object item of `referenceImages` (`{"image", "role", "tag", "type"}`, the Python SDK's `IInputReference`)
  is its `image`; `role`, `tag` and `type` are labels for models with several references, ignored here; a
  per-reference `strength` is refused;
- `inputs.references` (deprecated; the Python SDK sends it beside `inputs.referenceImages`) is
  `inputs.referenceImages` when that is absent;
- features of other models (ControlNet, IP-Adapters, hires fix, ...) are refused by name when asked for;
- fields with no meaning here (`routing`, `providerSettings`, ...) are ignored, as documented;
- any other field is ignored and logged, once per name for the life of the process.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .errors import TaskError, error_code, task_error

log = logging.getLogger("k5serve.validation")

# Features of other models: refused when present and asked for (a non-empty, true value).
UNSUPPORTED = ("controlNet", "ipAdapters", "instantID", "puLID", "acePlusPlus", "photoMaker", "lycoris",
               "embeddings", "vae", "refiner", "outpaint", "ultralytics", "upscaleFactor", "promptWeighting",
               "usePromptWeighting", "clipSkip", "settings", "resolution")
UNSUPPORTED_ADVANCED = ("layerDiffuse", "hiresFix", "regionalPrompting", "fluxKontext", "watermark")
UNSUPPORTED_INPUTS = ("images", "superResolutionReferences", "fonts")
# Accepted and ignored: meaningless for one local model, or only with an option that is refused anyway.
IGNORED = ("routing", "providerSettings", "maskMargin", "useCache", "advancedFeatures", "acceleration",
           "extraArgs")
IGNORED_NESTED = {"safety": ("tolerance",),
                  "acceleratorOptions": ("deepCacheInterval", "deepCacheBranchId", "deepCacheSkipMode")}
REFERENCE_LABELS = ("role", "tag", "type", "refType")

_logged: set[str] = set()
_lock = threading.Lock()


def unsupported_codes() -> set[str]:
    """The error codes the refusals here can answer with (for `validation.error_codes`)."""
    names = (*UNSUPPORTED, "advancedFeatures", "inputs")
    return {error_code("unsupported", name) for name in names} | {"invalidReferenceImages",
                                                                   "unsupportedReferenceImages"}


def normalize(raw: dict[str, Any], task_uuid: str, known: set[str], known_nested: dict[str, set[str]]):
    """`raw` with the clients' shapes mapped onto the page's fields, or the TaskError refusing a feature of
    another model. `known`: the task's own field names; `known_nested`: those of its nested objects."""

    def fail(code: str, message: str, parameter: str) -> TaskError:
        return task_error(code, message, parameter=parameter, task_type="imageInference", task_uuid=task_uuid)

    raw = dict(raw)
    if "inputImage" in raw:
        if "seedImage" in raw and raw["seedImage"] != raw["inputImage"]:
            raise fail("conflictImageInputs", "inputImage and seedImage are the same input; send one.", "inputImage")
        raw["seedImage"] = raw.pop("inputImage")
    _refuse_features(raw, fail)
    if isinstance(raw.get("inputs"), dict):
        inputs = dict(raw["inputs"])
        references = inputs.pop("references", None)
        if references is not None and "referenceImages" not in inputs:
            inputs["referenceImages"] = references
        inputs = _references(inputs, "inputs.referenceImages", fail)
        raw["inputs"] = inputs
    raw = _references(raw, "referenceImages", fail)
    _log_unknown(raw, known, known_nested)
    return raw


def _asked(value: Any) -> bool:
    """A value that asks for something: not false, empty, zero or "none"."""
    return bool(value) and value != "none"


def _refuse_features(raw: dict[str, Any], fail) -> None:
    for name in UNSUPPORTED:
        if _asked(raw.get(name)):
            raise fail(error_code("unsupported", name), f"{name} is a feature of other models; this server "
                       "(Kandinsky 5.0 Image Lite) does not serve it. Leave it out.", name)
    for parent, names, kind in (("advancedFeatures", UNSUPPORTED_ADVANCED, "a feature"),
                                ("inputs", UNSUPPORTED_INPUTS, "an input")):
        holder = raw.get(parent)
        for name in names if isinstance(holder, dict) else ():
            if _asked(holder.get(name)):
                raise fail(error_code("unsupported", parent), f"{parent}.{name} is {kind} of other models; this "
                           "server (Kandinsky 5.0 Image Lite) does not serve it. Leave it out.", f"{parent}.{name}")


def _references(holder: dict[str, Any], parameter: str, fail) -> dict[str, Any]:
    """`holder` with each object item of its referenceImages replaced by the item's image."""
    items = holder.get("referenceImages")
    if not isinstance(items, list) or not any(isinstance(item, dict) for item in items):
        return holder
    plain = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            plain.append(item)
            continue
        where = f"{parameter}[{i}]"
        if item.get("strength") is not None:
            raise fail("unsupportedReferenceImages", "A reference image's own strength is not supported: this "
                       "model's editing takes one reference image as it is. Leave it out.", f"{where}.strength")
        extra = sorted(set(item) - {"image", "strength", *REFERENCE_LABELS})
        if extra or "image" not in item:
            raise fail("invalidReferenceImages", f"A reference image object takes image (and the labels role, "
                       f"tag, type); {'unknown: ' + ', '.join(extra) if extra else 'image is missing'}.",
                       f"{where}.{extra[0]}" if extra else f"{where}.image")
        plain.append(item["image"])
    return {**holder, "referenceImages": plain}


def _log_unknown(raw: dict[str, Any], known: set[str], known_nested: dict[str, set[str]]) -> None:
    """Log each field nobody serves, refuses or documents as ignored: once per name, for the process."""
    names = [name for name in raw if name not in known and name not in IGNORED]
    for parent, fields in known_nested.items():
        value = raw.get(parent)
        if isinstance(value, dict):
            ignored = IGNORED_NESTED.get(parent, ())
            names += [f"{parent}.{name}" for name in value if name not in fields and name not in ignored]
    new = []
    with _lock:
        for name in names:
            if name not in _logged and len(_logged) < 1000:  # bounded: names come from clients
                _logged.add(name)
                new.append(name)
    for name in new:
        log.warning("imageInference field %r is not known to this server and is ignored (logged once per name)",
                    name[:100])
