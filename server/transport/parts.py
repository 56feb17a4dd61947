"""The application's parts, typed: what every endpoint reaches for (the dispatcher, the stores, the worker's
slot, the configuration), built once by `app.create_app` and read with `parts(request)` instead of
attributes looked up on `app.state`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

from ..config import ServerConfig
from ..ops.metrics import Metrics
from ..ops.probes import Probes
from ..outbound.outbox import Outbox
from ..store.images import ImageStore
from ..store.task_records import TaskStore
from ..tasks.dispatcher import Dispatcher
from ..tasks.slot import ModelSlot
from .auth import Authenticator
from .sessions import Sessions

if TYPE_CHECKING:  # (psycopg: only with --database)
    from ..store.postgres import Database


@dataclass
class WebSocketCounts:
    open: int = 0  # connections accepted and not yet closed
    unauthenticated: int = 0  # of those, the ones that have not authenticated yet
    by_caller: dict[str, set] = field(default_factory=dict)  # caller name -> its authenticated connections


@dataclass
class Parts:
    config: ServerConfig
    auth: Authenticator
    slot: ModelSlot
    dispatcher: Dispatcher
    images: ImageStore
    tasks: TaskStore
    outbox: Outbox
    sessions: Sessions
    metrics: Metrics
    probes: Probes
    database: Database | None = None  # the shared database (--database), for /ready and /metrics
    websockets: WebSocketCounts = field(default_factory=WebSocketCounts)
    started: float = field(default_factory=time.time)


def parts(connection: HTTPConnection) -> Parts:
    """The parts of the app serving this request or WebSocket."""
    return connection.app.state.parts
