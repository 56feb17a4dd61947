"""The outbox's entries: webhooks (POST, JSON) and uploads (PUT, raw bytes) waiting to be delivered.

`OutboxStore` is the interface; `SQLiteOutboxStore` is one file for one process, `postgres.PostgresOutboxStore`
the one several front-ends share (each entry claimed by one of them at a time). The delivery loop that
reads them is `outbound.outbox.Outbox`.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import NamedTuple

import httpx

from .task_records import sqlite_run

KINDS = ("webhook", "upload")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,            -- 'webhook' (POST) or 'upload' (PUT)
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    content_type TEXT NOT NULL,
    created REAL NOT NULL,         -- wall-clock time of enqueue; retries stop retry_for after it
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,         -- wall-clock time of the next attempt
    task_uuid TEXT                 -- the task it delivers for: its log lines carry it
)"""


class OutboxEntry(NamedTuple):
    id: int
    kind: str
    url: str
    content_type: str
    created: float
    attempts: int
    task_uuid: str | None


class OutboxStore(ABC):
    """Where outbox entries wait. Calls may block (run them off the event loop); a store that cannot reach its
    database raises StoreUnavailable."""

    #: seconds between looks for due entries that nobody woke this process for (entries of other processes)
    poll_interval: float | None = None

    @abstractmethod
    def add(self, kind: str, url: str, body: bytes, content_type: str, task_uuid: str | None) -> None: ...

    @abstractmethod
    def claim(self, limit: int, exclude: set[int], busy: set[str], now: float) -> list[OutboxEntry]:
        """Up to `limit` entries due at `now`, oldest first, now this process's to deliver until they are removed,
        rescheduled or released; none in `exclude` (being delivered here) nor to an origin in `busy` (at its
        per-origin limit here)."""

    def release(self, ids: list[int]) -> None:
        """Give back claimed entries this process will not deliver now."""

    @abstractmethod
    def next_due(self, now: float) -> float | None:
        """The earliest next_at after `now` (None: none). With the `now` that `claim` was given, every entry is
        either claimed or counted here: none falls between the two looks."""

    @abstractmethod
    def body(self, id_: int) -> bytes: ...

    @abstractmethod
    def reschedule(self, id_: int, attempts: int, next_at: float) -> None: ...

    @abstractmethod
    def remove(self, id_: int) -> None: ...

    @abstractmethod
    def pending(self) -> int:
        """Entries not yet delivered or dropped (those in flight included)."""

    def close(self) -> None:
        pass


class SQLiteOutboxStore(OutboxStore):
    """One SQLite file (WAL), one process; calls are short and serialised by a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()  # enqueue may come from worker threads
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        if "task_uuid" not in {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}:
            self._db.execute("ALTER TABLE outbox ADD COLUMN task_uuid TEXT")  # a file from an older version
        self._run = functools.partial(sqlite_run, self._db, self._lock, "the outbox")

    def add(self, kind: str, url: str, body: bytes, content_type: str, task_uuid: str | None) -> None:
        now = time.time()
        self._run("INSERT INTO outbox (kind, url, body, content_type, created, next_at, task_uuid) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?)", (kind, url, body, content_type, now, now, task_uuid))

    def claim(self, limit: int, exclude: set[int], busy: set[str], now: float) -> list[OutboxEntry]:
        # one process: what it is delivering (`exclude`) is the only claim there is
        rows = self._run("SELECT id, kind, url, content_type, created, attempts, task_uuid FROM outbox "
                         "WHERE next_at <= ? ORDER BY next_at LIMIT 1000", (now,), "all")
        entries = (OutboxEntry(*row) for row in rows if row[0] not in exclude and origin_of(row[2]) not in busy)
        return [entry for entry, _ in zip(entries, range(limit))]

    def next_due(self, now: float) -> float | None:
        return self._run("SELECT MIN(next_at) FROM outbox WHERE next_at > ?", (now,), "one")[0]

    def body(self, id_: int) -> bytes:
        row = self._run("SELECT body FROM outbox WHERE id = ?", (id_,), "one")
        return row[0] if row else b""

    def reschedule(self, id_: int, attempts: int, next_at: float) -> None:
        self._run("UPDATE outbox SET attempts = ?, next_at = ? WHERE id = ?", (attempts, next_at, id_))

    def remove(self, id_: int) -> None:
        self._run("DELETE FROM outbox WHERE id = ?", (id_,))

    def pending(self) -> int:
        return self._run("SELECT COUNT(*) FROM outbox", (), "one")[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def origin_of(url: str) -> str:
    try:
        u = httpx.URL(url)
        return f"{u.scheme}://{u.host}:{u.port}"
    except (httpx.InvalidURL, TypeError):
        return ""
