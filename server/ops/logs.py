"""Structured logs: one JSON object per line, with the taskUUID, the caller and the request id on every line
about a task.

The task comes from `k5serve.logcontext.current_task` and the request from `k5serve.context.current_request`,
which the dispatcher sets around each task's coroutine and the worker around each job, so library and pipeline
lines logged while a task runs carry them too (JSON fields `taskUUID`, `caller`, `requestId`, `transport`; in
text, `[task …, caller …, request …]` at the end). Uvicorn's own loggers go through the same handler. API keys
never reach the logs: the server never logs them, and the formatter masks any configured key that shows up
anyway (e.g. in a query string).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

from k5serve.context import current_request
from k5serve.logcontext import current_task

from ..protocol.wire import encodable


def _task_of(record: logging.LogRecord) -> str | None:
    return getattr(record, "taskUUID", None) or current_task.get()


# In access-log lines, a query string's values are redacted whatever their name (the API uses none).
_QUERY_VALUE = re.compile(r"([?&][^=&\s\"]*=)[^&\s\"]*")


def _secret_pattern(secret: str) -> str:
    """A regex matching `secret` written raw or percent-encoded in any mix (`+` or %20 for a space, either
    hex case), so a key logged in a URL is masked too."""
    parts = []
    for char in secret:
        encoded = "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
        forms = [re.escape(char), re.sub(r"[A-F]", lambda m: f"[{m[0]}{m[0].lower()}]", encoded)]
        if char == " ":
            forms.append(r"\+")
        parts.append(f"(?:{'|'.join(forms)})")
    return "".join(parts)


class _Masking(logging.Formatter):
    """Masks every configured API key, of any length, raw or percent-encoded, in every line; uvicorn's lines
    (HTTP access, WebSocket accepted) also lose their query strings' values."""

    def __init__(self, fmt: str | None = None, secrets: tuple[str, ...] = ()):
        super().__init__(fmt)
        longest_first = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(_secret_pattern, longest_first))) if longest_first else None

    def mask(self, line: str) -> str:
        return self._secrets.sub("***", line) if self._secrets is not None else line

    def message(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name.startswith("uvicorn"):  # access lines, and WebSocket "accepted" lines
            text = _QUERY_VALUE.sub(r"\1***", text)
        return self.mask(text)


class JsonFormatter(_Masking):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self.message(record),
        }
        task = _task_of(record)
        if task:
            entry["taskUUID"] = task
        request = current_request.get()
        if request is not None:
            entry |= request.log_fields()
        if record.exc_info:
            entry["exception"] = self.mask(self.formatException(record.exc_info))
        line = json.dumps(entry, ensure_ascii=False, default=str)
        if not encodable(line):  # a lone surrogate in a message: escape it rather than break the stream
            line = json.dumps(entry, default=str)
        return self.mask(line)


class TextFormatter(_Masking):
    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", secrets)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(logging.makeLogRecord({**record.__dict__, "msg": self.message(record), "args": None}))
        task, request = _task_of(record), current_request.get()
        about = [f"task {task}"] if task and task not in line else []
        if request is not None:
            about += [f"caller {request.caller.name}", f"request {request.request_id}"]
        if about:
            line += f" [{', '.join(about)}]"
        if not encodable(line):  # a lone surrogate: write it as \udXXX rather than fail to write the line
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        return self.mask(line)


def configure(level: str = "info", fmt: str = "json", secrets: tuple[str, ...] = ()) -> None:
    """Route every logger (ours, uvicorn's, libraries', Python warnings) to stderr in one format. With JSON,
    the Hugging Face libraries' progress bars are switched off too (they would break the one-object-per-line
    stream); diffusers reads the same switch in `pipelines.loader`."""
    if fmt == "json":
        from huggingface_hub.utils import disable_progress_bars

        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        disable_progress_bars()  # huggingface_hub may be imported already; transformers asks it at import
    logging.captureWarnings(True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets=secrets) if fmt == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def adopt_library_loggers() -> None:
    """Route torch's, diffusers' and transformers' loggers through the handler `configure` installed: each gives
    its library's root logger a handler of its own, in its own format, and stops its records from reaching the
    root (torchao, for one, warns through torch's when diffusers imports it). Called before the model loads;
    it imports torch and diffusers' and transformers' logging modules (the model needs them anyway)."""
    import torch  # noqa: F401 - its import installs the handler taken away here
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    logger = logging.getLogger("torch")
    logger.handlers.clear()
    logger.propagate = True
    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()
