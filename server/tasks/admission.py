"""How much work one client may have in flight: a bound per connection and per API key, for every task type.

A task is in flight from the moment it is taken until its answer has been handed to its transport (on a
WebSocket, until its frames are sent or kept for a reconnect), so a client that sends faster than it reads
runs into the bound instead of making the server hold its answers. Past a bound the task is answered at once
with `rateLimitExceeded` (HTTP 429 with `Retry-After`). The generation queue (`--max-queue`) bounds
imageInference on top of this, and a tenant's own `max_queued` and `max_per_minute` (`TenantLimits`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, deque
from dataclasses import dataclass

from k5serve.context import RequestContext

from ..tenants import Tenants


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


class TenantLimits:
    """A tenant's own bounds on generation, from the tenants file (`max_queued`, `max_per_minute`): past either,
    its new imageInference tasks are answered 429 with the seconds to wait; other tenants are unaffected.
    `max_queued` counts its tasks queued or running on this front-end; `max_per_minute` the imageInference tasks
    it was let submit in the last 60 seconds that then ran (succeeded or failed)."""

    WINDOW = 60.0

    def __init__(self, tenants: Tenants, retry_after: int):
        self.tenants = tenants
        self.retry_after = retry_after
        self._queued: Counter[str] = Counter()
        self._submitted: dict[str, deque[float]] = {}

    def take(self, name: str) -> tuple[str, int] | None:
        """Count one task for tenant `name`: None when it may run (then `done(name)` once it finished), else
        (why, seconds to wait)."""
        tenant = self.tenants.get(name)
        now = time.monotonic()
        recent = self._submitted.setdefault(name, deque())
        while recent and recent[0] <= now - self.WINDOW:
            recent.popleft()
        if tenant is not None and tenant.max_queued is not None and self._queued[name] >= tenant.max_queued:
            return (f"tenant {name} has {self._queued[name]} tasks queued or running, its limit (max_queued)",
                    self.retry_after)
        if tenant is not None and tenant.max_per_minute is not None and len(recent) >= tenant.max_per_minute:
            wait = max(1, math.ceil(recent[0] + self.WINDOW - now))
            return f"tenant {name} submitted {len(recent)} tasks in the last minute, its limit (max_per_minute)", wait
        recent.append(now)
        self._queued[name] += 1
        return None

    def current(self, ctx: RequestContext) -> RequestContext:
        """`ctx` with its caller's weight as the tenants file says now (a WebSocket authenticated before a
        re-read keeps its context)."""
        tenant = self.tenants.get(ctx.caller.name)
        if tenant is None or tenant.weight == ctx.caller.weight:
            return ctx
        return dataclasses.replace(ctx, caller=dataclasses.replace(ctx.caller, weight=tenant.weight))

    def release(self, name: str) -> None:
        """Undo a `take` whose task never ran (refused later on: a full queue, a taken taskUUID, a bad input
        image): it uses up neither the tenant's tasks in flight nor its tasks of the minute."""
        recent = self._submitted.get(name)
        if recent:
            recent.pop()
        self.done(name)

    def done(self, name: str) -> None:
        self._queued[name] -= 1
        if self._queued[name] <= 0:
            del self._queued[name]
        if not self._submitted.get(name, True):
            del self._submitted[name]
