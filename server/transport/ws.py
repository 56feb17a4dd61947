"""The WebSocket transport at `/v1`, as the official Runware SDKs speak it.

Frames in: a JSON array of tasks. The first task must be `authentication`; its reply carries a
`connectionSessionUUID`. `ping` is answered at once with its own pong frame. Every other task runs as
its own asyncio task, so a slow generation never holds up pings or other tasks; its items are sent
when ready, each exactly once. A connection may have `max_tasks_per_connection` tasks in flight (until
their frames are sent), its key `max_tasks_per_key` over all connections (`tasks.admission`); more are
answered `rateLimitExceeded` at once. Results that finish while the client is away wait in the session's
buffer and are re-delivered when the client authenticates again with the same connectionSessionUUID
within `ws_resume_window` seconds (`transport.sessions`; with a server database, on any front-end).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from k5serve.context import Caller, RequestContext

from ..protocol import wire
from ..protocol.errors import ErrorItem, TaskError, invalid_api_key
from ..protocol.validation import batch_error
from ..tasks.admission import Connection
from .auth import request_context
from .errors import ws_error_frame
from .parts import Parts, parts
from .sessions import Session, close_soon

log = logging.getLogger("k5serve.ws")
router = APIRouter()

COMMON_MESSAGE_LIMIT = 1024 * 1024  # what some clients accept per message (the `websockets` library default)
PONG = {"data": [{"taskType": "ping", "pong": True}]}
REVOKED = (4003, "this API key is no longer accepted (its tenant was removed or given another key)")


def _http_base(ws: WebSocket) -> str:
    base = str(ws.base_url)
    return "https" + base[3:] if base.startswith("wss") else "http" + base[2:] if base.startswith("ws") else base


def _missing_key(raw: Any, task_type: Any) -> TaskError:
    task_uuid = raw.get("taskUUID") if isinstance(raw, dict) and isinstance(raw.get("taskUUID"), str) else None
    return TaskError(ErrorItem(code="missingApiKey", parameter="apiKey",
                               message="Authenticate first: send an authentication task with your apiKey.",
                               taskType=task_type if isinstance(task_type, str) else None, taskUUID=task_uuid))


class _Socket:
    """One WebSocket connection: its authentication, its session, its tasks in flight."""

    def __init__(self, ws: WebSocket, app: Parts):
        self.ws, self.app = ws, app
        self.auth_deadline = time.monotonic() + app.config.ws_auth_timeout
        self.session: Session | None = None
        self.waiting = True  # counted in WebSocketCounts.unauthenticated until the first authentication succeeds
        self.ctx: RequestContext | None = None  # from the first successful authentication
        self.connection = Connection()
        self.running: set[asyncio.Task] = set()

    async def send_direct(self, text: str) -> None:
        await self.ws.send_text(text)

    async def receive(self) -> dict | None:
        """The next message, or None when the client left or did not authenticate in time (then closed)."""
        if self.session is None:
            try:
                message = await asyncio.wait_for(self.ws.receive(), max(0.0, self.auth_deadline - time.monotonic()))
            except TimeoutError:
                await self.ws.close(code=1008, reason=f"authenticate within {self.app.config.ws_auth_timeout:g} s")
                return None
        else:
            message = await self.ws.receive()
        return None if message["type"] == "websocket.disconnect" else message

    async def frame(self, message: dict) -> None:
        """One frame: a task or an array of them, each answered on its own."""
        self.app.metrics.ws_frames.inc()
        try:
            tasks = wire.parse(message.get("text") if message.get("text") is not None else message.get("bytes"))
        except wire.InvalidJSON as exc:
            error = TaskError(ErrorItem(code="invalidJSON", message=f"Frame is not valid JSON: {exc}."))
            await self.send_direct(ws_error_frame(error))
            return
        if isinstance(tasks, dict):
            tasks = [tasks]
        problem = batch_error(tasks, self.app.config.max_tasks_per_request)
        if problem is not None:
            await self.send_direct(ws_error_frame(problem))
            return
        for raw in tasks:
            await self.task(raw)

    async def task(self, raw: Any) -> None:
        task_type = raw.get("taskType") if isinstance(raw, dict) else None
        if task_type == "ping":
            await (self.session.send(PONG) if self.session else self.send_direct(wire.dumps(PONG)))
        elif task_type == "authentication":
            await self.authenticate(raw)
        elif self.session is None or self.ctx is None:
            await self.send_direct(ws_error_frame(_missing_key(raw, task_type)))
        else:
            await self.start(raw, self.session, self.ctx)

    async def authenticate(self, raw: dict) -> None:
        caller = self.app.auth.identify(raw.get("apiKey"))
        if caller is None:
            await self.send_direct(ws_error_frame(invalid_api_key()))
            return
        if self.session is not None:
            self.session.detach(self.ws)
        self._register(caller.name)
        self.ctx = self._context(caller)
        self.session, resumed = await self.app.sessions.open(self.ws, raw.get("connectionSessionUUID"), caller.name, (
            lambda uuid: {"data": [{"taskType": "authentication", "connectionSessionUUID": uuid}]}))
        if self.waiting:
            self.app.websockets.unauthenticated -= 1
            self.waiting = False
        if resumed:
            await self.session.flush()

    def _register(self, name: str | None) -> None:
        """Listed under its caller's name (`close_callers`), and under no other."""
        registry = self.app.websockets.by_caller
        if self.ctx is not None and self.ctx.caller.name != name:
            mine = registry.get(self.ctx.caller.name, set())
            mine.discard(self)
            if not mine:
                registry.pop(self.ctx.caller.name, None)
        if name is not None:
            registry.setdefault(name, set()).add(self)

    def revoke(self) -> None:
        """Its key is no longer accepted: no further task runs on it, and it closes (4003, with the reason)."""
        self._register(None)
        self.ctx = None
        close_soon(self.ws, *REVOKED)

    def _context(self, caller: Caller) -> RequestContext:
        return request_context(self.ws, caller, "websocket", _http_base(self.ws))

    async def start(self, raw: Any, session: Session, ctx: RequestContext) -> None:
        """Run one task on its own, so a slow generation never holds up pings or other tasks."""
        dispatcher = self.app.dispatcher
        refused = dispatcher.admit(raw, ctx.caller, self.connection)
        if refused is not None:  # sent here: a client that does not read its answers stops being read
            await session.send_text(ws_error_frame(refused))
            return
        job = asyncio.create_task(_run(self.app, session, raw, ctx))
        self.running.add(job)
        job.add_done_callback(self.running.discard)
        job.add_done_callback(lambda _, who=ctx.caller.name: dispatcher.admission.leave(who, self.connection))

    def close(self) -> None:
        if self.waiting:
            self.app.websockets.unauthenticated -= 1
        self._register(None)
        if self.session is not None:
            self.session.detach(self.ws)


@router.websocket("/v1")
@router.websocket("/v1/")
async def websocket_endpoint(ws: WebSocket) -> None:
    app = parts(ws)
    # Before its key is seen a connection may hold a frame of up to ws_max_message_bytes: so only so many
    # connections may wait unauthenticated, each for at most ws_auth_timeout seconds.
    if app.websockets.unauthenticated >= app.config.max_unauthenticated_websockets:
        await ws.close(code=1013)  # before accepting: the handshake is refused (HTTP 403)
        return
    await ws.accept()
    app.websockets.open += 1
    app.websockets.unauthenticated += 1
    app.metrics.ws_connections_opened.inc()
    socket = _Socket(ws, app)
    try:
        while (message := await socket.receive()) is not None:
            await socket.frame(message)
    except WebSocketDisconnect:
        pass
    finally:
        app.websockets.open -= 1
        socket.close()


def close_callers(app: Parts, names: set[str]) -> int:
    """Close every connection of these callers (tenants removed, or whose key changed): code 4003, with the
    reason; their sessions keep what finishes until the resume window ends. -> how many were closed."""
    sockets = [socket for name in names for socket in app.websockets.by_caller.get(name, ())]
    for socket in sockets:
        socket.revoke()
    return len(sockets)


async def _run(app: Parts, session: Session, raw: Any, ctx: RequestContext) -> None:
    """One task: results go to the session, which buffers them if the client is away. Each item goes in a
    frame of its own, so a client with a small message limit still gets every item that fits in one."""
    items, error = await app.dispatcher.run_one(raw, ctx)
    frames = [wire.data_frame(item) for item in items]
    if error is not None:
        frames.append(ws_error_frame(error))
    largest = max(map(len, frames), default=0)
    if largest > COMMON_MESSAGE_LIMIT:
        log.warning("a result frame of %.1f MiB: clients with a 1 MiB WebSocket message limit (the websockets "
                    "library's default) cannot receive it; ask for outputType URL, or a lower outputQuality",
                    largest / 2**20)
    for text in frames:
        await session.send_text(text)
