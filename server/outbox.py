"""The `Outbox` delivers webhooks (POST, JSON) and uploads (PUT, raw bytes) in the background, with retries
and exponential backoff, from a SQLite file so that a restart resumes pending deliveries. Delivery is at
least once: an entry is deleted only after a 2xx, so a delivery cut short by a shutdown is sent again.
Use one Outbox per database file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from k5serve.logcontext import current_task

from .safe_http import OutboundURLError, origin_of, parse_url, redact, safe_client

log = logging.getLogger("k5serve.outbound")

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
_METHODS = {"webhook": "POST", "upload": "PUT"}


class Outbox:
    """Background delivery of webhooks and uploads, persisted in SQLite, with retries and backoff.

    enqueue_* only insert a row and wake the loop; they may be called from any thread, before or after
    start(). Up to `concurrency` deliveries run at once, at most `per_origin` of them to one
    scheme://host:port, so one slow receiver cannot hold up the others. A failed attempt (connection
    error, timeout, non-2xx, including a redirect, which is never followed) is retried after
    initial_delay, doubling up to max_delay, with ±10 % jitter, until retry_for seconds after enqueue;
    then the entry is dropped with a warning. A URL refused by the policy is dropped at once. An entry
    found past its deadline after a restart gets one last attempt.
    """

    def __init__(self, path: Path, *, allow_private: bool, retry_for: float = 600.0, initial_delay: float = 1.0,
                 max_delay: float = 60.0, timeout: float = 10.0, concurrency: int = 8, per_origin: int = 4):
        self.path = Path(path)
        self.allow_private = allow_private
        self.retry_for = retry_for
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.concurrency = concurrency
        self.per_origin = per_origin
        self.stats: dict[str, dict[str, int]] = {k: {"delivered": 0, "retried": 0, "failed": 0} for k in KINDS}
        self._db_lock = threading.Lock()  # enqueue may come from worker threads
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        if "task_uuid" not in {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}:
            self._db.execute("ALTER TABLE outbox ADD COLUMN task_uuid TEXT")  # a file from an older version
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None      # new entries or a free slot: look for due entries
        self._progress: asyncio.Event | None = None  # an entry was delivered or dropped: flush() rechecks
        self._scheduler: asyncio.Task | None = None
        self._inflight: dict[int, tuple[str, asyncio.Task]] = {}  # id -> (origin, delivery task)
        self._client: httpx.AsyncClient | None = None

    # -- public API

    def enqueue_webhook(self, url: str, body: dict, task_uuid: str | None = None) -> None:
        """Queue one POST of `body` as JSON to `url`."""
        self._enqueue("webhook", url, json.dumps(body).encode(), "application/json", task_uuid)

    def enqueue_upload(self, url: str, data: bytes, content_type: str, task_uuid: str | None = None) -> None:
        """Queue one PUT of the raw bytes `data` with `content_type` to `url`."""
        self._enqueue("upload", url, bytes(data), content_type, task_uuid)

    async def start(self) -> None:
        """Start the delivery loop on the running event loop; pending entries from the file are resumed."""
        if self._scheduler is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake, self._progress = asyncio.Event(), asyncio.Event()
        self._client = safe_client(self.allow_private, self.timeout, max(16, self.concurrency))
        self._scheduler = asyncio.create_task(self._schedule(), name="k5serve-outbox")
        n = self.pending()
        if n:
            log.info("outbox: resuming %d pending deliveries", n)

    def pending(self) -> int:
        """Number of entries not yet delivered or dropped (including those in flight)."""
        with self._db_lock:
            return self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]

    async def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty or `timeout` seconds pass; True if it is empty."""
        if self._progress is None:
            return self.pending() == 0
        try:
            async with asyncio.timeout(timeout):
                while self.pending():
                    self._progress.clear()
                    if self.pending():
                        await self._progress.wait()
        except TimeoutError:
            pass
        return self.pending() == 0

    async def close(self) -> None:
        """Stop delivering; entries not yet delivered stay in the file for the next start."""
        tasks = [t for t in (self._scheduler, *(t for _, t in self._inflight.values())) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._scheduler, self._inflight = None, {}
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        with self._db_lock:
            self._db.close()

    # -- internals

    def _enqueue(self, kind: str, url: str, body: bytes, content_type: str, task_uuid: str | None) -> None:
        now = time.time()
        with self._db_lock:
            self._db.execute(
                "INSERT INTO outbox (kind, url, body, content_type, created, next_at, task_uuid) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (kind, url, body, content_type, now, now, task_uuid),
            )
        self._notify(self._wake)

    def _notify(self, event: asyncio.Event | None) -> None:
        if event is None or self._loop is None or self._loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            event.set()
        else:
            self._loop.call_soon_threadsafe(event.set)

    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            with self._db_lock:
                due = self._db.execute(
                    "SELECT id, kind, url, content_type, created, attempts, task_uuid FROM outbox "
                    "WHERE next_at <= ? ORDER BY next_at LIMIT 1000", (now,)).fetchall()
                later = self._db.execute("SELECT MIN(next_at) FROM outbox WHERE next_at > ?", (now,)).fetchone()[0]
            per_origin = Counter(origin for origin, _ in self._inflight.values())
            for entry in due:
                if len(self._inflight) >= self.concurrency:
                    break
                id_, origin = entry[0], origin_of(entry[2])
                if id_ in self._inflight or per_origin[origin] >= self.per_origin:
                    continue  # a slow receiver may not take every slot; it is picked up when one frees
                per_origin[origin] += 1
                self._inflight[id_] = (origin, asyncio.create_task(self._deliver(*entry)))
            try:  # until the next retry is due, an enqueue, or a delivery freeing a slot
                async with asyncio.timeout(None if later is None else later - now):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _deliver(self, id_: int, kind: str, url: str, content_type: str, created: float,
                       attempts: int, task_uuid: str | None) -> None:
        current_task.set(task_uuid)  # this delivery runs as its own asyncio task: its lines name the task
        where = redact(url)
        try:
            with self._db_lock:
                body = self._db.execute("SELECT body FROM outbox WHERE id = ?", (id_,)).fetchone()[0]
            error = await self._attempt(kind, url, body, content_type)
            if error is None:
                self._remove(id_)
                self.stats[kind]["delivered"] += 1
                log.debug("outbox: %s to %s delivered after %d attempts", kind, where, attempts + 1)
            elif isinstance(error, OutboundURLError):
                self._remove(id_)
                self.stats[kind]["failed"] += 1
                log.warning("outbox: %s to %s refused by the URL policy, dropped: %s", kind, where, error)
            else:
                delay = min(self.max_delay, self.initial_delay * 2 ** attempts) * random.uniform(0.9, 1.1)
                next_at = time.time() + delay
                if next_at > created + self.retry_for:
                    self._remove(id_)
                    self.stats[kind]["failed"] += 1
                    log.warning("outbox: %s to %s given up after %d attempts in %.0f s: %s",
                                kind, where, attempts + 1, time.time() - created, error)
                else:
                    with self._db_lock:
                        self._db.execute("UPDATE outbox SET attempts = ?, next_at = ? WHERE id = ?",
                                         (attempts + 1, next_at, id_))
                    self.stats[kind]["retried"] += 1
                    log.info("outbox: %s to %s failed (%s), retry in %.1f s", kind, where, error, delay)
        except Exception:
            log.exception("outbox: unexpected error delivering %s to %s", kind, where)
        finally:
            self._inflight.pop(id_, None)
            self._wake.set()

    async def _attempt(self, kind: str, url: str, body: bytes, content_type: str) -> Exception | str | None:
        """One request; None on 2xx, else the error (an exception, or a short text for a non-2xx)."""
        try:
            parse_url(url, "uploadEndpoint" if kind == "upload" else "webhookURL")
            async with asyncio.timeout(self.timeout):
                response = await self._client.request(
                    _METHODS[kind], url, content=body, headers={"Content-Type": content_type})
        except OutboundURLError as exc:
            return exc
        except TimeoutError:
            return f"timed out after {self.timeout:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except Exception as exc:  # e.g. a header httpx cannot encode: back off like any failure, never spin
            log.exception("outbox: unexpected error sending %s to %s", kind, redact(url))
            return f"{type(exc).__name__}: {exc}"
        return None if response.is_success else f"HTTP {response.status_code}"

    def _remove(self, id_: int) -> None:
        with self._db_lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (id_,))
        self._progress.set()
