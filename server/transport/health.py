"""Operating the server: `/health` (liveness), `/ready` (readiness) and `/metrics` (Prometheus).

`/health` answers 200 while the process can still become or stay useful (loading counts) and 503 when only
a restart helps (the model failed to load, the worker stopped); `/ready` answers 200 only when the model
is loaded, the worker is alive, its queue is not full, the stores answer, the disk has room and the server
is not shutting down, else 503 with the reasons. Both carry the model's state and the worker's description
in the body.

None of them waits on a store: `Probes` asks the database, the image store and the file systems in the
background, once a second, each on a thread of its own with its own time-out, and the endpoints read what
it found. A database outage, a hung bucket or a full thread pool cannot make a liveness probe time out.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from ..ops.metrics import CONTENT_TYPE_LATEST
from ..protocol.wire import WireResponse
from ..tasks.slot import FAILED
from . import listen
from .parts import Parts, parts

log = logging.getLogger("k5serve.app")
router = APIRouter()


def readiness(app: Parts) -> dict[str, Any]:
    """The model's, the worker's and the stores' state, as the last probes found them (`Probes`)."""
    probes = app.probes
    reasons, worker = app.slot.readiness()
    if not app.dispatcher.accepting:
        reasons.append("shutting down")
    stores: dict[str, Any] = {}
    db = app.database
    if db is not None:
        error = db.probe_error
        stores["database"] = {"kind": "postgresql", "reachable": error is None, "schemaVersion": db.version,
                              "pool": db.stats()} | ({"error": error} if error else {})
        if error:
            reasons.append(error)
    image_store = dict(probes.image_store)
    if "problem" in image_store:
        reasons.append(image_store["problem"])
    stores["imageStore"] = image_store
    if probes.low_disk:
        reasons.append(probes.low_disk)
    stores["disk"] = {"freeBytes": dict(probes.free), "minFreeBytes": probes.min_free} | (
        {"problem": probes.low_disk} if probes.low_disk else {})
    body: dict[str, Any] = {"ready": not reasons, "model": app.slot.state,
                            "uptimeSeconds": round(time.time() - app.started, 1)}
    if app.auth.tenants.path is not None:  # (without a tenants file, nothing to say: not even how many keys)
        body["tenants"] = app.auth.tenants.status()
    if reasons:
        body["reasons"] = reasons
    return body | worker | stores


@router.get("/health")
async def health(request: Request) -> WireResponse:
    """Liveness: 200 while the process can still become or stay useful (loading counts); 503 when only a
    restart helps (the model failed to load, the worker thread died). /ready says whether to send work."""
    body = readiness(parts(request))
    broken = body["model"] == FAILED or body.get("workerAlive") is False
    return WireResponse({"status": "error" if broken else "ok", **body}, status_code=503 if broken else 200)


@router.get("/ready")
async def ready(request: Request) -> WireResponse:
    body = readiness(parts(request))
    return WireResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    return Response(parts(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, app_parts: Parts) -> None:
    """Count every HTTP request by route and status, and let each scrape read the live state once."""

    def metric_state() -> dict[str, Any]:
        body = readiness(app_parts)  # one look at the worker per scrape
        return {"ready": body["ready"], "queue_depth": body.get("queue", 0), "queue_limit": body.get("queueLimit", 0),
                "memory": body.get("gpuMemoryBytes", {}), "outbox": app_parts.outbox.stats,
                "websockets": app_parts.websockets.open, "disk_free": dict(app_parts.probes.free),
                "connections_closed": {"slow_head": listen.closed_slow_heads(),
                                       "refused": listen.refused_connections()},
                "database": body["database"]["pool"] if "database" in body else None}

    app_parts.metrics.watch(metric_state)

    @app.middleware("http")
    async def count_requests(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        app_parts.metrics.http_requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    app.include_router(router)
