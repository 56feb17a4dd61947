"""The imageUpload task: an image kept on this server (for `upload_ttl`), to be used as an input by
imageUUID."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from k5serve.context import RequestContext

from ..config import ServerConfig
from ..protocol.errors import task_error
from ..protocol.models import ImageUploadTask
from ..protocol.validation import parse
from ..store import executors
from ..store.images import ImageStore
from .input_images import ImageInputError, Limits, decode, load_image_bytes


class ImageUpload:
    def __init__(self, config: ServerConfig, images: ImageStore, limits: Limits,
                 check_room: Callable[[], None] = lambda: None):
        self.config = config
        self.images = images
        self._limits = limits
        self.check_room = check_room  # raises StorageFull while the disk is too full to take an upload

    async def __call__(self, raw: dict[str, Any], ctx: RequestContext) -> list[dict]:
        task = parse(ImageUploadTask, raw)
        self.check_room()
        try:
            data = await load_image_bytes(task.image, self.images, self._limits)
            decoded = await asyncio.to_thread(decode, data, self._limits)
        except ImageInputError as exc:
            raise task_error("invalidImage", f"Invalid value for image parameter: {exc}.", parameter="image",
                             task_type="imageUpload", task_uuid=task.taskUUID) from None
        stored = await executors.images(self.images.put, decoded.data, decoded.ext, self.config.upload_ttl)
        return [{"taskType": "imageUpload", "taskUUID": task.taskUUID, "imageUUID": stored.image_uuid,
                 "imageURL": self.images.url(stored, self.config.public_url or ctx.base_url)}]
