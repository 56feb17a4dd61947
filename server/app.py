"""The ASGI application: wires config, auth, stores, outbox, dispatcher and worker; /health, /ready, /metrics.

The model loads in a background thread after start-up. `/health` is liveness (200 while loading or
loaded, 503 once only a restart helps; the model's state is in the body); `/ready` is readiness: 200 only
when the model is loaded, the worker thread is alive and the queue is not full, else 503 with the
reasons. On shutdown (SIGTERM) the server stops taking tasks, lets the ones in flight finish (up to
`shutdown_timeout`), records the rest as failed, flushes the outbox and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from k5serve.pipelines.worker import Worker

from . import http, openapi, ws
from .auth import Authenticator
from .config import ServerConfig
from .dispatcher import Dispatcher
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .outbound import Outbox
from .protocol import TASK_TYPES, ErrorItem
from .store import ImageStore
from .tasks import SQLiteTaskStore
from .wire import WireResponse
from .validation import error_codes

log = logging.getLogger("k5serve.app")


def create_app(config: ServerConfig, load_worker: Callable[[], Worker]) -> FastAPI:
    images = ImageStore(config.image_dir)
    tasks = SQLiteTaskStore(config.task_db)
    outbox = Outbox(config.outbox_db, allow_private=config.allow_private_urls)
    metrics = Metrics(TASK_TYPES, error_codes())
    dispatcher = Dispatcher(config, None, images, tasks, outbox, metrics)
    sessions = ws.Sessions(config.ws_resume_window, config.ws_resume_buffer)
    load_state: dict = {"error": None}
    started = time.time()

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

    app = FastAPI(title="k5serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  default_response_class=WireResponse,
                  description="A self-hosted, Runware-compatible API for Kandinsky 5.0 Image Lite.")
    openapi.install(app, config.max_tasks_per_request)
    app.state.config = config
    app.state.auth = Authenticator(config.api_keys)
    app.state.store = images
    app.state.dispatcher = dispatcher
    app.state.sessions = sessions
    app.state.metrics = metrics
    app.include_router(http.router)
    app.include_router(ws.router)

    def readiness() -> dict[str, Any]:
        worker = dispatcher.worker
        reasons = []
        if load_state["error"]:
            reasons.append(f"model loading failed: {load_state['error']}")
        elif worker is None:
            reasons.append("the model is still loading")
        else:
            if not worker.alive:
                reasons.append("the generation worker has stopped")
            if worker.queue_full:
                reasons.append(f"the queue is full ({worker.max_queue} waiting besides the running task)")
        if not dispatcher.accepting:
            reasons.append("shutting down")
        model = "error" if load_state["error"] else "loading" if worker is None else "loaded"
        body: dict[str, Any] = {"ready": not reasons, "model": model, "uptimeSeconds": round(time.time() - started, 1)}
        if reasons:
            body["reasons"] = reasons
        if worker is not None:
            body |= {"workerAlive": worker.alive, "queue": worker.queue_depth, "queueLimit": worker.max_queue,
                     **worker.describe()}
            memory = worker.memory()
            if memory:
                body["gpuMemoryBytes"] = memory
        return body

    @app.get("/health")
    async def health() -> WireResponse:
        """Liveness: 200 while the process can still become or stay useful (loading counts); 503 when only a
        restart helps (the model failed to load, the worker thread died). /ready says whether to send work."""
        body = readiness()
        broken = body["model"] == "error" or body.get("workerAlive") is False
        return WireResponse({"status": "error" if broken else "ok", **body}, status_code=503 if broken else 200)

    @app.get("/ready")
    async def ready() -> WireResponse:
        body = readiness()
        return WireResponse(body, status_code=200 if body["ready"] else 503)

    def metric_state() -> dict[str, Any]:
        body = readiness()  # one look at the worker per scrape
        return {"ready": body["ready"], "queue_depth": body.get("queue", 0), "queue_limit": body.get("queueLimit", 0),
                "memory": body.get("gpuMemoryBytes", {}), "outbox": outbox.stats,
                "websockets": ws.open_connections(app)}

    metrics.watch(metric_state)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("k5serve")
    except PackageNotFoundError:
        return "0+unknown"
