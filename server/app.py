"""The ASGI application: builds the stores, outbox, metrics and dispatcher around a `ModelSlot`, mounts the
transports and the operations endpoints, and runs start-up and shutdown.

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
import socket
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from k5serve import __version__

from .config import ServerConfig
from .ops.metrics import Metrics
from .ops.probes import Probes
from .outbound.outbox import Outbox
from .protocol import openapi
from .protocol.errors import ErrorItem, StoreUnavailable
from .protocol.models import TASK_TYPES
from .protocol.validation import error_codes
from .protocol.wire import WireResponse
from .store import executors
from .store.images import DirectoryImageStore, ImageStore
from .store.task_records import SQLiteTaskStore, TaskStore, webhook_error
from .tasks.dispatcher import Dispatcher
from .tasks.slot import ModelSlot
from .transport import health as ops
from .transport import http, playground, ws
from .transport import task_view as queue
from .transport.auth import Authenticator
from .transport.sessions import Sessions

log = logging.getLogger("k5serve.app")

FRONTEND_LOST = ("The front-end running this task stopped before it finished (it stopped renewing its lease); "
                 "run it again.")


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


def create_app(config: ServerConfig, slot: ModelSlot) -> FastAPI:
    images = open_image_store(config)
    shared = SharedStores(config) if config.database else None
    if shared is not None:
        tasks, outbox_store = shared.tasks, shared.outbox
    else:
        tasks, outbox_store = SQLiteTaskStore(config.task_db), config.outbox_db
    outbox = Outbox(outbox_store, allow_private=config.allow_private_urls)
    metrics = Metrics(TASK_TYPES, error_codes())
    probes = Probes(config, images, shared.db if shared is not None else None)
    dispatcher = Dispatcher(config, slot, images, tasks, outbox, metrics, check_room=probes.check_room)
    sessions = Sessions(config.ws_resume_window, config.ws_resume_buffer, shared.sessions if shared else None,
                        max_bytes=config.ws_resume_bytes, max_total_bytes=config.ws_resume_total_bytes,
                        instance=shared.instance if shared is not None else "",
                        on_drop=lambda reason, n: metrics.ws_frames_dropped.labels(reason).inc(n))

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(config.sweep_interval)
            sessions.sweep()
            jobs = [("images", images.sweep), ("task records", tasks.sweep)]
            if shared is not None:
                jobs.append(("WebSocket sessions", lambda: shared.sessions.sweep(config.ws_resume_window) or 0))
            for what, sweep in jobs:  # each on its own: one store being away does not stop the others' sweeps
                try:
                    removed = await (executors.images if what == "images" else executors.database)(sweep)
                except StoreUnavailable as exc:
                    log.warning("sweeping expired %s: %s", what, getattr(exc, "detail", exc))
                    continue
                if removed:
                    log.info("removed %d expired %s", removed, what)

    async def heartbeat_forever() -> None:
        """Shared stores: keep this front-end's tasks alive, and fail those of front-ends that stopped."""
        while True:
            await asyncio.sleep(config.task_lease / 3)
            try:
                await executors.database(tasks.heartbeat)
                lost = await executors.database(tasks.expire_stale, FRONTEND_LOST)
            except StoreUnavailable as exc:
                log.warning("task heartbeat: %s", exc)
                continue
            if lost:
                log.warning("%d task(s) of a front-end that stopped were marked as failed", lost)

    async def relay_forever() -> None:
        """Shared stores: results other front-ends left for WebSocket sessions connected here."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await sessions.relay()
            except StoreUnavailable as exc:
                log.warning("relaying WebSocket results: %s", exc)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        recover(tasks, outbox)
        slot.start()
        await outbox.start()
        background = [asyncio.create_task(sweep_forever()), asyncio.create_task(probes.run())]
        if shared is not None:
            background += [asyncio.create_task(heartbeat_forever()), asyncio.create_task(relay_forever())]
        try:
            yield
        finally:
            # The heartbeat goes on while tasks finish (or other front-ends would take this one for gone).
            unfinished = await dispatcher.drain(config.shutdown_timeout)
            for job in background:
                job.cancel()
            if unfinished:
                log.warning("%d task(s) did not finish before shutdown; recorded as failed", unfinished)
            await outbox.flush(timeout=10)
            await outbox.close()
            await asyncio.to_thread(slot.close)
            tasks.close()
            if shared is not None:
                shared.close()
            executors.shutdown()

    app = FastAPI(title="k5serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=WireResponse,
                  description="A self-hosted, Runware-compatible API for Kandinsky 5.0 Image Lite.")
    openapi.install(app, config.max_tasks_per_request)
    app.state.config = config
    app.state.auth = Authenticator(config.api_keys)
    app.state.store = images
    app.state.probes = probes
    app.state.slot = slot
    app.state.outbox = outbox
    app.state.database = shared.db if shared is not None else None
    app.state.dispatcher = dispatcher
    app.state.sessions = sessions
    app.state.metrics = metrics
    app.state.started = time.time()
    app.include_router(http.router)
    app.include_router(ws.router)
    app.include_router(queue.router)
    ops.install(app)
    playground.install(app)
    install_error_handlers(app)
    return app


# Errors that reach the app outside a task, each answered in the Runware error shape.
async def bad_request(request: Request, exc: RequestValidationError) -> WireResponse:
    item = ErrorItem(code="invalidRequest", message=str(exc.errors()[0].get("msg", "invalid request")))
    return WireResponse({"errors": [item.wire()]}, status_code=400)


async def no_route(request: Request, exc: HTTPException) -> WireResponse:
    """A path or method the server does not serve, answered in the Runware error shape like the rest."""
    where = f"{getattr(request, 'method', 'WebSocket')} {request.url.path[:200]}"
    if exc.status_code == 405 and request.url.path.rstrip("/") == "/v1":
        item = ErrorItem(code="methodNotAllowed", message=f"{where} is not served: send tasks as a JSON array "
                         "with POST /v1, or open a WebSocket to /v1.")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "another method")
        item = ErrorItem(code="methodNotAllowed", message=f"{where} is not served; {allowed} is.")
    elif exc.status_code == 404:
        item = ErrorItem(code="notFound", message=f"{where}: no such endpoint; the API is POST /v1 (and a "
                         "WebSocket on /v1); /docs describes every endpoint.")
    else:
        item = ErrorItem(code="invalidRequest", message=str(exc.detail))
    return WireResponse({"errors": [item.wire()]}, status_code=exc.status_code, headers=exc.headers)


async def internal_error(request: Request, exc: Exception) -> WireResponse:
    log.exception("unhandled error on %s", request.url.path)
    item = ErrorItem(code="internalServerError", message="Internal server error; the request was not completed.")
    return WireResponse({"errors": [item.wire()]}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(HTTPException, no_route)
    app.add_exception_handler(Exception, internal_error)
