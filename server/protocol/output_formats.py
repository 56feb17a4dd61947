"""Turning a generated PIL image into the requested file format."""

from __future__ import annotations

import io

from PIL import Image

# outputFormat -> (PIL format, file extension, media type)
FORMATS = {
    "JPG": ("JPEG", "jpg", "image/jpeg"),
    "PNG": ("PNG", "png", "image/png"),
    "WEBP": ("WEBP", "webp", "image/webp"),
}
MEDIA_TYPES = {ext: mime for _, ext, mime in FORMATS.values()}


def encode(image: Image.Image, output_format: str, quality: int) -> tuple[bytes, str, str]:
    """-> (bytes, extension, media type). PNG is lossless and ignores quality; the bytes are deterministic."""
    pil_format, ext, mime = FORMATS[output_format]
    buf = io.BytesIO()
    if pil_format == "PNG":
        image.save(buf, format="PNG")
    else:
        image.convert("RGB").save(buf, format=pil_format, quality=quality)
    return buf.getvalue(), ext, mime
