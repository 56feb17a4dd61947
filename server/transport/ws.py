"""The WebSocket transport at `/v1`, as the official Runware SDKs speak it.

Frames in: a JSON array of tasks. The first task must be `authentication`; its reply carries a
`connectionSessionUUID`. `ping` is answered at once with its own pong frame. Every other task runs as
its own asyncio task, so a slow generation never holds up pings or other tasks; its items are sent
when ready, each exactly once. A connection may have `max_tasks_per_connection` tasks in flight (until
their frames are sent), its key `max_tasks_per_key` over all connections (`admission.py`); more are
answered `rateLimitExceeded` at once. Results that finish while the client is away wait in the session's
buffer and are re-delivered when the client authenticates again with the same connectionSessionUUID
within `ws_resume_window` seconds (`sessions.py`; with a server database, on any front-end).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from ..protocol import wire
from ..protocol.errors import ErrorItem, invalid_api_key
from ..protocol.validation import batch_error
from ..tasks.admission import Connection
from .sessions import Session

log = logging.getLogger("k5serve.ws")
router = APIRouter()

COMMON_MESSAGE_LIMIT = 1024 * 1024  # what some clients accept per message (the `websockets` library default)


def _http_base(ws: WebSocket) -> str:
    base = str(ws.base_url)
    return "https" + base[3:] if base.startswith("wss") else "http" + base[2:] if base.startswith("ws") else base


async def _send_direct(ws: WebSocket, payload: dict) -> None:
    await ws.send_text(wire.dumps(payload))


@router.websocket("/v1")
@router.websocket("/v1/")
async def websocket_endpoint(ws: WebSocket) -> None:
    state, config = ws.app.state, ws.app.state.config
    # Before its key is seen a connection may hold a frame of up to ws_max_message_bytes: so only so many
    # connections may wait unauthenticated, each for at most ws_auth_timeout seconds.
    if getattr(state, "ws_unauthenticated", 0) >= config.max_unauthenticated_websockets:
        await ws.close(code=1013)  # before accepting: the handshake is refused (HTTP 403)
        return
    await ws.accept()
    state.ws_open = getattr(state, "ws_open", 0) + 1
    state.ws_unauthenticated = getattr(state, "ws_unauthenticated", 0) + 1
    waiting = True  # counted as unauthenticated
    auth_deadline = time.monotonic() + config.ws_auth_timeout
    state.metrics.ws_connections_opened.inc()
    session: Session | None = None
    caller = ""  # who authenticated (auth.Authenticator.identify)
    connection = Connection()
    running: set[asyncio.Task] = set()
    base_url = _http_base(ws)
    try:
        while True:
            if session is None:
                try:
                    message = await asyncio.wait_for(ws.receive(), max(0.0, auth_deadline - time.monotonic()))
                except TimeoutError:
                    await ws.close(code=1008, reason=f"authenticate within {config.ws_auth_timeout:g} s")
                    break
            else:
                message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            state.metrics.ws_frames.inc()
            try:
                tasks = wire.parse(message.get("text") if message.get("text") is not None else message.get("bytes"))
            except wire.InvalidJSON as exc:
                error = ErrorItem(code="invalidJSON", message=f"Frame is not valid JSON: {exc}.")
                await _send_direct(ws, {"errors": [error.wire()]})
                continue
            if isinstance(tasks, dict):
                tasks = [tasks]
            problem = batch_error(tasks, state.config.max_tasks_per_request)
            if problem is not None:
                await _send_direct(ws, {"errors": [problem.wire()]})
                continue
            for raw in tasks:
                task_type = raw.get("taskType") if isinstance(raw, dict) else None
                if task_type == "ping":
                    pong = {"data": [{"taskType": "ping", "pong": True}]}
                    await (session.send(pong) if session else _send_direct(ws, pong))
                elif task_type == "authentication":
                    who = state.auth.identify(raw.get("apiKey"))
                    if who is None:
                        error = invalid_api_key()
                        await _send_direct(ws, {"errors": [error.wire()]})
                        continue
                    if session is not None:
                        session.detach(ws)
                    caller = who
                    session, resumed = await state.sessions.open(ws, raw.get("connectionSessionUUID"), caller, (
                        lambda uuid: {"data": [{"taskType": "authentication", "connectionSessionUUID": uuid}]}))
                    if waiting:
                        state.ws_unauthenticated -= 1
                        waiting = False
                    if resumed:
                        await session.flush()
                elif session is None:
                    error = ErrorItem(
                        code="missingApiKey",
                        message="Authenticate first: send an authentication task with your apiKey.",
                        parameter="apiKey",
                        taskType=task_type if isinstance(task_type, str) else None,
                        taskUUID=(raw.get("taskUUID") if isinstance(raw, dict) and isinstance(raw.get("taskUUID"), str)
                                  else None),
                    )
                    await _send_direct(ws, {"errors": [error.wire()]})
                else:
                    refused = state.dispatcher.admit(raw, caller, connection)
                    if refused is not None:  # sent here: a client that does not read its answers stops being read
                        await session.send({"errors": [refused.item.wire()]})
                        continue
                    job = asyncio.create_task(_run(state.dispatcher, session, raw, base_url))
                    running.add(job)
                    job.add_done_callback(running.discard)
                    job.add_done_callback(lambda _, who=caller: state.dispatcher.admission.leave(who, connection))
    except WebSocketDisconnect:
        pass
    finally:
        state.ws_open -= 1
        if waiting:
            state.ws_unauthenticated -= 1
        if session is not None:
            session.detach(ws)


def open_connections(app) -> int:
    return getattr(app.state, "ws_open", 0)


async def _run(dispatcher, session: Session, raw: Any, base_url: str) -> None:
    """One task: results go to the session, which buffers them if the client is away. Each item goes in a
    frame of its own, so a client with a small message limit still gets every item that fits in one."""
    items, error = await dispatcher.run_one(raw, base_url=base_url)
    frames = [wire.data_frame(item) for item in items]
    if error is not None:
        frames.append(wire.dumps({"errors": [error.item.wire()]}))
    largest = max(map(len, frames), default=0)
    if largest > COMMON_MESSAGE_LIMIT:
        log.warning("a result frame of %.1f MiB: clients with a 1 MiB WebSocket message limit (the websockets "
                    "library's default) cannot receive it; ask for outputType URL, or a lower outputQuality",
                    largest / 2**20)
    for text in frames:
        await session.send_text(text)
