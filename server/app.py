"""The ASGI application: wires config, auth, image store, dispatcher and worker; health endpoint.

The model loads in a background thread after start-up, so `/health` can say "loading" (503) until the
worker is ready and 200 afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipelines.worker import Worker

from . import http
from .auth import Authenticator
from .config import ServerConfig
from .dispatcher import Dispatcher
from .protocol import ErrorItem
from .store import ImageStore

log = logging.getLogger("k5serve.app")


def create_app(config: ServerConfig, load_worker: Callable[[], Worker]) -> FastAPI:
    store = ImageStore(config.image_dir)
    dispatcher = Dispatcher(config, None, store)
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
            removed = await asyncio.to_thread(store.sweep)
            if removed:
                log.info("removed %d expired image(s)", removed)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=load, name="k5serve-load", daemon=True)
        loader.start()
        sweeper = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            if dispatcher.worker is not None:
                await asyncio.to_thread(dispatcher.worker.close)

    app = FastAPI(title="k5serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.config = config
    app.state.auth = Authenticator(config.api_keys)
    app.state.store = store
    app.state.dispatcher = dispatcher
    app.include_router(http.router)

    @app.get("/health")
    async def health() -> JSONResponse:
        worker = dispatcher.worker
        if load_state["error"]:
            return JSONResponse({"status": "error", "error": load_state["error"]}, status_code=503)
        if worker is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        body = {"status": "ok" if worker.alive else "worker-dead", "queue": worker.queue_depth, **worker.describe()}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

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
