"""The `Outbox` delivers webhooks (POST, JSON) and uploads (PUT, raw bytes) in the background, with retries
and exponential backoff, from a durable store so that a restart resumes pending deliveries. Delivery is at
least once: an entry is deleted only after a 2xx, so a delivery cut short by a shutdown is sent again.

Entries live behind `store.outbox.OutboxStore`: `SQLiteOutboxStore` (one file, one process: use one Outbox per
file) or `store.postgres.PostgresOutboxStore` (shared by several front-ends, each entry claimed by one of them
at a time).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

import httpx

from k5serve.logcontext import current_task

from ..protocol.errors import StoreUnavailable
from ..store import executors
from ..store.outbox import KINDS, OutboxStore, SQLiteOutboxStore, origin_of
from .safe_http import OutboundURLError, parse_url, redact, safe_client

log = logging.getLogger("k5serve.outbound")

_METHODS = {"webhook": "POST", "upload": "PUT"}

class Outbox:
    """Background delivery of webhooks and uploads from an `OutboxStore`, with retries and backoff.

    enqueue_* only insert an entry and wake the loop; they may be called from any thread, before or after
    start(). Up to `concurrency` deliveries run at once, at most `per_origin` of them to one
    scheme://host:port, so one slow receiver cannot hold up the others. A failed attempt (connection
    error, timeout, non-2xx, including a redirect, which is never followed) is retried after
    initial_delay, doubling up to max_delay, with ±10 % jitter, until retry_for seconds after enqueue;
    then the entry is dropped with a warning. A URL refused by the policy is dropped at once. An entry
    found past its deadline after a restart gets one last attempt. `store` is an OutboxStore or the path of
    a SQLite file.
    """

    def __init__(self, store: OutboxStore | Path, *, allow_private: bool, retry_for: float = 600.0,
                 initial_delay: float = 1.0, max_delay: float = 60.0, timeout: float = 10.0, concurrency: int = 8,
                 per_origin: int = 4):
        self.store = store if isinstance(store, OutboxStore) else SQLiteOutboxStore(store)
        self.allow_private = allow_private
        self.retry_for = retry_for
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.timeout = timeout
        self.concurrency = concurrency
        self.per_origin = per_origin
        self.stats: dict[str, dict[str, int]] = {k: {"delivered": 0, "retried": 0, "failed": 0} for k in KINDS}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None      # new entries or a free slot: look for due entries
        self._progress: asyncio.Event | None = None  # an entry left the store or a delivery ended: flush() rechecks
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
        self._scheduler.add_done_callback(_report_stop)
        n = self.pending()
        if n:
            log.info("outbox: resuming %d pending deliveries", n)

    def pending(self) -> int:
        """Number of entries not yet delivered or dropped (including those in flight)."""
        return self.store.pending()

    async def flush(self, timeout: float) -> bool:
        """Wait until the outbox is empty or `timeout` seconds pass; True if it is empty."""
        try:
            if self._progress is None:
                return self.pending() == 0
            try:  # an entry leaves the store before its delivery has finished counting: wait for both
                async with asyncio.timeout(timeout):
                    while self._inflight or self.pending():
                        self._progress.clear()
                        if self._inflight or self.pending():
                            await self._progress.wait()
            except TimeoutError:
                pass
            return not self._inflight and self.pending() == 0
        except StoreUnavailable:  # the entries stay where they are, for the next start
            return False

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
        self.store.close()

    # -- internals

    def _enqueue(self, kind: str, url: str, body: bytes, content_type: str, task_uuid: str | None) -> None:
        self.store.add(kind, url, body, content_type, task_uuid)
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
            again = await self._start_due(now)
            if again:
                continue
            try:
                later = await executors.database(self.store.next_due, now)
            except StoreUnavailable:
                later = None
            wait = None if later is None else later - time.time()
            if self.store.poll_interval is not None:
                wait = self.store.poll_interval if wait is None else min(wait, self.store.poll_interval)
            try:  # until the next retry is due, an enqueue, or a delivery freeing a slot
                async with asyncio.timeout(None if wait is None else max(0.0, wait)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _start_due(self, now: float) -> bool:
        """Claim due entries for the free slots and start them; True when an origin filled up on the way
        (its extra entries were given back), so that another look may find entries to other origins."""
        free = self.concurrency - len(self._inflight)
        if free <= 0:
            return False
        per_origin = Counter(origin for origin, _ in self._inflight.values())
        busy = {origin for origin, n in per_origin.items() if n >= self.per_origin}
        try:
            due = await executors.database(self.store.claim, free, set(self._inflight), busy, now)
        except StoreUnavailable as exc:  # the database is away: the next look (poll or wake) tries again
            log.warning("outbox: %s", exc)
            return False
        skipped = []
        for entry in due:
            origin = origin_of(entry.url)
            if per_origin[origin] >= self.per_origin:
                skipped.append(entry.id)  # a slow receiver may not take every slot; picked up when one frees
                continue
            per_origin[origin] += 1
            self._inflight[entry.id] = (origin, asyncio.create_task(self._deliver(*entry)))
        if skipped:
            await executors.database(self._release, skipped)
        return bool(skipped) and len(self._inflight) < self.concurrency

    def _release(self, ids: list[int]) -> None:
        try:
            self.store.release(ids)
        except StoreUnavailable as exc:  # the claims lapse by themselves
            log.warning("outbox: %s", exc)

    async def _deliver(self, id_: int, kind: str, url: str, content_type: str, created: float,
                       attempts: int, task_uuid: str | None) -> None:
        current_task.set(task_uuid)  # this delivery runs as its own asyncio task: its lines name the task
        where = redact(url)
        try:
            body = await executors.database(self.store.body, id_)
            error = await self._attempt(kind, url, body, content_type)
            if error is None:
                await self._remove(id_)
                self.stats[kind]["delivered"] += 1
                log.debug("outbox: %s to %s delivered after %d attempts", kind, where, attempts + 1)
            elif isinstance(error, OutboundURLError):
                await self._remove(id_)
                self.stats[kind]["failed"] += 1
                log.warning("outbox: %s to %s refused by the URL policy, dropped: %s", kind, where, error)
            else:
                delay = min(self.max_delay, self.initial_delay * 2 ** attempts) * random.uniform(0.9, 1.1)
                next_at = time.time() + delay
                if next_at > created + self.retry_for:
                    await self._remove(id_)
                    self.stats[kind]["failed"] += 1
                    log.warning("outbox: %s to %s given up after %d attempts in %.0f s: %s",
                                kind, where, attempts + 1, time.time() - created, error)
                else:
                    await executors.database(self.store.reschedule, id_, attempts + 1, next_at)
                    self.stats[kind]["retried"] += 1
                    log.info("outbox: %s to %s failed (%s), retry in %.1f s", kind, where, error, delay)
        except StoreUnavailable as exc:  # the entry stays; it is tried again once its claim lapses
            log.warning("outbox: %s to %s: %s", kind, where, exc)
        except Exception:
            log.exception("outbox: unexpected error delivering %s to %s", kind, where)
        finally:
            self._inflight.pop(id_, None)
            self._wake.set()
            self._progress.set()

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

    async def _remove(self, id_: int) -> None:
        await executors.database(self.store.remove, id_)
        self._progress.set()


def _report_stop(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("outbox: the delivery loop stopped", exc_info=task.exception())
