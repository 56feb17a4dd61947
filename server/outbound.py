"""Every outbound HTTP request the server makes: image downloads, webhooks and uploadEndpoint PUTs.

Safe by default. A URL a client hands us is refused unless it is http(s), has a host, and every address
that host resolves to is public. Loopback, private, link-local (including the cloud metadata address
169.254.169.254), unspecified, multicast, reserved and other non-global ranges are refused, and so are
IPv6 forms that embed such an IPv4 address (IPv4-mapped, 6to4, Teredo). `allow_private=True` lifts this
for trusted deployments.

DNS rebinding. Checking a name and then letting the HTTP client resolve it again leaves a window in which
the name can change to an internal address. So the check runs where the connection is made: every
request goes through an httpcore network backend (`_CheckingBackend`) that resolves the host once,
refuses it if any address fails the policy, and then opens the TCP connection to one of exactly those
checked addresses. The URL is not rewritten, so the Host header, TLS SNI and certificate checks still
use the host name (httpcore calls `start_tls(server_hostname=<URL host>)` on the stream we return).
Environment proxies are disabled (`trust_env=False`), because a proxy would make the connection for us.
`check_url` runs the same resolve-and-check up front, so callers can turn a bad URL into a parameter
error when the request arrives. Redirects are never followed for webhooks and uploads; image downloads
follow at most 3, and each hop connects through the same checking backend.

The `Outbox` delivers webhooks (POST, JSON) and uploads (PUT, raw bytes) in the background, with retries
and exponential backoff, from a SQLite file so that a restart resumes pending deliveries. Delivery is at
least once: an entry is deleted only after a 2xx, so a delivery cut short by a shutdown is sent again.
Use one Outbox per database file.

URLs are logged as scheme://host[:port]/path only: query strings and user info can hold credentials.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import random
import socket
import sqlite3
import ssl
import threading
import time
from collections import Counter
from pathlib import Path

import httpcore
import httpx

from k5serve.logcontext import current_task

log = logging.getLogger("k5serve.outbound")

MAX_REDIRECTS = 3
USER_AGENT = "k5serve"
KINDS = ("webhook", "upload")


class OutboundError(Exception):
    """Base class for the errors of this module."""


class OutboundURLError(OutboundError, ValueError):
    """A URL that must not be requested; the message is fit to return to the client."""

    def __init__(self, message: str, purpose: str = ""):
        super().__init__(message)
        self.purpose = purpose


class DownloadError(OutboundError):
    """An image download that failed: transport error, non-2xx, too large or too slow."""


# --- URL policy -------------------------------------------------------------------------------------


def redact(url: str | httpx.URL) -> str:
    """scheme://host[:port]/path, without user info, query or fragment: safe to log."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return "<invalid URL>"
    host = f"[{u.host}]" if ":" in u.host else u.host
    port = f":{u.port}" if u.port is not None else ""
    return f"{u.scheme}://{host}{port}{u.path}"


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why this address must not be connected to, or None if it is public."""
    if ip.version == 6:
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        for v4 in filter(None, embedded):
            if (why := _refusal(v4)) is not None:
                return f"{why} (embedded in an IPv6 address)"
    checks = [
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (getattr(ip, "is_site_local", False), "a site-local address"),
        (not ip.is_global, "not a globally routable address"),
    ]
    return next((why for refused, why in checks if refused), None)


async def resolve(host: str, port: int) -> list[str]:
    """All addresses (A and AAAA) of `host`, in the resolver's order; raises OSError if none."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise OSError(f"no addresses for {host!r}")
    return addresses


async def _checked_addresses(host: str, port: int, *, allow_private: bool, purpose: str) -> list[str]:
    """Resolve `host` and refuse it if any of its addresses is not public (unless allowed)."""
    addresses = await resolve(host, port)
    if not allow_private:
        for address in addresses:
            why = _refusal(ipaddress.ip_address(address.split("%", 1)[0]))  # drop an IPv6 zone id
            if why is not None:
                shown = host if host == address else f"{host} resolves to {address}, which"
                raise OutboundURLError(f"{purpose}: {shown} is {why}; only public hosts are allowed", purpose)
    return addresses


def _origin(url: str) -> str:
    try:
        u = httpx.URL(url)
        return f"{u.scheme}://{u.host}:{u.port}"
    except (httpx.InvalidURL, TypeError):
        return ""


def _parse(url: str, purpose: str) -> httpx.URL:
    """The URL if it is a well-formed http(s) URL with a host; the DNS check happens later."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise OutboundURLError(f"{purpose}: not a valid URL ({exc})", purpose) from None
    if u.scheme not in ("http", "https"):
        scheme = u.scheme or "(none)"
        raise OutboundURLError(f"{purpose}: scheme {scheme!r} is not allowed; use http or https", purpose)
    if not u.host:
        raise OutboundURLError(f"{purpose}: the URL has no host", purpose)
    return u


async def check_url(url: str, *, allow_private: bool, purpose: str) -> None:
    """Raise OutboundURLError unless `url` may be requested. `purpose` names the parameter in messages.

    Requests made by this module repeat the check when they connect, so this is for early, friendly errors.
    """
    u = _parse(url, purpose)
    try:
        await _checked_addresses(u.host, u.port or (443 if u.scheme == "https" else 80),
                                 allow_private=allow_private, purpose=purpose)
    except OSError:
        raise OutboundURLError(f"{purpose}: host {u.host!r} could not be resolved", purpose) from None


# --- HTTP client that connects only to checked addresses --------------------------------------------


class _CheckingBackend(httpcore.AsyncNetworkBackend):
    """Resolves and checks the host at connect time, then connects to one of the checked addresses."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            async with asyncio.timeout(timeout):
                addresses = await _checked_addresses(host, port, allow_private=self.allow_private, purpose="URL")
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host!r} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {exc}") from None
        error: Exception | None = None
        for address in addresses:
            try:
                return await self.inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context(trust_env=False)  # loading the CA bundle takes ~10 ms: do it once


class _CheckingTransport(httpx.AsyncHTTPTransport):
    def __init__(self, allow_private: bool, max_connections: int = 16):
        super().__init__(verify=_ssl_context(), trust_env=False)
        # httpx 0.28 has no public parameter for a network backend; httpcore's pool takes one, so swap it in.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(), max_connections=max_connections,
            network_backend=_CheckingBackend(allow_private),
        )


def _client(allow_private: bool, timeout: float, max_connections: int = 16) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=_CheckingTransport(allow_private, max_connections), timeout=timeout, follow_redirects=False,
        trust_env=False, headers={"User-Agent": USER_AGENT},
    )


# --- image download ---------------------------------------------------------------------------------


async def fetch_bytes(url: str, *, allow_private: bool, max_bytes: int,
                      timeout: float = 10.0) -> tuple[bytes, str | None]:
    """GET `url` (following at most 3 redirects) and return (body, content-type).

    Raises OutboundURLError for a refused URL (also after a redirect) and DownloadError when the download
    fails, answers non-2xx, is larger than `max_bytes` or takes longer than `timeout` seconds in total.
    """
    purpose = "URL"
    target = _parse(url, purpose)
    try:
        async with asyncio.timeout(timeout), _client(allow_private, timeout) as client:
            for _ in range(MAX_REDIRECTS + 1):
                request = client.build_request("GET", target, headers={"Accept-Encoding": "identity"})
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        target = _parse(str(response.url.join(response.headers["location"])), purpose)
                        continue
                    return await _read_body(response, max_bytes), response.headers.get("content-type")
                finally:
                    await response.aclose()
            raise DownloadError(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")
    except (TimeoutError, httpx.TimeoutException):
        raise DownloadError(f"{redact(url)}: download took longer than {timeout:g} s") from None
    except httpx.HTTPError as exc:
        raise DownloadError(f"{redact(url)}: download failed ({type(exc).__name__}: {exc})") from None


async def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    where = redact(response.url)
    if not response.is_success:
        raise DownloadError(f"{where}: the server answered HTTP {response.status_code}")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise DownloadError(f"{where}: {length} bytes is more than the limit of {max_bytes}")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise DownloadError(f"{where}: the body is more than the limit of {max_bytes} bytes")
    return bytes(body)


# --- outbox for webhooks and uploads ----------------------------------------------------------------


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
        self._client = _client(self.allow_private, self.timeout, max(16, self.concurrency))
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
                id_, origin = entry[0], _origin(entry[2])
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
            _parse(url, "uploadEndpoint" if kind == "upload" else "webhookURL")
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
