"""WebSocket sessions: what lets a client that lost its connection get the results that finished meanwhile.

A session (its `connectionSessionUUID`) outlives its socket. A result for a session whose socket is gone or
too slow waits in a buffer, and is re-delivered when a client authenticates again with that
connectionSessionUUID within the resume window.

- A session belongs to the API key that opened it: another key naming it gets a session of its own.
- At most one open socket holds a session. A second authentication that names a session still held by an
  open socket takes the session over: the server first closes the old socket with close code 4001 and the
  reason "session resumed on another connection" (with a server database, within about a second when the
  old socket is on another front-end). An open socket therefore never silently stops receiving its results;
  a client closed this way should open a new session (the Python SDK does; the playground does) rather than
  resume the same one again.
- A socket that does not accept a frame within `SEND_TIMEOUT` is treated as gone: the server asks it to
  close, and its session's results wait for a reconnect.
- The waiting frames are bounded per session and over all sessions, in frames and in bytes; past a bound the
  oldest frames are dropped, and the drops are counted (`k5serve_websocket_frames_dropped_total`).

On one front-end the buffer is a deque per session. With a server database (`--database`) sessions and
waiting frames live in a `SessionBuffer` shared by every front-end, so the reconnect may land on any of them;
each front-end relays, once a second, the frames that others left for the sessions connected to it, and
closes its sockets whose session another front-end took over.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable

from fastapi import WebSocket

from ..protocol import wire
from ..protocol.errors import StoreUnavailable
from ..protocol.validation import well_formed_uuid
from ..store import executors
from ..store.session_buffers import SessionBuffer

log = logging.getLogger("k5serve.ws")

SEND_TIMEOUT = 30.0  # a client that takes longer to accept a frame is treated as gone
TAKEN_OVER = (4001, "session resumed on another connection")  # close code and reason of a socket taken over
TOO_SLOW = (4008, "a frame was not accepted within 30 s")
CLOSE_TIMEOUT = 5.0  # seconds to wait for a close frame to go out (a client that reads nothing never takes it)


class Session:
    def __init__(self, session_uuid: str, owner: str, home: Sessions):
        self.uuid = session_uuid
        self.owner = owner  # the name of the caller that opened it (`k5serve.context.Caller.name`)
        self.home = home
        self.ws: WebSocket | None = None
        self.holder = ""  # the attached socket's id, as the shared buffer knows it
        self.synced = True  # False: the shared buffer could not be told that this socket holds it (yet)
        self.buffer: deque[tuple[float, str]] = deque()
        self.buffered_bytes = 0
        self.detached_at: float | None = None
        self.lock = asyncio.Lock()  # which socket holds the session, the buffer, and the greeting before all
        self.sending = asyncio.Lock()  # one frame at a time on the attached socket (a new lock per socket, so a
        #                                send stuck on an old socket holds up neither a take-over nor the new one)

    async def send(self, payload: dict) -> None:
        await self.send_text(wire.dumps(payload))

    async def send_text(self, text: str) -> None:
        """Send now to the socket that holds the session, or keep for a reconnect when there is none (gone, too
        slow)."""
        while True:
            async with self.lock:
                ws, sending = self.ws, self.sending
                if ws is None:
                    await self._keep(text)
                    return
            async with sending:
                if self.ws is not ws:  # taken over or let go while this frame waited: look again
                    continue
                try:
                    await asyncio.wait_for(ws.send_text(text), SEND_TIMEOUT)
                    return
                except Exception:  # noqa: BLE001 - closed, reset or stuck: all mean "not delivered"
                    log.info("session %s: send failed, keeping the frame for a reconnect", self.uuid)
                    if self.detach(ws):
                        close_soon(ws, *TOO_SLOW)

    async def _keep(self, text: str) -> None:
        """(Under `lock`.) Where a reconnect to any front-end finds it, else on this front-end."""
        if self.home.shared is not None:
            try:
                await executors.database(self.home.shared.push, self.uuid, text)
                return
            except StoreUnavailable as exc:
                log.warning("session %s: %s; keeping the frame on this front-end only", self.uuid, exc)
        self.home.keep(self, text)

    def attach(self, ws: WebSocket, holder: str) -> None:
        self.ws, self.holder, self.detached_at = ws, holder, None
        self.sending = asyncio.Lock()

    def detach(self, ws: WebSocket) -> bool:
        """Let go of `ws` if it is this session's socket; True if it was."""
        if self.ws is not ws:
            return False
        self.ws, self.detached_at = None, time.monotonic()
        return True

    async def flush(self) -> None:
        """Re-deliver what finished while the client was away (frames older than the window are dropped)."""
        async with self.lock:
            pending = self.home.drain(self)
        if self.home.shared is not None:
            try:
                taken = await executors.database(self.home.shared.take, [self.uuid], self.home.window)
                pending += taken.get(self.uuid, [])
            except StoreUnavailable as exc:
                log.warning("session %s: %s; frames kept elsewhere are re-delivered later", self.uuid, exc)
        for text in pending[-self.home.max_frames:]:
            await self.send_text(text)


class Sessions:
    def __init__(self, window: float, max_frames: int, shared: SessionBuffer | None = None, *,
                 max_bytes: int = 32 * 2**20, max_total_bytes: int = 128 * 2**20, instance: str = "",
                 on_drop: Callable[[str, int], None] = lambda reason, n: None):
        self.window = window
        self.max_frames = max_frames  # per session
        self.max_bytes = max_bytes  # per session
        self.max_total_bytes = max_total_bytes  # over all sessions of this front-end
        self.shared = shared
        self.instance = instance or uuid.uuid4().hex[:12]  # this front-end, in socket ids
        self.on_drop = on_drop  # (reason, frames): "session", "total" or "expired"
        self.buffered_bytes = 0
        self._by_uuid: dict[str, Session] = {}

    async def open(self, ws: WebSocket, resume: object, owner: str,
                   greeting: Callable[[str], dict]) -> tuple[Session, bool]:
        """A new session of `owner`, or the one of theirs named by `resume` (with a shared buffer, also one that
        another front-end started), taken over from any socket that held it, attached to `ws`;
        `greeting(session_uuid)` is its first frame, sent before any result can be. -> (session, resumed)"""
        holder = f"{self.instance}:{uuid.uuid4().hex[:12]}"
        session = self._by_uuid.get(resume) if isinstance(resume, str) else None
        if session is not None and session.owner != owner:
            session = None  # someone else's: theirs stays theirs, this caller gets a session of its own
        known_here = session is not None or (isinstance(resume, str) and resume in self._by_uuid)
        synced = True  # the shared buffer knows this socket holds it
        if self.shared is not None and well_formed_uuid(resume) and (session is not None or not known_here):
            try:  # (the shared record says which socket holds it: another front-end's closes its own)
                if await executors.database(self.shared.resume, resume, owner, holder, self.window):
                    session = session or self._by_uuid.setdefault(resume, Session(resume, owner, self))
                elif session is not None:  # known here, but not (or no longer) there
                    await executors.database(self.shared.register, resume, owner, holder)
            except StoreUnavailable as exc:
                log.warning("resuming WebSocket session %s: %s; %s", resume, exc,
                            "on this front-end only" if session else "starting a new one")
                synced = False
        resumed = session is not None
        if session is None:
            session = Session(str(uuid.uuid4()), owner, self)
            self._by_uuid[session.uuid] = session
            if self.shared is not None:
                try:
                    await executors.database(self.shared.register, session.uuid, owner, holder)
                except StoreUnavailable as exc:
                    log.warning("WebSocket session %s: %s; it can be resumed on this front-end only", session.uuid,
                                exc)
                    synced = False
        async with session.lock:  # no result frame can slip in before the greeting
            old = session.ws
            if old is not None and old is not ws:
                log.info("session %s: resumed on another connection; closing the one that held it", session.uuid)
                session.detach(old)
                close_soon(old, *TAKEN_OVER)
            session.attach(ws, holder)
            session.synced = synced
            async with session.sending:
                try:
                    await asyncio.wait_for(ws.send_text(wire.dumps(greeting(session.uuid))), SEND_TIMEOUT)
                except Exception:  # noqa: BLE001 - gone already: what comes for it waits for a reconnect
                    session.detach(ws)
        return session, resumed

    def keep(self, session: Session, text: str) -> None:
        """Keep a frame for `session`'s reconnect, within the bounds (the oldest frames go first)."""
        if self._by_uuid.get(session.uuid) is not session:  # swept: its client did not come back in time
            self.on_drop("expired", 1)
            return
        session.buffer.append((time.monotonic(), text))
        session.buffered_bytes += len(text)
        self.buffered_bytes += len(text)
        dropped = 0
        while len(session.buffer) > self.max_frames or session.buffered_bytes > self.max_bytes:
            self._drop_oldest(session)
            dropped += 1
        if dropped:
            self.on_drop("session", dropped)
        dropped = 0
        while self.buffered_bytes > self.max_total_bytes:
            oldest = min((s for s in self._by_uuid.values() if s.buffer), key=lambda s: s.buffer[0][0], default=None)
            if oldest is None:
                break
            self._drop_oldest(oldest)
            dropped += 1
        if dropped:
            self.on_drop("total", dropped)

    def drain(self, session: Session) -> list[str]:
        """Take the frames kept for `session` that are still within the window."""
        now = time.monotonic()
        frames = [text for at, text in session.buffer if now - at <= self.window]
        if len(frames) < len(session.buffer):
            self.on_drop("expired", len(session.buffer) - len(frames))
        self.buffered_bytes -= session.buffered_bytes
        session.buffer.clear()
        session.buffered_bytes = 0
        return frames

    def _drop_oldest(self, session: Session) -> None:
        _, text = session.buffer.popleft()
        session.buffered_bytes -= len(text)
        self.buffered_bytes -= len(text)

    async def relay(self) -> None:
        """With a shared buffer: close the sockets whose session another front-end took over, and deliver the
        frames that other front-ends left for sessions connected here."""
        attached = [s for s in self._by_uuid.values() if s.ws is not None]
        if self.shared is None or not attached:
            return
        for session in [s for s in attached if not s.synced]:  # attached while the database was away: tell it now
            await executors.database(self.shared.register, session.uuid, session.owner, session.holder)
            session.synced = True
        ours = {s.uuid: s.holder for s in attached}  # (a socket attached while the holders are read is not judged)
        holders = await executors.database(self.shared.holders, list(ours))
        for session in attached:
            holder = holders.get(session.uuid)
            if session.ws is not None and session.holder == ours[session.uuid] and holder is not None \
                    and holder != session.holder:
                log.info("session %s: resumed on another front-end; closing the connection here", session.uuid)
                ws = session.ws
                session.detach(ws)
                close_soon(ws, *TAKEN_OVER)
        attached = [s for s in attached if s.ws is not None]
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
                if s.buffer:
                    self.on_drop("expired", len(s.buffer))
                self.buffered_bytes -= s.buffered_bytes
                del self._by_uuid[key]

    @property
    def connected(self) -> int:
        return sum(1 for s in self._by_uuid.values() if s.ws is not None)


_closing: set[asyncio.Task] = set()


def close_soon(ws: WebSocket, code: int, reason: str) -> None:
    """Close `ws` with `code` and `reason` in the background, waiting at most CLOSE_TIMEOUT for it."""

    async def close() -> None:
        try:
            await asyncio.wait_for(ws.close(code=code, reason=reason), CLOSE_TIMEOUT)
        except Exception:  # noqa: BLE001 - closed already, or a client that reads nothing: it is let go
            pass

    job = asyncio.ensure_future(close())
    _closing.add(job)
    job.add_done_callback(_closing.discard)
