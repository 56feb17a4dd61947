"""The generation engine a worker owns: the T2I pipeline, the I2I editing pipeline and their LoRAs.

The I2I pipeline shares the text encoders, tokenizers and VAE with the T2I one (one copy of the 8B
Qwen encoder in memory, not two); only its transformer is loaded separately, at start-up or on the first
editing request, as the operator chooses.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k5serve.accel import AccelSettings
from k5serve.weights.hub import same_component

from .k5 import K5I2IPipeline, K5T2IPipeline
from .spec import GenerationOutput, GenerationSpec, InvalidInput, ProgressCallback

if TYPE_CHECKING:
    from .lora import LoraManager
    from .safety import SafetyChecker

log = logging.getLogger("k5serve.engine")

SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


@dataclass(frozen=True)
class EngineConfig:
    i2i_path: Path | None = None  # None: no editing model
    i2i_load: str = "lazy"  # "lazy" (first editing request) or "eager" (at start-up)
    lora_dir: Path | None = None  # None: LoRA requests are refused
    max_loras: int = 8  # adapters kept loaded per pipeline (LRU)
    accel: AccelSettings = AccelSettings()  # step caching: TeaCache coefficients, DBCache Fn
    safety_path: Path | None = None  # NSFW image classifier folder; None: safety checks are refused
    safety_threshold: float = 0.5  # an image is flagged when P(unsafe) >= this
    offload: str = "none"  # the T2I pipeline's CPU offload mode; the I2I pipeline follows it


class K5Engine:
    def __init__(self, t2i: K5T2IPipeline, config: EngineConfig = EngineConfig()):
        self.t2i = t2i
        self.t2i.accel_settings = config.accel
        self.config = config
        self._i2i: K5I2IPipeline | None = None
        self._i2i_lock = threading.Lock()
        self._loras: dict[int, LoraManager] = {}
        self.safety: SafetyChecker | None = None
        if config.safety_path is not None:
            from .safety import SafetyChecker

            self.safety = SafetyChecker(config.safety_path, t2i._execution_device, config.safety_threshold)
        if config.i2i_path is not None and config.i2i_load == "eager":
            self.i2i()

    @property
    def features(self) -> frozenset[str]:
        return frozenset({"image_input", "acceleration"} | ({"edit"} if self.config.i2i_path else set())
                         | ({"lora"} if self.config.lora_dir else set()) | ({"safety"} if self.safety else set()))

    def i2i(self) -> K5I2IPipeline:
        with self._i2i_lock:
            if self._i2i is None:
                if self.config.i2i_path is None:
                    raise InvalidInput("this server has no image editing model loaded",
                                       code="unsupportedReferenceImages", parameter="referenceImages")
                # Reuse the T2I pipeline's encoders, tokenizers and VAE where the checkpoints agree.
                t2i_root = Path(self.t2i.config._name_or_path)
                # (Not under CPU offload: diffusers' offload hooks chain one pipeline's components, so
                # the offloaded I2I pipeline keeps its own copies, in host memory.)
                shared = {name: getattr(self.t2i, name) for name in SHARED
                          if self.config.offload == "none"
                          and same_component(t2i_root / name, self.config.i2i_path / name)}
                if len(shared) < len(SHARED) and self.config.offload == "none":
                    log.warning("I2I checkpoint differs in %s: loading its own copy", set(SHARED) - set(shared))
                pipe = K5I2IPipeline.from_pretrained(self.config.i2i_path, dtype=self.t2i.transformer.dtype,
                                                     **shared)
                from .loader import place

                place(pipe, self.t2i._execution_device, self.config.offload)
                pipe.set_progress_bar_config(disable=True)
                pipe.accel_settings = self.config.accel
                self._i2i = pipe
                log.info("loaded the I2I editing transformer from %s (shared encoders and VAE)",
                         self.config.i2i_path)
            return self._i2i

    def check(self, spec: GenerationSpec) -> None:
        """Cheap checks before queueing: every requested LoRA file exists and is safe to open."""
        if spec.loras and self.config.lora_dir is None:
            raise InvalidInput("LoRA is not enabled on this server (no --lora-dir)", code="unsupportedLora",
                               parameter="lora")
        for index, (model, _) in enumerate(spec.loras):
            from .lora import LoraError, resolve_lora_file  # peft is only imported once LoRAs are used

            try:
                resolve_lora_file(self.config.lora_dir, model)
            except LoraError as exc:
                raise InvalidInput(str(exc), code="invalidLoraModel", parameter=f"lora[{index}].model") from None
        self._check_safety(spec)
        if spec.reference_image is not None and self.config.i2i_path is None:
            raise InvalidInput("this server has no image editing model (start it with --i2i-model)",
                               code="unsupportedReferenceImages", parameter="referenceImages")

    def generate(self, spec: GenerationSpec, on_step: ProgressCallback | None = None) -> GenerationOutput:
        pipe = self.i2i() if spec.reference_image is not None else self.t2i
        manager = self._loras.get(id(pipe))
        if manager is None and spec.loras:
            from .lora import LoraManager

            manager = self._loras[id(pipe)] = LoraManager(pipe, self.config.lora_dir, self.config.max_loras)
        if manager is not None:
            from .lora import LoraError

            try:
                manager.apply(spec.loras)
            except LoraError as exc:
                raise InvalidInput(str(exc), code="invalidLoraModel", parameter="lora") from None
        self._check_safety(spec)  # callers without a worker (`k5serve generate`) never ran check()
        output = pipe.generate(spec, on_step)
        if spec.check_content:
            started = time.perf_counter()
            output.nsfw_scores = self.safety.scores(output.images)
            output.nsfw = self.safety.flags(output.nsfw_scores)
            output.seconds += time.perf_counter() - started  # the check is part of the task's cost
        return output

    def _check_safety(self, spec: GenerationSpec) -> None:
        if spec.check_content and self.safety is None:
            raise InvalidInput("this server has no safety classifier loaded (start it with --safety-model)",
                               code="unsupportedSafety", parameter="safety")

    def memory(self) -> dict[str, int]:
        device = self.t2i._execution_device
        if device.type != "cuda":
            return {}
        import torch

        return {"allocated": torch.cuda.memory_allocated(device),
                "peak_allocated": torch.cuda.max_memory_allocated(device),
                "reserved": torch.cuda.memory_reserved(device)}

    def describe(self) -> dict[str, Any]:
        return {"i2i_model": str(self.config.i2i_path) if self.config.i2i_path else None,
                "i2i_loaded": self._i2i is not None,
                "lora_dir": str(self.config.lora_dir) if self.config.lora_dir else None,
                **(self.safety.describe() if self.safety else {"safety_model": None})}
