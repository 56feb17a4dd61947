"""How the server listens: uvicorn, with a deadline for each request head and a bound on open connections.

uvicorn has no header-read timeout: its keep-alive timer is cancelled by the first byte that arrives, so a
client that sends part of a request head (or one byte of the next head on a keep-alive connection) holds
its connection, and a file descriptor, for ever. The protocol classes here are uvicorn's own (httptools, or
h11 without it, as uvicorn's `http="auto"` picks) with two additions:

- while a connection waits for a request head (from when it is made, and again once its request has been
  read and answered), a timer runs; bytes of an unfinished head do not restart it, and when the head is not
  complete `header_timeout` seconds after the wait began, the connection is closed;
- a connection made while `max_connections` connections (HTTP and WebSocket) are open is answered 503, as
  uvicorn answers requests over its `limit_concurrency`, and closed at once. That option itself is not
  used: uvicorn checks it only once a request head is complete (so neither a connection that sends nothing
  nor a WebSocket upgrade is held to it) and counts the connection being checked (so N serves N - 1).

At start-up the soft open-file limit is raised to fit `max_connections` plus the server's own files.
uvicorn's listen backlog (2048, capped by net.core.somaxconn) holds connections the process has not yet
accepted; they take none of its descriptors, so it is left as it is.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import ListenConfig

log = logging.getLogger("k5serve.listen")

FD_MARGIN = 256  # descriptors for the server's own use: databases, logs, weights, outbound connections
REFUSAL_WARNING_INTERVAL = 60.0  # seconds between warnings while connections are being refused
# uvicorn's answer over its limit_concurrency (flow_control.service_unavailable), written before any request
SERVICE_UNAVAILABLE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                       b"content-length: 19\r\nconnection: close\r\n\r\nService Unavailable")


@dataclass
class _Counts:
    slow_heads: int = 0  # connections closed for not sending a complete request head in time
    refused: int = 0  # connections answered 503 over max_connections
    warned_at: float = float("-inf")  # time.monotonic() of the last warning about refusals


_counts = _Counts()


def closed_slow_heads() -> int:
    """Connections closed since start-up because a request head was not complete within header_timeout."""
    return _counts.slow_heads


def refused_connections() -> int:
    """Connections answered 503 and closed since start-up because max_connections were open."""
    return _counts.refused


# Written by hand: uvicorn has neither a header-read timeout nor a bound on idle connections (Kludex/uvicorn#157).
class _Limits:
    """What both protocol classes add to uvicorn's; mixed in before the uvicorn class."""

    header_timeout: float = ListenConfig.header_timeout
    max_connections: int = ListenConfig.max_connections
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refuse()
        else:
            self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_head()

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._stop_head_timer()  # the connection now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(*args)

    def _waiting_for_head(self) -> bool:
        """Every request so far has been read and answered, and the next head is not complete."""
        raise NotImplementedError

    def _watch_head(self) -> None:
        """Run the head timer while the connection waits for a head, else stop it. A running timer is left
        as it is: bytes of an unfinished head buy no time."""
        if not self._waiting_for_head() or self.transport.is_closing():
            self._stop_head_timer()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            _counts.slow_heads += 1
            self.transport.close()

    def _refuse(self) -> None:
        self.connections.discard(self)  # a refused connection does not count against the limit
        _counts.refused += 1
        now = time.monotonic()
        if now - _counts.warned_at >= REFUSAL_WARNING_INTERVAL:
            _counts.warned_at = now
            log.warning("%d connections are open (--max-connections): new ones are answered 503 and closed "
                        "(%d so far)", self.max_connections, _counts.refused)
        self.transport.write(SERVICE_UNAVAILABLE)
        self.transport.close()


class LimitedHttpToolsProtocol(_Limits, HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above."""

    _reading_request = False  # from a complete head to the end of its body

    def _waiting_for_head(self) -> bool:
        return not self._reading_request and (self.cycle is None or self.cycle.response_complete)

    def on_headers_complete(self) -> None:
        self._reading_request = True
        self._watch_head()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_request = False
        self._watch_head()


class LimitedH11Protocol(_Limits, H11Protocol):
    """uvicorn's h11 protocol with the limits above."""

    def _waiting_for_head(self) -> bool:
        return self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE

    def handle_events(self) -> None:
        super().handle_events()
        self._watch_head()


def protocol_class(listen: ListenConfig) -> type[asyncio.Protocol]:
    """The protocol uvicorn's `http="auto"` picks, with `listen`'s limits."""
    base = LimitedHttpToolsProtocol if issubclass(AutoHTTPProtocol, HttpToolsProtocol) else LimitedH11Protocol
    return type(base.__name__, (base,), {"header_timeout": listen.header_timeout,
                                         "max_connections": listen.max_connections})


def raise_open_file_limit(max_connections: int) -> None:
    """Raise the soft open-file limit to fit max_connections plus FD_MARGIN, as far as the hard limit allows
    (a warning says when it does not)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + FD_MARGIN
    if hard != resource.RLIM_INFINITY and hard < needed:
        log.warning("the open-file limit (%d) is below --max-connections %d plus %d for the server's own files: "
                    "raise it (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) or lower --max-connections",
                    hard, max_connections, FD_MARGIN)
        needed = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def serve(app: Any, listen: ListenConfig, *, log_level: str, ws_max_size: int,
          timeout_graceful_shutdown: int) -> None:
    """Serve `app` on listen.host:listen.port until the process is told to stop."""
    raise_open_file_limit(listen.max_connections)
    uvicorn.run(
        app,
        host=listen.host,
        port=listen.port,
        http=protocol_class(listen),
        log_level=log_level,
        log_config=None,  # keep our JSON/text handler on uvicorn's loggers
        ws_max_size=ws_max_size,
        timeout_graceful_shutdown=timeout_graceful_shutdown,
    )
