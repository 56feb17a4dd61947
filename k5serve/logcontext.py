"""The task a log line is about: set by the dispatcher (per task coroutine) and the worker (per job thread),
read by the server's JSON log formatter, so every line about a task carries its taskUUID."""

from __future__ import annotations

import contextvars

current_task: contextvars.ContextVar[str | None] = contextvars.ContextVar("k5serve_task", default=None)
