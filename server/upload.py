"""The imageUpload task: an image kept on this server (for `upload_ttl`), to be used as an input by
imageUUID."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from . import executors
from .config import ServerConfig
from .images import ImageInputError, Limits, decode, load_image_bytes
from .protocol import ImageUploadTask, task_error
from .store import ImageStore
from .validation import parse


class ImageUpload:
    def __init__(self, config: ServerConfig, images: ImageStore, limits: Limits,
                 low_disk: Callable[[], str | None] = lambda: None):
        self.config = config
        self.images = images
        self._limits = limits
        self.low_disk = low_disk  # why the disk is too full to take an upload now, or None

    async def __call__(self, raw: dict[str, Any], base_url: str) -> list[dict]:
        task = parse(ImageUploadTask, raw)
        if self.low_disk():
            raise task_error("storageFull", f"This server is low on disk space ({self.low_disk()}); retry later.",
                             task_type="imageUpload", task_uuid=task.taskUUID, http_status=503)
        try:
            data = await load_image_bytes(task.image, self.images, self._limits)
            decoded = await asyncio.to_thread(decode, data, self._limits)
        except ImageInputError as exc:
            raise task_error("invalidImage", f"Invalid value for image parameter: {exc}.", parameter="image",
                             task_type="imageUpload", task_uuid=task.taskUUID) from None
        stored = await executors.images(self.images.put, decoded.data, decoded.ext, self.config.upload_ttl)
        return [{"taskType": "imageUpload", "taskUUID": task.taskUUID, "imageUUID": stored.image_uuid,
                 "imageURL": self.images.url(stored, self.config.public_url or base_url)}]
