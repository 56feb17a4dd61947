"""WebSocket sessions and their waiting frames, shared by several front-ends (`--database`): the interface.

The PostgreSQL implementation is `postgres.PostgresSessionBuffer`; on one front-end, `transport.sessions`
keeps them in memory and needs none.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class SessionBuffer(ABC):
    """Sessions and their waiting frames, shared by several front-ends. Calls block (a database)."""

    @abstractmethod
    def register(self, session_uuid: str, owner: str, holder: str) -> None:
        """A new session, of the caller `owner`, held by the socket `holder`."""

    @abstractmethod
    def resume(self, session_uuid: str, owner: str, holder: str, window: float) -> bool:
        """Hand a session seen within the last `window` seconds (by any front-end) that belongs to `owner` to the
        socket `holder`; False when there is no such session."""

    @abstractmethod
    def holders(self, session_uuids: list[str]) -> dict[str, str | None]:
        """The socket that holds each of these sessions now."""

    @abstractmethod
    def push(self, session_uuid: str, frame: str) -> None: ...

    @abstractmethod
    def take(self, session_uuids: list[str], window: float) -> dict[str, list[str]]:
        """Remove and return the frames waiting for these (connected) sessions, oldest first, dropping those
        older than `window`; renews the sessions' last-seen time."""

    @abstractmethod
    def sweep(self, window: float) -> None:
        """Forget sessions not seen, and frames not taken, within `window` seconds."""
