"""The generation engine a worker owns: the T2I pipeline, the I2I editing pipeline and their LoRAs.

The I2I pipeline shares the text encoders, tokenizers and VAE with the T2I one (one copy of the 8B
Qwen encoder in memory, not two); only its transformer is loaded separately, at start-up or on the first
editing request, as the operator chooses.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from k5serve.weights.hub import same_component

from .config import EngineConfig, engine_features
from .k5 import K5I2IPipeline, K5T2IPipeline
from .prompt_cache import PromptCache
from .speed import place_with_speed
from .text_encoder_quant import pipeline_quantization
from .worker import GenerationOutput, GenerationSpec, InvalidInput, ProgressCallback

if TYPE_CHECKING:
    from .lora import LoraManager
    from .safety import SafetyChecker

log = logging.getLogger("k5serve.engine")

SHARED = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")


class K5Engine:
    def __init__(self, t2i: K5T2IPipeline, config: EngineConfig = EngineConfig()):
        self.t2i = t2i
        self.config = config
        self._i2i: K5I2IPipeline | None = None
        self._i2i_lock = threading.Lock()
        self._loras: dict[int, LoraManager] = {}
        self.safety: SafetyChecker | None = None
        # One cache for both pipelines (its keys name the pipeline): they share the text encoders.
        self.prompt_cache = PromptCache(config.speed.prompt_cache) if config.speed.prompt_cache else None
        t2i.prompt_cache = self.prompt_cache
        if config.safety_path is not None:
            from .safety import SafetyChecker

            self.safety = SafetyChecker(config.safety_path, t2i._execution_device, config.safety_threshold)
        if config.i2i_path is not None and config.i2i_load == "eager":
            self.i2i()

    @property
    def features(self) -> frozenset[str]:
        return engine_features(self.config)

    def i2i(self) -> K5I2IPipeline:
        with self._i2i_lock:
            if self._i2i is None:
                if self.config.i2i_path is None:  # validation refuses editing without "edit" in features
                    raise RuntimeError("this engine has no image editing model")
                # Reuse the T2I pipeline's encoders, tokenizers and VAE where the checkpoints agree.
                t2i_root = Path(self.t2i.config._name_or_path)
                # (Not under model or sequential offload: diffusers' offload hooks chain one pipeline's
                # components, so the offloaded I2I pipeline keeps its own copies, in host memory. Group offloading
                # and --text-encoder-offload hook each module on its own, so those are shared.)
                can_share = self.config.offload in ("none", "group")
                shared = {name: getattr(self.t2i, name) for name in SHARED
                          if can_share and same_component(t2i_root / name, self.config.i2i_path / name)}
                if len(shared) < len(SHARED) and can_share:
                    log.warning("I2I checkpoint differs in %s: loading its own copy", set(SHARED) - set(shared))
                dtype = self.t2i.transformer.dtype
                quant = self.config.text_encoder_quant if "text_encoder" not in shared else "none"
                device = self.t2i._execution_device
                with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                    pipe = K5I2IPipeline.from_pretrained(
                        self.config.i2i_path, dtype=dtype, quantization_config=pipeline_quantization(quant, dtype),
                        **shared)
                pipe.text_encoder_quant = self.config.text_encoder_quant
                place_with_speed(pipe, self.config.speed, device=device, dtype=dtype,
                                 offload=self.config.offload, text_encoder_offload=self.config.text_encoder_offload)
                pipe.vae.enable_slicing()
                pipe.set_progress_bar_config(disable=True)
                pipe.prompt_cache = self.prompt_cache
                self._i2i = pipe
                log.info("loaded the I2I editing transformer from %s (shared encoders and VAE)",
                         self.config.i2i_path)
            return self._i2i

    def check(self, spec: GenerationSpec) -> None:
        """Cheap checks before queueing: every requested LoRA file exists and is safe to open. (Whether a
        feature is served at all, e.g. LoRA, editing or the safety check, was decided by validation from
        `features`, before any input image was fetched.)"""
        from .lora_files import check_lora_files

        check_lora_files(self.config.lora_dir, spec.loras)

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
        output = pipe.generate(spec, on_step, accel=self.config.accel)
        if spec.check_content:
            started = time.perf_counter()
            output.nsfw_scores = self.safety.scores(output.images)
            output.nsfw = self.safety.flags(output.nsfw_scores)
            output.seconds += time.perf_counter() - started  # the check is part of the task's cost
        return output

    def memory(self) -> dict[str, int]:
        device = self.t2i._execution_device
        if device.type != "cuda":
            return {}
        return {"allocated": torch.cuda.memory_allocated(device),
                "peak_allocated": torch.cuda.max_memory_allocated(device),
                "reserved": torch.cuda.memory_reserved(device)}

    def describe(self) -> dict[str, Any]:
        return {"i2i_model": str(self.config.i2i_path) if self.config.i2i_path else None,
                "i2i_loaded": self._i2i is not None,
                "lora_dir": str(self.config.lora_dir) if self.config.lora_dir else None,
                "prompt_cache_entries": len(self.prompt_cache) if self.prompt_cache else 0,
                **(self.safety.describe() if self.safety else {"safety_model": None})}
