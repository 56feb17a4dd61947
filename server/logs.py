"""Structured logs: one JSON object per line, with the taskUUID on every line about a task.

The task comes from `pipelines.logcontext.current_task`, which the dispatcher sets around each task's
coroutine and the worker around each job, so library and pipeline lines logged while a task runs carry it
too. Uvicorn's own loggers go through the same handler. API keys never reach the logs: the server never
logs them, and the formatter masks any configured key that shows up anyway (e.g. in a query string).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from pipelines.logcontext import current_task


def _task_of(record: logging.LogRecord) -> str | None:
    return getattr(record, "taskUUID", None) or current_task.get()


class _Masking(logging.Formatter):
    def __init__(self, fmt: str | None = None, secrets: tuple[str, ...] = ()):
        super().__init__(fmt)
        self.secrets = tuple(s for s in secrets if len(s) >= 8)  # masking a 1-letter "key" would mangle lines

    def mask(self, line: str) -> str:
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return line


class JsonFormatter(_Masking):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        task = _task_of(record)
        if task:
            entry["taskUUID"] = task
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self.mask(json.dumps(entry, ensure_ascii=False, default=str))


class TextFormatter(_Masking):
    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", secrets)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        task = _task_of(record)
        if task and task not in line:
            line += f" [task {task}]"
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
