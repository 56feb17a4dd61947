"""The content-safety check: an NSFW image classifier run on every output image that asks for it.

Pluggable by design: any `transformers` image-classification checkpoint whose labels include an unsafe
class (`nsfw`, `porn`, `hentai`, `sexy`, `explicit`, `unsafe`) works, loaded with the Auto classes. The
default is Falconsai/nsfw_image_detection (ViT-base, labels normal/nsfw, Apache-2.0); tests use a tiny
randomly initialised ViT of the same class, loaded by the same code.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

log = logging.getLogger("k5serve.safety")

UNSAFE_LABELS = {"nsfw", "porn", "hentai", "sexy", "explicit", "unsafe"}


class SafetyChecker:
    def __init__(self, path: Path, device: torch.device, threshold: float = 0.5):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.path = path
        self.device = device
        self.threshold = threshold
        self.processor = AutoImageProcessor.from_pretrained(path)
        self.model = AutoModelForImageClassification.from_pretrained(path).to(device).eval()
        labels = {int(i): str(name).lower() for i, name in self.model.config.id2label.items()}
        self.unsafe = sorted(i for i, name in labels.items() if name in UNSAFE_LABELS)
        if not self.unsafe:
            raise ValueError(f"{path}: the classifier's labels {sorted(labels.values())} include no unsafe class "
                             f"({', '.join(sorted(UNSAFE_LABELS))})")
        log.info("safety classifier %s on %s (unsafe labels: %s, threshold %.2f)", path, device,
                 [labels[i] for i in self.unsafe], threshold)

    @torch.no_grad()
    def scores(self, images: list[Image.Image]) -> list[float]:
        """The probability of an unsafe label, per image."""
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
        probs = self.model(pixel_values=pixels).logits.float().softmax(-1)
        return [float(p) for p in probs[:, self.unsafe].sum(-1)]

    def flags(self, scores: list[float]) -> list[bool]:
        return [score >= self.threshold for score in scores]

    def describe(self) -> dict:
        return {"safety_model": str(self.path), "safety_threshold": self.threshold}
