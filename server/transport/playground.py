"""The playground: `GET /` (type a prompt, watch it render, reuse what worked), `GET /queue` (what the server
is doing) and `GET /docs` (the API, read from /openapi.json), with their assets under `/playground/`.

Static files only, served from this package (nothing from another host, so the page works on an offline
network). The page is a plain client of the public protocol: the WebSocket at `/v1`, `GET /tasks`, `/ready`
and `/openapi.json` (for the ranges validation enforces). The Content-Security-Policy keeps it to this server:
scripts and styles from here, connections to here, images from here (and from the bucket with presigned URLs).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

from .parts import parts

PAGES = Path(__file__).parent / "playground"  # index.html, queue.html, api.html
ASSETS = PAGES / "static"  # CSS and JavaScript, at /playground/
HOST = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")  # a Host header fit for the CSP

router = APIRouter()


def _policy(request: Request) -> str:
    config = parts(request).config
    host = request.headers.get("host", "")  # the page's own origin, for its WebSocket (ws: is not 'self' everywhere)
    if not HOST.match(host):
        host = ""
    images = ["'self'", "data:", "blob:"]
    if config.public_url:  # image URLs are built on --public-url
        public = urlsplit(config.public_url)
        images.append(f"{public.scheme}://{public.netloc}")
    if config.s3_image_store and config.image_urls == "presigned":  # image URLs point at the bucket
        endpoint = urlsplit(config.s3_endpoint) if config.s3_endpoint else None
        images.append(f"{endpoint.scheme}://{endpoint.netloc}" if endpoint else "https://*.amazonaws.com")
    connect = ["'self'"] + ([f"ws://{host}", f"wss://{host}"] if host else [])
    return "; ".join([
        "default-src 'none'", "script-src 'self'", "style-src 'self'", f"img-src {' '.join(images)}",
        f"connect-src {' '.join(connect)}", "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    ])


def _page(name: str, request: Request) -> FileResponse:
    return FileResponse(PAGES / name, media_type="text/html", headers={
        "Content-Security-Policy": _policy(request), "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer"})


@router.get("/", include_in_schema=False)
async def playground(request: Request) -> FileResponse:
    return _page("index.html", request)


@router.get("/queue", include_in_schema=False)
async def queue_page(request: Request) -> FileResponse:
    return _page("queue.html", request)


@router.get("/docs", include_in_schema=False)
async def api_page(request: Request) -> FileResponse:
    """The API as a page to read: /openapi.json rendered by static/api.js (FastAPI's own /docs is off: its
    Swagger UI comes from a CDN, out of reach offline and outside the CSP)."""
    return _page("api.html", request)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/playground", StaticFiles(directory=ASSETS), name="playground")
