"""What the server does between requests, each loop started and stopped here, in one place: the sweeps of
expired images, task records and WebSocket sessions, the store and disk probes, and with a shared database
(`--database`) this front-end's heartbeat and the relay of results other front-ends left for its sockets; with
a tenants file, its watch (re-read when it changes, and on SIGHUP: `reload_tenants`). (The
outbox's delivery loop is the `Outbox`'s own: `app.lifespan` starts it and flushes it at shutdown.)"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .protocol.errors import StoreUnavailable
from .store import executors
from .store.session_buffers import SessionBuffer
from .transport import ws
from .transport.parts import Parts

log = logging.getLogger("k5serve.app")

FRONTEND_LOST = ("The front-end running this task stopped before it finished (it stopped renewing its lease); "
                 "run it again.")


class Background:
    TENANTS_POLL = 1.0  # seconds between looks at the tenants file

    def __init__(self, parts: Parts, shared_sessions: SessionBuffer | None = None):
        self.parts = parts
        self.config, self.images, self.tasks, self.sessions = parts.config, parts.images, parts.tasks, parts.sessions
        self.probes, self.shared_sessions = parts.probes, shared_sessions
        self._jobs: list[asyncio.Task] = []

    def start(self) -> None:
        loops: list[Callable[[], Awaitable[None]]] = [self.sweep_forever, self.probes.run]
        if self.shared_sessions is not None:
            loops += [self.heartbeat_forever, self.relay_forever]
        if self.parts.auth.tenants.path is not None:
            loops.append(self.watch_tenants_forever)
        self._jobs = [asyncio.create_task(loop(), name=f"k5serve-{loop.__name__}") for loop in loops]

    def stop(self) -> None:
        for job in self._jobs:
            job.cancel()
        self._jobs = []

    def reload_tenants(self) -> None:
        """Re-read the tenants file now; close the connections of tenants that are gone or were given another
        key. A file that does not parse changes nothing (the tenants in force stay; /health says why)."""
        gone = self.parts.auth.tenants.reload()
        if gone:
            closed = ws.close_callers(self.parts, gone)
            if closed:
                log.info("closed %d WebSocket connection(s) of tenants removed or re-keyed", closed)

    async def watch_tenants_forever(self) -> None:
        while True:
            await asyncio.sleep(self.TENANTS_POLL)
            try:
                if self.parts.auth.tenants.changed():
                    self.reload_tenants()
            except Exception:  # noqa: BLE001 - the watch goes on; the tenants in force stay
                log.exception("re-reading the tenants file")

    async def sweep_forever(self) -> None:
        """Remove what has expired, each store on its own: one store being away does not stop the others'."""
        jobs = [("images", executors.images, self.images.sweep), ("task records", executors.database, self.tasks.sweep)]
        if self.shared_sessions is not None:
            shared = self.shared_sessions
            jobs.append(("WebSocket sessions", executors.database,
                         lambda: shared.sweep(self.config.ws_resume_window) or 0))
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            self.sessions.sweep()
            for what, pool, sweep in jobs:
                try:
                    removed = await pool(sweep)
                except StoreUnavailable as exc:
                    log.warning("sweeping expired %s: %s", what, getattr(exc, "detail", exc))
                    continue
                if removed:
                    log.info("removed %d expired %s", removed, what)

    async def heartbeat_forever(self) -> None:
        """Shared stores: keep this front-end's tasks alive, and fail those of front-ends that stopped."""
        while True:
            await asyncio.sleep(self.config.task_lease / 3)
            try:
                await executors.database(self.tasks.heartbeat)
                lost = await executors.database(self.tasks.expire_stale, FRONTEND_LOST)
            except StoreUnavailable as exc:
                log.warning("task heartbeat: %s", exc)
                continue
            if lost:
                log.warning("%d task(s) of a front-end that stopped were marked as failed", lost)

    async def relay_forever(self) -> None:
        """Shared stores: results other front-ends left for WebSocket sessions connected here."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.sessions.relay()
            except StoreUnavailable as exc:
                log.warning("relaying WebSocket results: %s", exc)
