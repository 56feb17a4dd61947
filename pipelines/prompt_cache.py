"""A bounded LRU of the text encoders' outputs, so a prompt seen before (above all the constant negative prompt)
is not encoded again by the 8-billion-parameter Qwen2.5-VL.

The key is everything the output depends on: the pipeline kind (T2I and I2I wrap the prompt in different
templates), the exact prompt text, the device and dtype, the text encoder's quantisation (`--text-encoder-quant`),
and for editing a digest of the reference image's pixels. An entry is one prompt's one-image encoding (the pipeline
repeats it for `numberResults`): about 7 KB per Qwen token in bfloat16, so 256 entries of long prompts (512 tokens)
hold at most about 1 GB of GPU memory (the memory plan counts that most). A hit calls no text encoder, so under
`--offload model` or `--text-encoder-offload` the encoder stays in host memory. The cached tensors are the very ones
`encode_prompt` returned (nothing downstream writes into them), so outputs are byte-identical with and without the
cache.

Written here rather than with `functools.lru_cache`: the key needs the image digest and the counts must be
read per request, and LRU order under a lock is a few lines of `OrderedDict`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from PIL import Image


def image_digest(image: Image.Image | None) -> str | None:
    if image is None:
        return None
    palette = image.getpalette() if image.mode in ("P", "PA") else None  # a palette image's pixels are indices
    return hashlib.sha256(f"{image.mode}{image.size}{palette}".encode() + image.tobytes()).hexdigest()


class PromptCache:
    def __init__(self, capacity: int = 256):
        if capacity < 0:
            raise ValueError("the prompt cache capacity must be 0 or more")
        self.capacity = capacity
        self._entries: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple, encode: Callable[[], Any]) -> tuple[Any, bool]:
        """-> (the cached or freshly encoded value, whether it was a hit)."""
        if self.capacity == 0:
            self.misses += 1
            return encode(), False
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key], True
        value = encode()  # outside the lock: one engine encodes on one thread; the lock only guards the dict
        with self._lock:
            self.misses += 1
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
