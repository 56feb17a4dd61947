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
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from k5serve import __version__

from . import http, openapi, ops, ws
from .auth import Authenticator
from .config import ServerConfig
from .dispatcher import Dispatcher
from .metrics import Metrics
from .outbox import Outbox
from .protocol import TASK_TYPES, ErrorItem
from .slot import ModelSlot
from .store import ImageStore
from .tasks import SQLiteTaskStore
from .validation import error_codes
from .wire import WireResponse

log = logging.getLogger("k5serve.app")


def create_app(config: ServerConfig, slot: ModelSlot) -> FastAPI:
    images = ImageStore(config.image_dir)
    tasks = SQLiteTaskStore(config.task_db)
    outbox = Outbox(config.outbox_db, allow_private=config.allow_private_urls)
    metrics = Metrics(TASK_TYPES, error_codes())
    dispatcher = Dispatcher(config, slot, images, tasks, outbox, metrics)
    sessions = ws.Sessions(config.ws_resume_window, config.ws_resume_buffer)

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(config.sweep_interval)
            removed = await asyncio.to_thread(images.sweep) + await asyncio.to_thread(tasks.sweep)
            sessions.sweep()
            if removed:
                log.info("removed %d expired image(s)/task record(s)", removed)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        lost = tasks.recover("The server restarted before this task finished; run it again.")
        if lost:
            log.warning("%d task(s) were in flight when the server last stopped; marked as failed", lost)
        slot.start()
        await outbox.start()
        sweeper = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            unfinished = await dispatcher.drain(config.shutdown_timeout)
            if unfinished:
                log.warning("%d task(s) did not finish before shutdown; recorded as failed", unfinished)
            await outbox.flush(timeout=10)
            await outbox.close()
            await asyncio.to_thread(slot.close)
            tasks.close()

    app = FastAPI(title="k5serve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=WireResponse,
                  description="A self-hosted, Runware-compatible API for Kandinsky 5.0 Image Lite.")
    openapi.install(app, config.max_tasks_per_request)
    app.state.config = config
    app.state.auth = Authenticator(config.api_keys)
    app.state.store = images
    app.state.slot = slot
    app.state.outbox = outbox
    app.state.dispatcher = dispatcher
    app.state.sessions = sessions
    app.state.metrics = metrics
    app.state.started = time.time()
    app.include_router(http.router)
    app.include_router(ws.router)
    ops.install(app)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> WireResponse:
        item = ErrorItem(code="invalidRequest", message=str(exc.errors()[0].get("msg", "invalid request")))
        return WireResponse({"errors": [item.wire()]}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> WireResponse:
        log.exception("unhandled error on %s", request.url.path)
        item = ErrorItem(code="internalServerError", message="Internal server error; the request was not completed.")
        return WireResponse({"errors": [item.wire()]}, status_code=500)

    return app
