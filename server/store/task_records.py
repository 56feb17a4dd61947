"""Durable task records: one per taskUUID, behind every delivery mode (sync, async, webhook, WebSocket).

A record moves queued -> running (step k of N) -> success | error and keeps its result items and error
items until it expires. A finished record is final: no later update changes it (a write that comes late,
from a front-end thought gone, changes nothing and says so). `TaskStore` is the interface;
`SQLiteTaskStore` is the single-machine implementation, `postgres.PostgresTaskStore` the one several
front-ends share. A process that dies mid-task leaves `queued`/`running` records behind: with SQLite,
`recover()` at the next start turns them into errors; with PostgreSQL, `expire_stale()` does once their
front-end is gone. Either way a client polling `getResponse` learns the task failed instead of waiting
forever, and one waiting for a webhook gets the error webhook (the record keeps its `webhook_url` for
that). Calls may block (a database round trip): the server makes them off the event loop.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..protocol.errors import StorageFull, StoreUnavailable

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
    webhook_url: str | None = None  # where its error goes if another front-end or a restart fails it
    caller: str | None = None  # who sent it (`k5serve.context.Caller.name`); None on records older than that

    @property
    def done(self) -> bool:
        return self.status in (SUCCESS, ERROR)

    @property
    def progress(self) -> int:
        """Percent done: steps for running tasks, 100 once finished."""
        if self.done:
            return 100
        return int(100 * self.step / self.total_steps) if self.total_steps else 0


class TaskStore(ABC):
    @abstractmethod
    def create(self, record: TaskRecord) -> bool:
        """Insert a new record; False when the taskUUID is already known (a conflict)."""

    @abstractmethod
    def get(self, task_uuid: str) -> TaskRecord | None: ...

    @abstractmethod
    def update(self, task_uuid: str, **fields: Any) -> bool:
        """Set status/step/total_steps/items/errors/expires_at of a task still queued or running; False when it
        had finished already (its status is final) or is gone."""

    @abstractmethod
    def progress(self, task_uuid: str, step: int, total: int) -> None:
        """Mark it running at `step` of `total`; never moves a finished task, nor a step backwards (progress
        updates may arrive out of order)."""

    @abstractmethod
    def delete(self, task_uuid: str) -> None: ...

    @abstractmethod
    def recover(self, message: str) -> list[TaskRecord]:
        """Mark records left queued/running by a dead process as failed; returns them, failed (their error
        webhooks are for the calling code to send)."""

    @abstractmethod
    def sweep(self) -> int:
        """Delete expired records; returns how many."""

    @abstractmethod
    def add_usage(self, usage: Usage) -> None:
        """Enter a finished imageInference in the usage ledger (once per taskUUID: a second entry is ignored)."""

    @abstractmethod
    def usage(self, since: float, caller: str | None = None) -> dict[str, dict[str, float]]:
        """Per caller (only `caller`'s when given): what the tasks that finished since `since` (Unix time) used:
        tasks, images, failures, generation seconds and cost (USD)."""

    def heartbeat(self) -> None:
        """Say this process is still running its queued/running tasks (shared stores; called periodically)."""

    def expire_stale(self, message: str) -> int:
        """Fail the queued/running tasks of processes that are gone (shared stores), and queue their error
        webhooks with them; -> how many."""
        return 0

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Usage:
    """One finished imageInference in the usage ledger. The ledger outlives the records (their TTL is the
    results'): it is kept `USAGE_DAYS` days, so usage can be asked for over months."""

    task_uuid: str
    caller: str | None
    finished_at: float
    failed: bool
    images: int
    seconds: float  # worker time (the accelerator busy with it)
    cost: float  # USD, as includeCost computes it


USAGE_DAYS = 400
USAGE_SUMS = ("COUNT(*), SUM(images), SUM(CASE WHEN failed THEN 1 ELSE 0 END), SUM(seconds), SUM(cost)")


def usage_totals(rows: list[tuple]) -> dict[str, dict[str, float]]:
    """(caller, tasks, images, failures, seconds, cost) rows as the per-caller dict `TaskStore.usage` returns."""
    return {caller or "": {"tasks": int(n), "images": int(images or 0), "failures": int(failed or 0),
                           "generationSeconds": round(float(seconds or 0), 3), "costUSD": round(float(cost or 0), 6)}
            for caller, n, images, failed, seconds, cost in rows}


# A record's columns, in every store; the JSON ones hold lists of items.
COLUMNS = ("task_uuid", "task_type", "status", "step", "total_steps", "expected_items", "items", "errors",
           "created_at", "expires_at", "webhook_url", "caller")
UPDATABLE = frozenset(COLUMNS[2:10])  # what `update` may set: never the ids, the webhook or the caller
JSON_COLUMNS = {"items", "errors"}


def check_fields(fields: dict[str, Any]) -> None:
    """`TaskStore.update` may set `UPDATABLE`, and nothing else."""
    unknown = set(fields) - UPDATABLE
    if unknown:
        raise ValueError(f"unknown task fields {unknown}")


def sqlite_run(db: sqlite3.Connection, lock: threading.Lock, what: str, sql: str, params: Any = (),
               fetch: str | None = None) -> Any:
    """One statement on `db` under `lock` -> its rows ("all"), first row ("one") or row count. A SQLite error
    becomes the store error it means: a full disk is named (`StorageFull`); anything else makes the store
    unavailable for this call. (`what`: "the task database", "the outbox".)"""
    try:
        with lock:
            cur = db.execute(sql, params)
            return cur.fetchall() if fetch == "all" else cur.fetchone() if fetch == "one" else cur.rowcount
    except sqlite3.Error as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:
            raise StorageFull(f"{what} could not be written: the disk is full") from None
        raise StoreUnavailable(f"{what} failed ({type(exc).__name__}: {exc})") from None


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
                "created_at REAL NOT NULL, expires_at REAL NOT NULL, webhook_url TEXT, caller TEXT)"
            )
            have = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
            for column in ("webhook_url", "caller"):  # a file from an older version: the columns it lacks
                if column not in have:
                    self._db.execute(f"ALTER TABLE tasks ADD COLUMN {column} TEXT")
            self._db.execute("CREATE INDEX IF NOT EXISTS tasks_expiry ON tasks (expires_at)")
            self._db.execute("CREATE TABLE IF NOT EXISTS usage (task_uuid TEXT PRIMARY KEY, caller TEXT, "
                             "finished_at REAL NOT NULL, failed INTEGER NOT NULL, images INTEGER NOT NULL, "
                             "seconds REAL NOT NULL, cost REAL NOT NULL)")
            self._db.execute("CREATE INDEX IF NOT EXISTS usage_time ON usage (finished_at)")
        self._run = functools.partial(sqlite_run, self._db, self._lock, "the task database")

    def create(self, record: TaskRecord) -> bool:
        row = [getattr(record, c) for c in COLUMNS]
        row = [json.dumps(v) if c in JSON_COLUMNS else v for c, v in zip(COLUMNS, row)]
        return self._run(f"INSERT OR IGNORE INTO tasks ({', '.join(COLUMNS)}) VALUES "
                         f"({', '.join('?' * len(COLUMNS))})", row) == 1

    def get(self, task_uuid: str) -> TaskRecord | None:
        row = self._run(f"SELECT {', '.join(COLUMNS)} FROM tasks WHERE task_uuid = ? AND expires_at > ?",
                        (task_uuid, time.time()), "one")
        return None if row is None else _record(row)

    def update(self, task_uuid: str, **fields: Any) -> bool:
        check_fields(fields)
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(v) if k in JSON_COLUMNS else v for k, v in fields.items()]
        return self._run(f"UPDATE tasks SET {sets} WHERE task_uuid = ? AND status IN (?, ?)",
                         (*values, task_uuid, QUEUED, RUNNING)) == 1

    def progress(self, task_uuid: str, step: int, total: int) -> None:
        self._run("UPDATE tasks SET status = ?, step = ?, total_steps = ? WHERE task_uuid = ? AND status IN (?, ?) "
                  "AND step <= ?", (RUNNING, step, total, task_uuid, QUEUED, RUNNING, step))

    def delete(self, task_uuid: str) -> None:
        self._run("DELETE FROM tasks WHERE task_uuid = ?", (task_uuid,))

    def recover(self, message: str) -> list[TaskRecord]:
        rows = self._run(f"SELECT {', '.join(COLUMNS)} FROM tasks WHERE status IN (?, ?)", (QUEUED, RUNNING), "all")
        lost = []
        for row in rows:
            record = _record(row)
            record.status = ERROR
            record.errors = [lost_error(record, message)]
            if self.update(record.task_uuid, status=ERROR, errors=record.errors):
                lost.append(record)
        return lost

    def sweep(self) -> int:
        self._run("DELETE FROM usage WHERE finished_at < ?", (time.time() - USAGE_DAYS * 86400,))
        return self._run("DELETE FROM tasks WHERE expires_at <= ?", (time.time(),))

    def add_usage(self, usage: Usage) -> None:
        self._run("INSERT OR IGNORE INTO usage VALUES (?, ?, ?, ?, ?, ?, ?)",
                  (usage.task_uuid, usage.caller, usage.finished_at, int(usage.failed), usage.images, usage.seconds,
                   usage.cost))

    def usage(self, since: float, caller: str | None = None) -> dict[str, dict[str, float]]:
        where, params = ("finished_at >= ?", [since]) if caller is None else (
            "finished_at >= ? AND caller = ?", [since, caller])
        return usage_totals(self._run(f"SELECT caller, {USAGE_SUMS} FROM usage WHERE {where} GROUP BY caller",
                                      params, "all"))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: tuple) -> TaskRecord:
    return TaskRecord(**{c: (json.loads(v) if c in JSON_COLUMNS else v) for c, v in zip(COLUMNS, row)})


def recorded_error(item: dict[str, Any], http_status: int) -> dict[str, Any]:
    """An error item as records keep it: with `status` and the `httpStatus` getResponse answers with."""
    return item | {"status": ERROR, "httpStatus": http_status}


def lost_error(record: TaskRecord, message: str) -> dict[str, Any]:
    """The recorded error of a task whose process stopped before it finished."""
    return recorded_error({"code": "inferenceError", "message": message, "taskType": record.task_type,
                           "taskUUID": record.task_uuid}, 500)


def webhook_error(recorded: dict[str, Any]) -> dict[str, Any]:
    """A recorded error as its webhook sends it: `{"errors": [item]}`, without the record's own fields."""
    item = {k: v for k, v in recorded.items() if k not in ("status", "httpStatus")}
    return {"errors": [item]}
