"""Which checkpoints a run uses: the operator's choice (a repo id already in the Hugging Face cache, or a
folder) resolved to folders, with the generated tiny weights as the CPU test mode's stand-in.

Nothing here downloads (`hub.download` is the one place that does) or imports torch: the caller says
whether a CUDA GPU is visible.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .hub import I2I_REPO, SAFETY_REPO, T2I_REPO, WeightsNotFound, resolve

log = logging.getLogger("k5serve")

NONE = "none"  # --i2i-model none / --safety-model none: the feature is switched off


@dataclass(frozen=True)
class CheckpointChoice:
    model: str = T2I_REPO  # the T2I checkpoint: repo id (in the cache) or diffusers folder
    tiny: bool = False  # serve generated tiny weights (CPU test mode)
    fallback_tiny: bool = False  # tiny weights when there is no GPU or no downloaded weights, instead of failing
    i2i_model: str | None = None  # editing model; None: the I2I Lite repo when downloaded; "none": off
    safety_model: str | None = None  # NSFW classifier; None: the default repo when downloaded; "none": off


@dataclass(frozen=True)
class Checkpoints:
    t2i: Path
    i2i: Path | None  # None: editing requests are refused
    safety: Path | None  # None: safety-checked requests are refused
    device: str  # the device to load on ("auto" stays "auto" for real weights; tiny weights run on the CPU)
    tiny: bool
    tiny_reason: str | None = None  # why tiny weights are served (None when they are not)


class CheckpointError(Exception):
    """A checkpoint the operator named that cannot be used; the message says what to do."""


def resolve_checkpoints(choice: CheckpointChoice, tiny_dir: Path, *, device: str, cuda: bool,
                        safety: bool = True, i2i: bool = True) -> Checkpoints:
    """Resolve the T2I, editing and safety checkpoints. `tiny_dir`: where tiny weights are built (once).
    An optional model that was not named and is not downloaded is left out with a warning; one that was
    named and cannot be found is a CheckpointError."""
    t2i, reason = _t2i(choice, device, cuda)
    tiny = reason is not None
    if tiny:
        from .tiny import ensure_tiny  # torch: only in test mode

        t2i = ensure_tiny(tiny_dir, "t2i")
        device = "cpu" if device == "auto" else device
    # In test mode the editing model is the tiny one too (a real one cannot pair with the tiny T2I).
    named_i2i = None if tiny and choice.i2i_model != NONE else choice.i2i_model
    editing = _optional(named_i2i, I2I_REPO, "editing model", "reference-image requests", tiny, tiny_dir,
                        "i2i") if i2i else None
    classifier = _optional(choice.safety_model, SAFETY_REPO, "safety classifier", "safety-checked requests", tiny,
                           tiny_dir, "safety", marker="config.json") if safety else None
    return Checkpoints(t2i, editing, classifier, device, tiny, reason)


def _t2i(choice: CheckpointChoice, device: str, cuda: bool) -> tuple[Path | None, str | None]:
    """-> (the real T2I folder, None) or (None, why tiny weights are served instead)."""
    if choice.tiny:
        return None, "--tiny"
    try:
        path = resolve(choice.model)
    except WeightsNotFound as exc:
        if not choice.fallback_tiny:
            raise CheckpointError(f"{exc}; or add --tiny for the CPU test mode (generated tiny weights: the real "
                                  "API and pipeline, noise for images)") from None
        return None, f"no downloaded weights for {choice.model}"
    if cuda or device != "auto" or not choice.fallback_tiny:
        return path, None
    return None, "no CUDA GPU found"


def _optional(named: str | None, default_repo: str, what: str, refused: str, tiny: bool, tiny_dir: Path,
              tiny_kind: str, marker: str = "model_index.json") -> Path | None:
    if named == NONE:
        return None
    if tiny and not named:
        from .tiny import ensure_tiny

        return ensure_tiny(tiny_dir, tiny_kind)
    try:
        return resolve(named or default_repo, marker=marker)
    except WeightsNotFound as exc:
        if named:
            raise CheckpointError(str(exc)) from None
        log.warning("no %s (%s); %s will be refused", what, exc, refused)
        return None
