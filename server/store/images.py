"""Generated and uploaded images, by imageUUID, until their TTL runs out: the `ImageStore` interface and the
folder it uses by default (`DirectoryImageStore`). The S3-compatible store is in `s3.py` (boto3: only with an
s3:// image store).

An image is named `<imageUUID>.<ext>`; its expiry time is stored with it (a file's modification time, an
object's metadata), so every front-end that shares the store (an NFS mount, a bucket) reads the same expiry
without an index to keep consistent. Writes are atomic: a reader never sees half an image.
"""

from __future__ import annotations

import errno
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..protocol.errors import StorageFull, StoreUnavailable
from ..protocol.output_formats import MEDIA_TYPES

EXTENSIONS = tuple(MEDIA_TYPES)
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass(frozen=True)
class StoredImage:
    image_uuid: str
    ext: str
    expires_at: float

    @property
    def name(self) -> str:
        return f"{self.image_uuid}.{self.ext}"


@dataclass(frozen=True)
class LiveImage:
    """An image found by name while it lives: a local file (`path`) or a stream of bytes (`chunks`, to be
    read once; `close` releases it)."""

    ext: str
    expires_at: float
    path: Path | None = None
    chunks: Iterator[bytes] | None = None
    size: int | None = None
    close: Callable[[], None] | None = None  # for a stream
    created_at: float | None = None  # when it was stored (the response's Last-Modified)

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.ext]


class ImageStoreError(StoreUnavailable):
    """The image store cannot be reached or written. The message, for clients, says what failed; `detail`,
    for the log and /ready, adds where and the store's own words. A task that meets it fails with
    serviceUnavailable, like one that meets an unreachable database."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


class ImageStoreFull(ImageStoreError, StorageFull):
    """The image store's disk (or quota) is full: the task fails with storageFull."""


def parse_name(name: str) -> tuple[str, str] | None:
    """`<uuid>.<ext>` in its canonical form -> (uuid, ext); anything else (a path, a bad name) -> None, so a
    name from a request never reaches the file system or a bucket key unchecked."""
    stem, _, ext = name.partition(".")
    if ext not in EXTENSIONS:
        return None
    try:
        canonical = str(uuid.UUID(stem))
    except ValueError:
        return None
    return (canonical, ext) if canonical == stem else None


def parse_s3_location(location: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix ending in '/' or empty); ValueError when it is not one."""
    parts = urlsplit(location)
    if parts.scheme != "s3" or not _BUCKET.match(parts.netloc or "") or parts.query or parts.fragment:
        raise ValueError(f"{location!r}: expected s3://bucket/prefix with an S3 bucket name (3-63 characters: "
                         "lower-case letters, digits, '.', '-')")
    prefix = parts.path.strip("/")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(f"{location!r}: the prefix may not have empty, '.' or '..' parts")
    return parts.netloc, f"{prefix}/" if prefix else ""


class ImageStore(ABC):
    """Where images live. Methods block (files, network): async callers run them in a thread."""

    kind: str

    @abstractmethod
    def put(self, data: bytes, ext: str, ttl: float) -> StoredImage:
        """Store `data` under a new imageUUID until `ttl` seconds from now."""

    @abstractmethod
    def delete(self, image: StoredImage) -> None: ...

    @abstractmethod
    def lookup(self, name: str) -> LiveImage | None:
        """`<uuid>.<ext>` -> the image while it lives; None when unknown, expired (then it is removed) or not a
        valid name."""

    @abstractmethod
    def read(self, image_uuid: str) -> bytes | None:
        """The bytes of a live image by imageUUID, whatever its extension (an image input)."""

    @abstractmethod
    def sweep(self) -> int:
        """Delete expired images; returns how many went."""

    @abstractmethod
    def status(self) -> dict:
        """For /ready: at least `kind`, and `problem` (a reason) when the store cannot be written."""

    def url(self, image: StoredImage, base_url: str) -> str:
        """The imageURL of a stored image: served by any front-end at /image/<name>."""
        return f"{base_url.rstrip('/')}/image/{image.name}"


class DirectoryImageStore(ImageStore):
    """One file per image in a folder; the file's modification time is its expiry time. A shared mount
    (NFS and the like) lets several front-ends serve the same files."""

    kind = "directory"

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
        except BaseException as exc:
            tmp.unlink(missing_ok=True)  # disk full, a bad expiry time, ...: leave nothing half-written
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ImageStoreFull("the image store's disk is full", f"{self.root}: {exc}") from None
            if isinstance(exc, OSError):
                raise ImageStoreError("the image store could not be written", f"{self.root}: {exc}") from None
            raise
        return image

    def delete(self, image: StoredImage) -> None:
        (self.root / image.name).unlink(missing_ok=True)

    def lookup(self, name: str) -> LiveImage | None:
        parsed = parse_name(name)
        if parsed is None:
            return None
        path = self.root / f"{parsed[0]}.{parsed[1]}"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        if stat.st_mtime <= time.time():
            path.unlink(missing_ok=True)
            return None
        # The file's mtime is its expiry; its ctime was last set when it was renamed into place, at creation.
        return LiveImage(parsed[1], stat.st_mtime, path=path, size=stat.st_size, created_at=stat.st_ctime)

    def read(self, image_uuid: str) -> bytes | None:
        for ext in EXTENSIONS:
            found = self.lookup(f"{image_uuid}.{ext}")
            if found is not None:
                try:
                    return found.path.read_bytes()
                except FileNotFoundError:  # swept in between
                    return None
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

    def status(self) -> dict:
        writable = os.access(self.root, os.W_OK)
        return {"kind": self.kind, "writable": writable} | (
            {} if writable else {"problem": f"the image store {self.root} is not writable"})
