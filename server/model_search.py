"""The modelSearch task: this server hosts one model, found when the search terms match (or are absent)."""

from __future__ import annotations

from typing import Any

from .protocol import MODEL_ID, ModelSearchTask
from .validation import parse

MODEL_NAME = "Kandinsky 5.0 Image Lite"


async def model_search(raw: dict[str, Any], base_url: str) -> list[dict]:
    task = parse(ModelSearchTask, raw)
    terms = (task.search or "").lower().split()
    hit = all(t in f"{MODEL_ID} {MODEL_NAME}".lower() for t in terms)
    model = {"air": MODEL_ID, "name": MODEL_NAME, "version": "1", "category": "checkpoint",
             "architecture": "kandinsky5", "tags": ["text-to-image"], "private": False}
    results = [model] if hit else []
    return [{"taskType": "modelSearch", "taskUUID": task.taskUUID,
             "results": results[task.offset:task.offset + task.limit], "totalResults": len(results)}]
