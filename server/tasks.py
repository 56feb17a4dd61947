"""Durable task records: one per taskUUID, behind every delivery mode (sync, async, webhook, WebSocket).

A record moves queued -> running (step k of N) -> success | error and keeps its result items and error
items until it expires. `TaskStore` is the interface; `SQLiteTaskStore` is the single-machine
implementation, `postgres.PostgresTaskStore` the one several front-ends share. A process that dies mid-task
leaves `queued`/`running` records behind: with SQLite, `recover()` at the next start turns them into
errors; with PostgreSQL, `expire_stale()` does once their front-end's heartbeat lapses. Either way a client
polling `getResponse` learns the task failed instead of waiting forever. Calls may block (a database
round trip): the server makes them off the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, SUCCESS, ERROR = "queued", "running", "success", "error"


@dataclass
class TaskRecord:
    task_uuid: str
    task_type: str
    status: str = QUEUED
    step: int = 0
    total_steps: int = 0
    expected_items: int = 1
    items: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    expires_at: float = 0.0

    @property
    def done(self) -> bool:
        return self.status in (SUCCESS, ERROR)

    @property
    def progress(self) -> int:
        """Percent done: steps for running tasks, 100 once finished."""
        if self.done:
            return 100
        return int(100 * self.step / self.total_steps) if self.total_steps else 0


class StoreUnavailable(Exception):
    """A store (the task database, the image store) cannot be reached; the message says why. The task at hand
    fails with it (serviceUnavailable)."""


class SchemaError(Exception):
    """The database holds a schema this version cannot use (one from a newer k5serve)."""


class TaskStore(ABC):
    @abstractmethod
    def create(self, record: TaskRecord) -> bool:
        """Insert a new record; False when the taskUUID is already known (a conflict)."""

    @abstractmethod
    def get(self, task_uuid: str) -> TaskRecord | None: ...

    @abstractmethod
    def update(self, task_uuid: str, **fields: Any) -> None:
        """Set status/step/total_steps/items/errors/expires_at."""

    @abstractmethod
    def progress(self, task_uuid: str, step: int, total: int) -> None:
        """Mark it running at `step` of `total`; never moves a finished task, nor a step backwards (progress
        updates may arrive out of order)."""

    @abstractmethod
    def delete(self, task_uuid: str) -> None: ...

    @abstractmethod
    def recover(self, message: str) -> int:
        """Mark records left queued/running by a dead process as failed; returns how many."""

    @abstractmethod
    def sweep(self) -> int:
        """Delete expired records; returns how many."""

    def heartbeat(self) -> None:
        """Say this process is still running its queued/running tasks (shared stores; called periodically)."""

    def expire_stale(self, message: str) -> int:
        """Fail the queued/running tasks of processes that stopped heartbeating (shared stores); -> how many."""
        return 0

    def close(self) -> None:
        pass


# A record's columns, in every store; the JSON ones hold lists of items.
COLUMNS = ("task_uuid", "task_type", "status", "step", "total_steps", "expected_items", "items", "errors",
            "created_at", "expires_at")
JSON_COLUMNS = {"items", "errors"}


def check_fields(fields: dict[str, Any]) -> None:
    """`TaskStore.update` may set these, and nothing else (never the taskUUID or the taskType)."""
    unknown = set(fields) - set(COLUMNS[2:])
    if unknown:
        raise ValueError(f"unknown task fields {unknown}")


class SQLiteTaskStore(TaskStore):
    """One SQLite file (WAL). Calls are short and serialised by a lock; safe from any thread."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS tasks (task_uuid TEXT PRIMARY KEY, task_type TEXT NOT NULL, "
                "status TEXT NOT NULL, step INTEGER NOT NULL, total_steps INTEGER NOT NULL, "
                "expected_items INTEGER NOT NULL, items TEXT NOT NULL, errors TEXT NOT NULL, "
                "created_at REAL NOT NULL, expires_at REAL NOT NULL)"
            )
            self._db.execute("CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks (expires_at)")

    def create(self, record: TaskRecord) -> bool:
        row = [getattr(record, c) for c in COLUMNS]
        row = [json.dumps(v) if c in JSON_COLUMNS else v for c, v in zip(COLUMNS, row)]
        with self._lock:
            cur = self._db.execute(
                f"INSERT OR IGNORE INTO tasks ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})", row
            )
        return cur.rowcount == 1

    def get(self, task_uuid: str) -> TaskRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(COLUMNS)} FROM tasks WHERE task_uuid = ? AND expires_at > ?",
                (task_uuid, time.time()),
            ).fetchone()
        if row is None:
            return None
        values = {c: (json.loads(v) if c in JSON_COLUMNS else v) for c, v in zip(COLUMNS, row)}
        return TaskRecord(**values)

    def update(self, task_uuid: str, **fields: Any) -> None:
        check_fields(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(v) if k in JSON_COLUMNS else v for k, v in fields.items()]
        with self._lock:
            self._db.execute(f"UPDATE tasks SET {sets} WHERE task_uuid = ?", (*values, task_uuid))

    def progress(self, task_uuid: str, step: int, total: int) -> None:
        with self._lock:
            self._db.execute("UPDATE tasks SET status = ?, step = ?, total_steps = ? WHERE task_uuid = ? AND "
                             "status IN (?, ?) AND step <= ?", (RUNNING, step, total, task_uuid, QUEUED, RUNNING, step))

    def delete(self, task_uuid: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM tasks WHERE task_uuid = ?", (task_uuid,))

    def recover(self, message: str) -> int:
        with self._lock:
            rows = self._db.execute(
                "SELECT task_uuid, task_type FROM tasks WHERE status IN (?, ?)", (QUEUED, RUNNING)
            ).fetchall()
            for task_uuid, task_type in rows:
                error = {"code": "inferenceError", "message": message, "status": ERROR,
                         "taskType": task_type, "taskUUID": task_uuid}
                self._db.execute(
                    "UPDATE tasks SET status = ?, errors = ? WHERE task_uuid = ?",
                    (ERROR, json.dumps([error]), task_uuid),
                )
        return len(rows)

    def sweep(self) -> int:
        with self._lock:
            return self._db.execute("DELETE FROM tasks WHERE expires_at <= ?", (time.time(),)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
