"""How much work one client may have in flight: a bound per connection and per API key, for every task type.

A task is in flight from the moment it is taken until its answer has been handed to its transport (on a
WebSocket, until its frames are sent or kept for a reconnect), so a client that sends faster than it reads
runs into the bound instead of making the server hold its answers. Past a bound the task is answered at once
with `rateLimitExceeded` (HTTP 429 with `Retry-After`). The generation queue (`--max-queue`) bounds
imageInference on top of this.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


@dataclass
class Connection:
    """One WebSocket connection's tasks in flight (an HTTP request's tasks are bounded by its size)."""

    in_flight: int = 0


class Admission:
    def __init__(self, per_connection: int, per_key: int):
        self.per_connection = per_connection
        self.per_key = per_key
        self._by_key: Counter[str] = Counter()

    def enter(self, key: str, connection: Connection | None = None) -> str | None:
        """Take one task for `key` (the caller's name, `Caller.name`) on `connection`: None when it may run, else
        why not (for the client). Every None must be matched by one `leave`."""
        if connection is not None and connection.in_flight >= self.per_connection:
            return (f"this connection has {connection.in_flight} tasks in flight, the most it may have "
                    f"(--max-tasks-per-connection)")
        if self._by_key[key] >= self.per_key:
            return f"this API key has {self._by_key[key]} tasks in flight, the most it may have (--max-tasks-per-key)"
        self._by_key[key] += 1
        if connection is not None:
            connection.in_flight += 1
        return None

    def leave(self, key: str, connection: Connection | None = None) -> None:
        self._by_key[key] -= 1
        if self._by_key[key] <= 0:
            del self._by_key[key]
        if connection is not None:
            connection.in_flight -= 1

    def in_flight(self, key: str) -> int:
        return self._by_key[key]
