"""`GET /usage?since=…`: what each tenant used, from the usage ledger (`store.task_records.Usage`), so it
survives restarts and reads the same on every front-end sharing a database.

Keyed like `POST /v1` (an `Authorization: Bearer` key where the server has keys). A tenant sees its own usage,
an admin every tenant's. `since` is a Unix time in seconds or an ISO 8601 date or time (UTC unless it says
otherwise); without it, the last 24 hours. Per tenant: imageInference tasks finished, images, failures,
generation seconds (worker time) and cost in USD (`--price-per-gpu-hour`, as `includeCost` computes it).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from fastapi import APIRouter, Request

from ..protocol.errors import request_error
from ..protocol.wire import WireResponse
from ..store import executors
from .auth import bearer_caller
from .parts import parts

router = APIRouter()

DEFAULT_WINDOW = 86400.0


def parse_since(value: str | None, now: float) -> float:
    """`since` as a Unix time; a TaskError (invalidSince) naming the forms it takes."""
    if value is None:
        return now - DEFAULT_WINDOW
    try:
        return float(value) if value.replace(".", "", 1).isdigit() else _iso(value)
    except (ValueError, OverflowError):
        raise request_error("invalidSince", "since must be a Unix time in seconds or an ISO 8601 date or time "
                            "(2026-12-01, 2026-12-01T08:00:00Z).", parameter="since") from None


def _iso(value: str) -> float:
    when = datetime.datetime.fromisoformat(value)
    return (when if when.tzinfo else when.replace(tzinfo=datetime.UTC)).timestamp()


@router.get("/usage")
async def usage(request: Request, since: str | None = None) -> WireResponse:
    app = parts(request)
    caller = bearer_caller(request, app.auth)
    now = time.time()
    start = parse_since(since, now)
    totals = await executors.database(app.tasks.usage, start, None if caller.operator else caller.name)
    rows: list[dict[str, Any]] = [{"tenant": name, **row} for name, row in sorted(totals.items())]
    return WireResponse({"since": round(start, 3), "until": round(now, 3), "tenants": rows})
