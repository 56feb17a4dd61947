"""JSON on the wire, both ways, for every transport: bodies in, answers out, whatever the client sent.

In: `parse` takes any bytes or text and returns the value or raises `InvalidJSON`, never anything else
(the standard parser also raises ValueError for integers over 4,300 digits and RecursionError for deep
nesting; NaN and Infinity are not JSON). Nesting is capped far above any real task, so code that walks a
task recursively never runs out of stack. Out: `dumps` always gives valid UTF-8 JSON, even when a string
we echo holds a lone surrogate (then it is written as an ASCII escape instead of failing).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

MAX_DEPTH = 32  # a task nests 4 levels deep (array, task, inputs, referenceImages); 32 is generous


class InvalidJSON(ValueError):
    """The body or frame is not JSON this server can take; the message says why."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse(data: bytes | str | None) -> Any:
    if not data:
        raise InvalidJSON("it is empty")
    try:
        # Strict UTF-8 (a BOM is dropped): json.loads would also guess UTF-16/32 and let encoded surrogates in.
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise InvalidJSON("it is not UTF-8 text") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise InvalidJSON(f"it nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, over-long integers, NaN/Infinity
        raise InvalidJSON(str(exc)) from None
    if _too_deep(value):
        raise InvalidJSON(f"it nests deeper than {MAX_DEPTH} levels")
    return value


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


_COMPACT = (",", ":")


def dumps(value: Any) -> str:
    """Compact JSON text that always encodes as UTF-8 (a lone surrogate is written as an escape)."""
    text = json.dumps(value, ensure_ascii=False, separators=_COMPACT)
    return text if encodable(text) else json.dumps(value, separators=_COMPACT)


def encode(value: Any) -> bytes:
    """dumps(value) as UTF-8 bytes, encoding the (possibly large) text once."""
    try:
        return json.dumps(value, ensure_ascii=False, separators=_COMPACT).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=_COMPACT).encode("ascii")


def encodable(text: str) -> bool:
    """False for a string holding a lone surrogate, which no UTF-8 encoder can write."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class SharedItem(dict):
    """A result item that several answers send at once (getResponse of one task, asked for again and again):
    its WebSocket frame is encoded once, the first time one is needed, and shared by all of them."""

    __slots__ = ("_frame",)

    def frame(self) -> str:
        try:
            return self._frame
        except AttributeError:
            self._frame = dumps({"data": [self]})
            return self._frame


def data_frame(item: dict) -> str:
    """The frame `{"data": [item]}` (encoded once for a SharedItem)."""
    return item.frame() if isinstance(item, SharedItem) else dumps({"data": [item]})


class WireResponse(JSONResponse):
    """A JSONResponse that never fails to encode what it was given."""

    def render(self, content: Any) -> bytes:
        return encode(content)
