"""The modelSearch task: this server's one model (category `checkpoint`) and the LoRA files of its LoRA folder
(category `lora`; their `air` is what `lora[].model` takes), filtered by the search terms and the category."""

from __future__ import annotations

import asyncio
from typing import Any

from k5serve.context import RequestContext

from ..protocol.models import MODEL_ID, ModelSearchTask
from ..protocol.validation import parse
from .slot import ModelSlot

MODEL_NAME = "Kandinsky 5.0 Image Lite"
ARCHITECTURE = "kandinsky5"


class ModelSearch:
    def __init__(self, slot: ModelSlot):
        self.slot = slot

    async def __call__(self, raw: dict[str, Any], ctx: RequestContext) -> list[dict]:
        task = parse(ModelSearchTask, raw)
        category = (task.category or "").lower()
        models = []
        if category in ("", "checkpoint"):
            models.append({"air": MODEL_ID, "name": MODEL_NAME, "version": "1", "category": "checkpoint",
                           "architecture": ARCHITECTURE, "tags": ["text-to-image"], "private": False})
        worker = self.slot.worker
        if category in ("", "lora") and worker is not None:
            models += [{"air": name, "name": name, "version": "1", "category": "lora", "architecture": ARCHITECTURE,
                        "tags": ["lora"], "private": False, "defaultWeight": 1.0}
                       for name in await asyncio.to_thread(worker.loras)]
        terms = (task.search or "").lower().split()
        hits = [m for m in models if all(t in f"{m['air']} {m['name']}".lower() for t in terms)]
        return [{"taskType": "modelSearch", "taskUUID": task.taskUUID,
                 "results": hits[task.offset:task.offset + task.limit], "totalResults": len(hits)}]
