"""Operator settings of a running server (the CLI fills them in)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path(".k5serve")
    api_keys: tuple[str, ...] = ()  # empty = open access
    public_url: str | None = None  # base for image URLs; default: the request's own scheme://host
    model_aliases: tuple[str, ...] = ()  # extra model ids accepted as this model
    image_ttl: int = 86400  # seconds an image is kept when the request gives no ttl
    max_body_bytes: int = 64 * 1024 * 1024  # base64 images travel inline
    price_per_gpu_hour: float = 2.0  # USD; cost = busy seconds x price / 3600
    sweep_interval: float = 30.0  # seconds between expired-image sweeps
    retry_after: int = 5  # seconds suggested to clients when the queue is full
    extra: dict = field(default_factory=dict)

    @property
    def image_dir(self) -> Path:
        return self.data_dir / "images"
