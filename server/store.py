"""Generated images on disk under the data directory, by imageUUID, until their TTL runs out.

Each image is one file `<imageUUID>.<ext>`; its modification time is set to its expiry time, so the
expiry survives restarts without an index to keep consistent. Files are written to a temporary name and
renamed, so a reader never sees half an image.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

EXTENSIONS = ("jpg", "png", "webp")


@dataclass(frozen=True)
class StoredImage:
    image_uuid: str
    ext: str
    expires_at: float

    @property
    def name(self) -> str:
        return f"{self.image_uuid}.{self.ext}"


class ImageStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, ext: str, ttl: float) -> StoredImage:
        image = StoredImage(str(uuid.uuid4()), ext, time.time() + ttl)
        tmp = self.root / f".{image.name}.tmp"
        try:
            tmp.write_bytes(data)
            os.utime(tmp, (image.expires_at, image.expires_at))
            os.replace(tmp, self.root / image.name)
        except BaseException:
            tmp.unlink(missing_ok=True)  # disk full, a bad expiry time, ...: leave nothing half-written
            raise
        return image

    def delete(self, image: StoredImage) -> None:
        (self.root / image.name).unlink(missing_ok=True)

    def lookup(self, name: str) -> tuple[Path, float] | None:
        """`<uuid>.<ext>` -> (path, expires_at) while it lives. Anything else (a path, a bad name) -> None."""
        stem, _, ext = name.partition(".")
        if ext not in EXTENSIONS:
            return None
        try:
            canonical = str(uuid.UUID(stem))
        except ValueError:
            return None
        if canonical != stem:
            return None
        path = self.root / f"{canonical}.{ext}"
        try:
            expires_at = path.stat().st_mtime
        except FileNotFoundError:
            return None
        if expires_at <= time.time():
            path.unlink(missing_ok=True)
            return None
        return path, expires_at

    def find(self, image_uuid: str) -> Path | None:
        """The live file of an imageUUID, whatever its extension."""
        for ext in EXTENSIONS:
            found = self.lookup(f"{image_uuid}.{ext}")
            if found is not None:
                return found[0]
        return None

    def sweep(self) -> int:
        """Delete expired images (and leftovers of interrupted writes); returns how many went."""
        now, removed = time.time(), 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.is_file():
                    continue
                stale_tmp = entry.name.endswith(".tmp") and entry.stat().st_ctime < now - 3600
                if stale_tmp or (not entry.name.startswith(".") and entry.stat().st_mtime <= now):
                    Path(entry.path).unlink(missing_ok=True)
                    removed += 1
        return removed
