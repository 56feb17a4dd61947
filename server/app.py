"""The ASGI application: `create_app` builds the stores, the outbox, the metrics and the dispatcher around a
`ModelSlot`, keeps them as typed `Parts`, mounts the transports and the operations endpoints; `lifespan`
runs start-up and shutdown, and `background.Background` the loops between requests.

The model loads in a background thread after start-up (`ModelSlot`). On shutdown (SIGTERM) the server
stops taking tasks, lets the ones in flight finish (up to `shutdown_timeout`), records the rest as failed,
flushes the outbox and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
from pathlib import Path

from fastapi import FastAPI

from k5serve import __version__

from .background import Background
from .config import ServerConfig
from .ops.metrics import Metrics
from .ops.probes import Probes
from .outbound.outbox import Outbox
from .protocol import openapi
from .protocol.errors import StoreUnavailable
from .protocol.models import TASK_TYPES
from .protocol.validation import error_codes
from .protocol.wire import WireResponse
from .store import executors
from .store.images import DirectoryImageStore, ImageStore
from .store.task_records import SQLiteTaskStore, TaskStore, webhook_error
from .tasks.dispatcher import Dispatcher
from .tasks.slot import ModelSlot
from .tenants import Tenants
from .transport import health, http, playground, task_view, usage, ws
from .transport.auth import Authenticator
from .transport.errors import install_error_handlers
from .transport.openai import router as openai_router
from .transport.parts import Parts
from .transport.sessions import Sessions

log = logging.getLogger("k5serve.app")


class SharedStores:
    """Task records, the outbox and WebSocket sessions in a server database (`--database`), shared by several
    front-ends."""

    def __init__(self, config: ServerConfig):
        from .store import postgres  # psycopg: only with --database

        self.instance = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.db = postgres.Database(config.database)
        self.tasks = postgres.PostgresTaskStore(self.db, self.instance, lease=config.task_lease)
        self.outbox = postgres.PostgresOutboxStore(self.db, self.instance)
        self.sessions = postgres.PostgresSessionBuffer(self.db, config.ws_resume_buffer)
        log.info("task records and outbox in PostgreSQL (schema version %d), this front-end is %s",
                 self.db.version, self.instance)

    def close(self) -> None:
        self.db.close()


def open_image_store(config: ServerConfig) -> ImageStore:
    """The store `--image-store` names: an s3:// location or a folder (default: images/ under --data-dir)."""
    if config.s3_image_store:
        from .store.s3 import S3ImageStore  # boto3: only with an s3:// image store

        return S3ImageStore(config.image_store, endpoint=config.s3_endpoint,
                            presigned=config.image_urls == "presigned")
    return DirectoryImageStore(Path(config.image_store or config.data_dir / "images"))


def recover(tasks: TaskStore, outbox: Outbox) -> None:
    """At start-up: fail the tasks the last run of this server left unfinished (SQLite), and queue their error
    webhooks."""
    lost = tasks.recover("The server restarted before this task finished; run it again.")
    for record in lost:
        if record.webhook_url:
            try:
                outbox.enqueue_webhook(record.webhook_url, webhook_error(record.errors[0]), record.task_uuid)
            except StoreUnavailable as exc:  # e.g. a full disk: the record says it failed, the hook is lost
                log.error("task %s: its error webhook could not be queued: %s", record.task_uuid, exc)
    if lost:
        log.warning("%d task(s) were in flight when the server last stopped; marked as failed", len(lost))


def build_parts(config: ServerConfig, slot: ModelSlot) -> tuple[Parts, SharedStores | None]:
    """Every part of the server, wired together (nothing started yet)."""
    auth = Authenticator(Tenants(config.api_keys, config.tenants_file))  # first: a bad tenants file stops here
    images = open_image_store(config)
    shared = SharedStores(config) if config.database else None
    tasks = shared.tasks if shared is not None else SQLiteTaskStore(config.task_db)
    outbox = Outbox(shared.outbox if shared is not None else config.outbox_db, allow_private=config.allow_private_urls)
    metrics = Metrics(TASK_TYPES, error_codes())
    probes = Probes(config, images, shared.db if shared is not None else None)
    dispatcher = Dispatcher(config, slot, images, tasks, outbox, metrics, check_room=probes.check_room,
                            tenants=auth.tenants)
    sessions = Sessions(config.ws_resume_window, config.ws_resume_buffer, shared.sessions if shared else None,
                        max_bytes=config.ws_resume_bytes, max_total_bytes=config.ws_resume_total_bytes,
                        instance=shared.instance if shared is not None else "",
                        on_drop=lambda reason, n: metrics.ws_frames_dropped.labels(reason).inc(n))
    return Parts(config=config, auth=auth, slot=slot, dispatcher=dispatcher, images=images, tasks=tasks, outbox=outbox,
                 sessions=sessions, metrics=metrics, probes=probes,
                 database=shared.db if shared is not None else None), shared


def lifespan(parts: Parts, shared: SharedStores | None):
    """Start-up and shutdown, in order."""
    background = Background(parts, shared.sessions if shared is not None else None)

    @contextlib.asynccontextmanager
    async def run(app: FastAPI):
        recover(parts.tasks, parts.outbox)
        parts.slot.start()
        await parts.outbox.start()
        background.start()
        if parts.auth.tenants.path is not None:
            _on_sighup(background.reload_tenants)
        try:
            yield
        finally:
            # The heartbeat goes on while tasks finish (or other front-ends would take this one for gone).
            unfinished = await parts.dispatcher.drain(parts.config.shutdown_timeout)
            background.stop()
            if unfinished:
                log.warning("%d task(s) did not finish before shutdown; recorded as failed", unfinished)
            await parts.outbox.flush(timeout=10)
            await parts.outbox.close()
            await asyncio.to_thread(parts.slot.close)
            parts.tasks.close()
            if shared is not None:
                shared.close()
            executors.shutdown()

    return run


def _on_sighup(reload) -> None:
    """SIGHUP re-reads the tenants file (where the loop can take signals: the main thread, not Windows)."""
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


def create_app(config: ServerConfig, slot: ModelSlot) -> FastAPI:
    parts, shared = build_parts(config, slot)
    app = FastAPI(title="k5serve", version=__version__, lifespan=lifespan(parts, shared), docs_url=None,
                  redoc_url=None, default_response_class=WireResponse,
                  description="A self-hosted, Runware-compatible API for Kandinsky 5.0 Image Lite.")
    app.state.parts = parts  # read through transport.parts.parts(request), typed
    openapi.install(app, config.max_tasks_per_request)
    for transport in (http, ws, task_view, usage, openai_router):
        app.include_router(transport.router)
    health.install(app, parts)
    playground.install(app)
    install_error_handlers(app)
    return app
