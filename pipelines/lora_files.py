"""LoRA files by model id: ``<lora_dir>/<id>.safetensors``, with ids that could leave the folder refused. No torch,
so a front-end can check a request's LoRAs before queueing it for a remote worker."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from .worker import InvalidInput

log = logging.getLogger("k5serve.lora")

SUFFIX = ".safetensors"


class LoraError(Exception):
    """A LoRA that cannot be used as asked (bad id, missing file, wrong format, wrong model)."""

    def __init__(self, model_id: str, message: str):
        super().__init__(f"LoRA {model_id!r} {message}")
        self.model_id = model_id


def check_lora_files(lora_dir: Path | None, loras: Iterable[tuple[str, float]]) -> None:
    """Before queueing, on every worker: each requested LoRA file exists and is safe to open, else the
    InvalidInput that names the `lora[i].model` at fault. (Whether LoRA is served at all was decided by
    validation; the folder is the same path on every node of a Ray cluster.)"""
    for index, (model, _) in enumerate(loras):
        try:
            resolve_lora_file(lora_dir, model)
        except LoraError as exc:
            raise InvalidInput(str(exc), code="invalidLoraModel", parameter=f"lora[{index}].model") from None


def resolve_lora_file(lora_dir: Path, model_id: str) -> Path:
    """``lora_dir / f"{model_id}.safetensors"``, refusing ids that could leave ``lora_dir``; raise if missing.

    Returns the real path (symlinks resolved). The one place where a model id becomes a file: a mapping file
    (e.g. ``loras.json``: AIR id -> file) would be added here.
    """
    if not isinstance(model_id, str) or not model_id:
        raise LoraError(str(model_id), "is not a valid LoRA model id (empty)")
    if any(c in model_id for c in ("/", "\\", "\x00")) or any(ord(c) < 32 or ord(c) == 127 for c in model_id):
        raise LoraError(model_id, "is not a valid LoRA model id (it contains a path separator or control character)")
    if model_id.startswith("."):  # ".", "..", ".hidden"
        raise LoraError(model_id, "is not a valid LoRA model id (it starts with '.')")
    if len((model_id + SUFFIX).encode()) > 255:
        raise LoraError(model_id[:64] + "...", "is not a valid LoRA model id (too long)")
    try:
        base = Path(lora_dir).resolve(strict=True)
        candidate = base / f"{model_id}{SUFFIX}"
        if candidate.parent != base:  # belt and braces: the checks above already rule this out
            raise LoraError(model_id, "is not a valid LoRA model id")
        real = candidate.resolve()  # follows symlinks, also dangling ones
    except LoraError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        log.error("resolving LoRA %r in %s: %s", model_id, lora_dir, exc)
        raise LoraError(model_id, "is not available on this server") from None
    if not real.is_relative_to(base):
        log.warning("LoRA %r resolves to %s, outside the LoRA folder %s: refused", model_id, real, base)
        raise LoraError(model_id, "is not a valid LoRA model id (it points outside the LoRA folder)")
    if not real.is_file():
        raise LoraError(model_id, "not found on this server")
    return real


def list_lora_files(lora_dir: Path, limit: int = 1000) -> list[str]:
    """The LoRA model ids in ``lora_dir`` (sorted, at most ``limit``): each ``X.safetensors`` that
    ``resolve_lora_file`` would accept, so every id listed can be asked for."""
    try:
        names = sorted(p.name[: -len(SUFFIX)] for p in Path(lora_dir).iterdir() if p.name.endswith(SUFFIX))
    except OSError as exc:
        log.error("listing the LoRA folder %s: %s", lora_dir, exc)
        return []
    found = []
    for name in names:
        try:
            resolve_lora_file(lora_dir, name)
        except LoraError:
            continue
        found.append(name)
        if len(found) >= limit:
            break
    return found
