"""WebSocket sessions: what lets a client that lost its connection get the results that finished meanwhile.

A session (its `connectionSessionUUID`) outlives its socket. A result for a session whose socket is gone or
too slow waits in a buffer, and is re-delivered when a client authenticates again with that
connectionSessionUUID within the resume window. On one front-end the buffer is a bounded deque per session.
With a server database (`--database`) sessions and waiting frames live in a `SessionBuffer` shared by every
front-end, so the reconnect may land on any of them; each front-end relays, once a second, the frames that
others left for the sessions connected to it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable

from fastapi import WebSocket

from . import executors, wire
from .tasks import StoreUnavailable
from .validation import well_formed_uuid

log = logging.getLogger("k5serve.ws")

SEND_TIMEOUT = 30.0  # a client that takes longer to accept a frame is treated as gone


class SessionBuffer(ABC):
    """Sessions and their waiting frames, shared by several front-ends. Calls block (a database)."""

    @abstractmethod
    def register(self, session_uuid: str) -> None: ...

    @abstractmethod
    def known(self, session_uuid: str, window: float) -> bool:
        """Whether a session was seen within the last `window` seconds (by any front-end)."""

    @abstractmethod
    def push(self, session_uuid: str, frame: str) -> None: ...

    @abstractmethod
    def take(self, session_uuids: list[str], window: float) -> dict[str, list[str]]:
        """Remove and return the frames waiting for these (connected) sessions, oldest first, dropping those
        older than `window`; renews the sessions' last-seen time."""

    @abstractmethod
    def sweep(self, window: float) -> None:
        """Forget sessions not seen, and frames not taken, within `window` seconds."""


class Session:
    def __init__(self, session_uuid: str, max_frames: int, shared: SessionBuffer | None = None):
        self.uuid = session_uuid
        self.ws: WebSocket | None = None
        self.buffer: deque[tuple[float, str]] = deque(maxlen=max_frames)
        self.max_frames = max_frames
        self.shared = shared
        self.detached_at: float | None = None
        self.lock = asyncio.Lock()

    async def send(self, payload: dict) -> None:
        await self.send_text(wire.dumps(payload))

    async def send_text(self, text: str) -> None:
        """Send now, or keep for a reconnect when the socket is gone or too slow."""
        async with self.lock:
            ws = self.ws
            if ws is not None:
                try:
                    await asyncio.wait_for(ws.send_text(text), SEND_TIMEOUT)
                    return
                except Exception:  # noqa: BLE001 - closed, reset or stuck: all mean "not delivered"
                    log.info("session %s: send failed, keeping the frame for a reconnect", self.uuid)
                    self.detach(ws)
            if self.shared is not None:
                try:  # where a reconnect to any front-end finds it
                    await executors.database(self.shared.push, self.uuid, text)
                    return
                except StoreUnavailable as exc:
                    log.warning("session %s: %s; keeping the frame on this front-end only", self.uuid, exc)
            self.buffer.append((time.monotonic(), text))

    def attach(self, ws: WebSocket) -> None:
        self.ws, self.detached_at = ws, None

    def detach(self, ws: WebSocket) -> None:
        if self.ws is ws:
            self.ws, self.detached_at = None, time.monotonic()

    async def flush(self, window: float) -> None:
        """Re-deliver what finished while the client was away (frames older than the window are dropped)."""
        async with self.lock:
            pending = [text for at, text in self.buffer if time.monotonic() - at <= window]
            self.buffer.clear()
        if self.shared is not None:
            try:
                pending += (await executors.database(self.shared.take, [self.uuid], window)).get(self.uuid, [])
            except StoreUnavailable as exc:
                log.warning("session %s: %s; frames kept elsewhere are re-delivered later", self.uuid, exc)
        for text in pending[-self.max_frames:]:
            await self.send_text(text)


class Sessions:
    def __init__(self, window: float, max_frames: int, shared: SessionBuffer | None = None):
        self.window = window
        self.max_frames = max_frames
        self.shared = shared
        self._by_uuid: dict[str, Session] = {}

    async def open(self, ws: WebSocket, resume: object, greeting: Callable[[str], dict]) -> tuple[Session, bool]:
        """A new session, or the known one named by `resume` (taken over from any older socket; with a shared
        buffer, also one that another front-end started), attached to `ws`; `greeting(session_uuid)` is its
        first frame, sent before any result can be."""
        session = self._by_uuid.get(resume) if isinstance(resume, str) else None
        if session is None and self.shared is not None and well_formed_uuid(resume):
            try:
                if await executors.database(self.shared.known, resume, self.window):  # (another socket may have
                    session = self._by_uuid.setdefault(resume, Session(resume, self.max_frames, self.shared))  # won)
            except StoreUnavailable as exc:
                log.warning("resuming WebSocket session %s: %s; starting a new one", resume, exc)
        resumed = session is not None
        if session is None:
            session = Session(str(uuid.uuid4()), self.max_frames, self.shared)
            self._by_uuid[session.uuid] = session
            if self.shared is not None:
                try:
                    await executors.database(self.shared.register, session.uuid)
                except StoreUnavailable as exc:
                    log.warning("WebSocket session %s: %s; it can be resumed on this front-end only", session.uuid,
                                exc)
        async with session.lock:  # no result frame can slip in before the greeting
            session.attach(ws)
            try:
                await asyncio.wait_for(ws.send_text(wire.dumps(greeting(session.uuid))), SEND_TIMEOUT)
            except Exception:  # noqa: BLE001 - gone already: what comes for it waits for a reconnect
                session.detach(ws)
        return session, resumed

    async def relay(self) -> None:
        """With a shared buffer: deliver the frames that other front-ends left for sessions connected here."""
        attached = [s for s in self._by_uuid.values() if s.ws is not None]
        if self.shared is None or not attached:
            return
        frames = await executors.database(self.shared.take, [s.uuid for s in attached], self.window)

        async def deliver(session: Session, texts: list[str]) -> None:
            for text in texts[-self.max_frames:]:
                await session.send_text(text)

        # Each session on its own: a stuck client (up to SEND_TIMEOUT per frame) holds up only its own frames.
        await asyncio.gather(*(deliver(s, frames[s.uuid]) for s in attached if s.uuid in frames))

    def sweep(self) -> None:
        now = time.monotonic()
        for key, s in list(self._by_uuid.items()):
            if s.ws is None and s.detached_at is not None and now - s.detached_at > self.window:
                del self._by_uuid[key]

    @property
    def connected(self) -> int:
        return sum(1 for s in self._by_uuid.values() if s.ws is not None)
