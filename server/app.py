"""The ASGI application: wires config, auth, stores, outbox, dispatcher and worker; /health and /metrics.

The model loads in a background thread after start-up, so `/health` says "loading" (503) until the
worker is ready and 200 afterwards. On shutdown (SIGTERM) the server stops taking tasks, lets the ones in
flight finish (up to `shutdown_timeout`), records the rest as failed, flushes the outbox and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from pipelines.worker import Worker

from . import http, ws
from .auth import Authenticator
from .config import ServerConfig
from .dispatcher import Dispatcher
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .outbound import Outbox
from .protocol import ErrorItem
from .store import ImageStore
from .tasks import SQLiteTaskStore

log = logging.getLogger("k5serve.app")


def create_app(config: ServerConfig, load_worker: Callable[[], Worker]) -> FastAPI:
    images = ImageStore(config.image_dir)
    tasks = SQLiteTaskStore(config.task_db)
    outbox = Outbox(config.outbox_db, allow_private=config.allow_private_urls)
    metrics = Metrics()
    dispatcher = Dispatcher(config, None, images, tasks, outbox, metrics)
    sessions = ws.Sessions(config.ws_resume_window, config.ws_resume_buffer)
    load_state: dict = {"error": None}

    def load() -> None:
        try:
            dispatcher.worker = load_worker()
        except Exception as exc:  # noqa: BLE001 - reported by /health and the log
            load_state["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")

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
        loader = threading.Thread(target=load, name="k5serve-load", daemon=True)
        loader.start()
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
            if dispatcher.worker is not None:
                await asyncio.to_thread(dispatcher.worker.close)
            tasks.close()

    app = FastAPI(title="k5serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.auth = Authenticator(config.api_keys)
    app.state.store = images
    app.state.dispatcher = dispatcher
    app.state.sessions = sessions
    app.include_router(http.router)
    app.include_router(ws.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        worker = dispatcher.worker
        if load_state["error"]:
            return JSONResponse({"status": "error", "error": load_state["error"]}, status_code=503)
        if worker is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        body = {"status": "ok" if worker.alive else "worker-dead", "queue": worker.queue_depth, **worker.describe()}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        item = ErrorItem(code="invalidRequest", message=str(exc.errors()[0].get("msg", "invalid request")))
        return JSONResponse({"errors": [item.wire()]}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        item = ErrorItem(code="internalServerError", message="Internal server error; the request was not completed.")
        return JSONResponse({"errors": [item.wire()]}, status_code=500)

    return app
