"""Image inputs as Runware accepts them: a data URI, raw base64, an http(s) URL or a stored imageUUID.

Size limits apply before anything is decoded: the base64 length, the download size, then the pixel
count read from the header (so a small file that would expand into a huge bitmap is refused unread).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import uuid
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from ..outbound.downloads import DownloadError, fetch_bytes
from ..outbound.safe_http import OutboundURLError
from ..store import executors
from ..store.images import ImageStore

ACCEPTED_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "png", "GIF": "png"}
_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?:;[\w=.+-]+)*;base64,(?P<data>.*)$", re.S)


class ImageInputError(Exception):
    """Why an image input was refused; the caller names the parameter."""


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    allow_private_urls: bool = False


@dataclass(frozen=True)
class DecodedImage:
    data: bytes  # bytes to store: the original file, or PNG for formats we do not serve
    ext: str
    width: int
    height: int


async def load_image_bytes(ref: str, store: ImageStore, limits: Limits) -> bytes:
    """The raw file bytes behind an image reference."""
    ref = ref.strip()
    if _is_uuid(ref):
        data = await executors.images(store.read, ref)
        if data is None:
            raise ImageInputError(f"no stored image with imageUUID {ref} (unknown or expired)")
        return data
    if ref.startswith(("http://", "https://")):
        try:
            data, _ = await fetch_bytes(ref, allow_private=limits.allow_private_urls, max_bytes=limits.max_bytes)
        except (OutboundURLError, DownloadError) as exc:
            raise ImageInputError(str(exc)) from None
        return data
    match = _DATA_URI.match(ref)
    payload = match.group("data") if match else ref
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise ImageInputError(f"image is larger than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        what = "data URI" if match else "value"
        raise ImageInputError(f"{what} is not valid base64; expected a data URI, base64, a URL or an "
                              "imageUUID") from None


def _open_checked(data: bytes, limits: Limits) -> Image.Image:
    """Check size, format and pixel count (from the header), then decode fully."""
    if len(data) > limits.max_bytes:
        raise ImageInputError(f"image is larger than {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise ImageInputError(f"unsupported image format {image.format}; use PNG, JPEG or WEBP")
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageInputError(f"image has {width}x{height} pixels; the limit is {limits.max_pixels}")
            image.load()
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, Warning) as exc:
        raise ImageInputError(f"not a readable image ({type(exc).__name__})") from None
    return image


def decode(data: bytes, limits: Limits) -> DecodedImage:
    """An upload as it will be stored (CPU work: run in a thread)."""
    image = _open_checked(data, limits)
    ext = ACCEPTED_FORMATS[image.format]
    if image.format in ("BMP", "GIF"):
        buf = io.BytesIO()
        image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buf, format="PNG")
        data = buf.getvalue()
    return DecodedImage(data, ext, image.width, image.height)


def _is_uuid(value: str) -> bool:
    if len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def nearest_size(width: int, height: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The allowed (width, height) whose aspect ratio is closest to the input's (as the pipelines snap)."""
    return min(sizes, key=lambda s: abs(s[0] / s[1] - width / height))


def prepare(data: bytes, limits: Limits, size: tuple[int, int] | None,
            sizes: tuple[tuple[int, int], ...]) -> Image.Image:
    """Decode an input image for the model: EXIF orientation applied, RGB, centre-cropped to the target
    aspect ratio and resized to the target size (the request's, else the allowed size nearest in aspect).
    Centre-crop rather than stretch, as the official Kandinsky code does. CPU work: run in a thread."""
    image = ImageOps.exif_transpose(_open_checked(data, limits)).convert("RGB")
    width, height = size or nearest_size(image.width, image.height, sizes)
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))
