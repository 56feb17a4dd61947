"""Operator settings of a running server. `options.py` builds them from flags, environment and a config file;
the defaults here are the command line's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path(".k5serve")
    api_keys: tuple[str, ...] = ()  # empty (and no tenants file) = open access
    tenants_file: Path | None = None  # TOML [[tenant]] tables (server/tenants.py), re-read when it changes
    public_url: str | None = None  # base for image URLs; default: the request's own scheme://host
    model_aliases: tuple[str, ...] = ()  # extra model ids accepted as this model
    max_queue: int = 64  # tasks waiting for the generation worker (besides the running one) before 429s
    image_ttl: int = 86400  # seconds an image is kept when the request gives no ttl
    max_body_bytes: int = 64 * 1024 * 1024  # base64 images travel inline
    max_unauthenticated_bytes: int = 64 * 1024  # body read before a key is seen (header or first task)
    max_tasks_per_request: int = 100  # tasks in one HTTP body or WebSocket frame
    price_per_gpu_hour: float = 2.0  # USD; cost = busy seconds x price / 3600
    sweep_interval: float = 30.0  # seconds between expired-image sweeps
    retry_after: int = 5  # seconds suggested to clients when the queue is full
    upload_ttl: int = 7 * 86400  # seconds an imageUpload is kept
    max_image_bytes: int = 32 * 1024 * 1024  # per image input, before decoding
    max_image_pixels: int = 4096 * 4096  # per image input, read from the header before decoding
    allow_private_urls: bool = False  # outbound URLs to loopback/private/link-local addresses
    poll_wait: float = 10.0  # seconds a getResponse waits for an unfinished task before answering
    ws_max_message_bytes: int = 64 * 1024 * 1024  # inbound WebSocket frames (base64 images travel inline)
    ws_auth_timeout: float = 10.0  # seconds a WebSocket may take to authenticate before it is closed
    max_unauthenticated_websockets: int = 64  # open at once; more are refused at the handshake
    ws_resume_window: float = 120.0  # seconds undelivered WebSocket results wait for a reconnect
    ws_resume_buffer: int = 256  # frames kept per disconnected session
    shutdown_timeout: float = 60.0  # seconds SIGTERM waits for tasks in flight
    safety_action: str = "flag"  # "flag": NSFWContent per image; "block": fail the task if any image is flagged
    database: str | None = None  # PostgreSQL URL: task records and outbox shared by front-ends; None = SQLite
    image_store: str | None = None  # a folder (a shared mount for several front-ends) or s3://bucket/prefix;
    #                                 None = images/ under data_dir
    s3_endpoint: str | None = None  # an S3-compatible server (MinIO, R2, Ceph); None = AWS S3
    image_urls: str = "proxy"  # S3: "proxy" (imageURL on this server, streamed) or "presigned" (on the bucket)
    task_lease: float = 30.0  # with a database: seconds without a heartbeat before a front-end's tasks fail
    min_free_disk: int = 256 * 2**20  # bytes free on the data dir's and image folder's disks, else new work is refused
    max_tasks_per_connection: int = 64  # tasks of any type in flight on one WebSocket, else rateLimitExceeded
    max_tasks_per_key: int = 256  # the same over all connections of one API key (open access: of everyone)
    ws_resume_bytes: int = 32 * 2**20  # frames kept for one disconnected WebSocket session, oldest dropped first
    ws_resume_total_bytes: int = 128 * 2**20  # the same over all sessions of this front-end

    @property
    def s3_image_store(self) -> bool:
        return self.image_store is not None and self.image_store.startswith("s3://")

    @property
    def task_db(self) -> Path:
        return self.data_dir / "tasks.sqlite3"

    @property
    def outbox_db(self) -> Path:
        return self.data_dir / "outbox.sqlite3"


@dataclass(frozen=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    header_timeout: float = 10.0  # seconds a connection may take to send a complete request head, then closed
    max_connections: int = 1024  # HTTP and WebSocket connections open at once; more are answered 503 and closed


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    # "json" or "text"; None: json for `serve` (text when stderr is a terminal), text for the other commands
    format: str | None = None
