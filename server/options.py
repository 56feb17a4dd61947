"""The one place configuration is built from the command line, the environment and a config file.

Every option is declared once, against the field of the config dataclass it fills (`ServerConfig`,
`EngineConfig`, `LoadConfig`, `AccelSettings`, `CheckpointChoice`, ...); its default is that field's
default. Each value comes from the first of:

1. the flag (`--image-ttl 3600`);
2. the environment (`K5SERVE_IMAGE_TTL=3600`; lists comma-separated; switches 1/0, true/false, yes/no, on/off;
   an empty variable counts as unset, and a variable is not read when its flag is given);
3. the TOML file given with `--config` (`image-ttl = 3600` or `image_ttl = 3600`); an unknown key is an error;
4. the dataclass default.

`--help` names each option's variable. Values from the environment and the file go through the same
parsing and checks as flags, and a bad one is reported with where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k5serve.accel import AccelSettings
from k5serve.pipelines.config import (
    ATTENTION_BACKENDS,
    MEMORY_PROFILES,
    OFFLOAD,
    QUANTIZE,
    TEXT_ENCODER_QUANT,
    EngineConfig,
    LoadConfig,
    SpeedSettings,
    WorkerConfig,
)
from k5serve.weights.checkpoints import CheckpointChoice

from .config import ListenConfig, LogConfig, ServerConfig
from .store.images import parse_s3_location

ENV_PREFIX = "K5SERVE_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class ConfigError(Exception):
    """A value that cannot be used; the message names the option and where the value came from."""


@dataclass(frozen=True)
class Option:
    name: str  # the flag without its dashes: "image-ttl"
    target: type  # the config dataclass whose field this option fills
    field: str  # that field's name
    help: str
    type: Callable[[str], Any] = str  # parses one value given as text (a flag, a variable, a TOML string)
    kind: str = "value"  # "value", "switch" (a flag without a value) or "list" (a repeatable flag)
    choices: tuple[str, ...] | None = None
    env_name: str | None = None  # default: K5SERVE_<NAME>
    negatable: bool = False  # a switch a memory profile may turn on: --no-<name> turns it off

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return self.env_name or ENV_PREFIX + self.dest.upper()

    @property
    def default(self) -> Any:
        field = {f.name: f for f in dataclasses.fields(self.target)}[self.field]
        return field.default

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        shown = "" if self.default in (None, False, ()) else f"default: {self.default}; "
        kw: dict[str, Any] = {"dest": self.dest, "default": argparse.SUPPRESS,
                              "help": f"{self.help} [{shown}env {self.env}]"}
        if self.kind == "switch":  # (--no-x turns off what a file, the environment or a memory profile set)
            kw["action"] = argparse.BooleanOptionalAction if self.negatable else "store_true"
        else:
            kw |= {"type": self.type, "choices": self.choices, "action": "append" if self.kind == "list" else "store"}
        parser.add_argument(f"--{self.name}", **kw)

    def from_text(self, text: str, source: str) -> Any:
        """A value given as text (an environment variable, a TOML string), parsed as a flag's would be."""
        try:
            if self.kind == "switch":
                if text.strip().lower() not in _TRUE | _FALSE:
                    raise ValueError(f"expected one of {', '.join(sorted(_TRUE | _FALSE - {''}))}")
                return text.strip().lower() in _TRUE
            values = [self._one(v.strip()) for v in text.split(",") if v.strip()] if self.kind == "list" else None
            return values if values is not None else self._one(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{source}: invalid value {text!r} for --{self.name}: {exc}") from None

    def from_toml(self, value: Any, source: str) -> Any:
        """A value from the config file: a string is parsed like a flag's; numbers and booleans must fit."""
        if self.kind == "list":
            items = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in items):
                raise ConfigError(f"{source}: --{self.name} takes a list of values")
            return [self._one(str(v), source) for v in items]
        if self.kind == "switch":
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: --{self.name} takes true or false, not {value!r}")
            return value
        if isinstance(value, str):
            return self._one(value, source)
        numeric = _NUMERIC.get(self.type)
        if numeric is None or isinstance(value, bool) or not isinstance(value, numeric):
            raise ConfigError(f"{source}: invalid value {value!r} for --{self.name}")
        return self.type(value) if self.type in (int, float) else self._one(str(value), source)

    def _one(self, text: str, source: str | None = None) -> Any:
        try:
            value = self.type(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            if source is None:
                raise
            raise ConfigError(f"{source}: invalid value {text!r} for --{self.name}: {exc}") from None
        if self.choices is not None and value not in self.choices:
            message = f"invalid value {text!r} for --{self.name}: choose from {', '.join(self.choices)}"
            if source is None:
                raise ValueError(message)
            raise ConfigError(f"{source}: {message}")
        return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def image_location(text: str) -> str:
    """A folder, or s3://bucket/prefix (checked here, so that a typo stops the server before it starts)."""
    if text.startswith("s3://"):
        try:
            parse_s3_location(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    elif "://" in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a folder or s3://bucket/prefix")
    return text


def ray_app_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, '_' and '-', at most 64")
    return text


def http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r}: expected an http:// or https:// URL")
    if "@" in text.split("/")[2]:
        raise argparse.ArgumentTypeError("no credentials in the URL: give them in AWS_ACCESS_KEY_ID and "
                                         "AWS_SECRET_ACCESS_KEY or ~/.aws")
    return text.rstrip("/")


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def byte_size(text: str) -> int:
    """Bytes, with an optional unit: 16GB (10^9), 16GiB (2^30), 500MB, 12000000000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes, e.g. 16GB, 12GiB or 500MB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return value


def replica_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or not 0 <= int(low) <= int(high) or int(high) < 1:
        raise argparse.ArgumentTypeError("expected MIN:MAX replicas, e.g. 1:4")
    return int(low), int(high)


# Types whose values a config file may give as TOML numbers (checked as a flag's text would be).
_NUMERIC = {int: (int,), float: (int, float), positive: (int,), non_negative: (int,), positive_float: (int, float),
            byte_size: (int,)}


def coefficients(path: str) -> tuple[float, ...]:
    """Read and check the TeaCache file when the options are read, not when the model has loaded."""
    from k5serve.accel.calibration import load_coefficients

    try:
        return load_coefficients(path)
    except (OSError, ValueError, KeyError) as exc:
        raise argparse.ArgumentTypeError(f"cannot use {path}: {exc}") from None


LOG_OPTIONS = (
    Option("log-level", LogConfig, "level", "log level: debug, info, warning, error"),
    Option("log-format", LogConfig, "format", "json (one object per line, with taskUUID; serve's default when "
           "stderr is not a terminal) or text (the default at a terminal)", choices=("json", "text")),
)

MODEL_OPTIONS = (
    Option("model", CheckpointChoice, "model", "Hugging Face repo id (in the cache) or local diffusers folder"),
    Option("tiny", CheckpointChoice, "tiny", "use generated tiny weights (CPU test mode)", kind="switch"),
    Option("device", LoadConfig, "device", "auto, cpu, cuda, cuda:N"),
    Option("dtype", LoadConfig, "dtype", "auto, bfloat16, float16, float32"),
    Option("data-dir", ServerConfig, "data_dir", "task records, images, outbox and tiny weights", type=Path),
    Option("i2i-model", CheckpointChoice, "i2i_model", "editing model: repo id (in the cache) or folder; default: "
           "the I2I Lite repo when it is downloaded; 'none' to disable"),
    Option("i2i-load", EngineConfig, "i2i_load", "load the editing transformer on the first editing request "
           "(lazy) or at start-up", choices=("lazy", "eager")),
    Option("lora-dir", EngineConfig, "lora_dir", "folder of LoRA files: lora[].model X loads X.safetensors",
           type=Path),
    Option("max-loras", EngineConfig, "max_loras", "LoRA adapters kept loaded (LRU)", type=int),
    Option("teacache-coefficients", AccelSettings, "teacache_coefficients", "TeaCache polynomial from `k5serve "
           "calibrate teacache` (a JSON file; default: identity, uncalibrated)", type=coefficients),
    Option("dbcache-fn", AccelSettings, "dbcache_fn_blocks", "DBCache: first blocks always computed (default 8 "
           "on the full model)", type=int),
    Option("offload", LoadConfig, "offload", "where weights wait between uses (CUDA only): model = whole "
           "components move to the GPU when used, sequential = layer by layer (least memory, slowest), group = the "
           "transformer's blocks streamed from pinned host memory as they run (diffusers' group offloading, CUDA "
           "streams)", choices=OFFLOAD),
    Option("text-encoder-quant", LoadConfig, "text_encoder_quant", "the Qwen2.5-VL text encoder's weights: nf4 "
           "(bitsandbytes, about 5.9 GB), int8 or fp8 (torchao weight-only, about 9.4 GB) instead of 16.6 GB in "
           "bfloat16 (pip install 'k5serve[quant]')", choices=TEXT_ENCODER_QUANT),
    Option("text-encoder-offload", LoadConfig, "text_encoder_offload", "keep the text encoders in host memory "
           "and on the GPU only while they encode a prompt the prompt cache does not hold (CUDA only)",
           kind="switch", negatable=True),
    Option("memory-profile", LoadConfig, "memory_profile", "a combination of the memory options for a card size "
           "(full, 24gb, 16gb, 12gb; docs/performance.md), or auto: the fastest whose memory plan fits the "
           "device's free memory; options given explicitly override the profile's", choices=("auto",
                                                                                              *MEMORY_PROFILES)),
    Option("memory-budget", LoadConfig, "memory_budget", "bytes the memory plan must fit (e.g. 16GB, 12GiB), "
           "when less than the device's free memory; on a GPU the allocator is held to it too",
           type=byte_size),
    Option("safety-model", CheckpointChoice, "safety_model", "NSFW image classifier for safety checks: repo id "
           "(in the cache) or folder; default: the Falconsai/nsfw_image_detection repo when downloaded; 'none' to "
           "disable"),
    Option("safety-threshold", EngineConfig, "safety_threshold", "flag an image when the classifier's unsafe "
           "probability is at least this", type=fraction),
    Option("compile", SpeedSettings, "compile", "torch.compile the transformer's repeated blocks (regional "
           "compilation; the first request at each new shape pays the compile, unless --warmup)", kind="switch"),
    Option("attention-backend", SpeedSettings, "attention_backend", "attention kernel, through diffusers' "
           "attention dispatcher: native (PyTorch SDPA's own choice), math (SDPA's reference kernel), cudnn, "
           "sdpa-flash, sdpa-efficient (SDPA forced onto one kernel), flash (flash-attn), flash3 (FlashAttention "
           "3, Hopper), sage (sageattention); checked at start-up",
           choices=tuple(ATTENTION_BACKENDS)),
    Option("quantize", SpeedSettings, "quantize", "fp8: FP8 matrix products in the transformer blocks' linear "
           "layers (torchao; GPUs of compute capability 8.9+; pip install 'k5serve[fp8]')", choices=QUANTIZE),
    Option("fp8-storage", SpeedSettings, "fp8_storage", "store the transformer's weights in FP8 and compute in "
           "the model dtype (about half its memory, a little slower; any device)", kind="switch", negatable=True),
    Option("prompt-cache", SpeedSettings, "prompt_cache", "text-encoder outputs kept for repeated prompts "
           "(LRU entries; 0 = off)", type=non_negative),
)

SERVE_OPTIONS = MODEL_OPTIONS + (
    Option("host", ListenConfig, "host", "address to listen on"),
    Option("port", ListenConfig, "port", "port to listen on", type=int),
    Option("header-timeout", ListenConfig, "header_timeout", "seconds a connection may take to send a complete "
           "request head (also between keep-alive requests) before it is closed", type=positive_float),
    Option("max-connections", ListenConfig, "max_connections", "HTTP and WebSocket connections open at once; "
           "more are answered 503 and closed (the open-file limit is raised to fit)", type=positive),
    Option("api-key", ServerConfig, "api_keys", "accepted API key (repeatable); none = open access", kind="list",
           env_name="K5SERVE_API_KEYS"),
    Option("tenants", ServerConfig, "tenants_file", "TOML file of tenants: a name, a key (or its SHA-256), a "
           "fair-share weight, limits, admin; re-read when it changes and on SIGHUP", type=Path),
    Option("public-url", ServerConfig, "public_url", "base URL for image links (default: the request's own host)"),
    Option("model-alias", ServerConfig, "model_aliases", "extra model id accepted (repeatable)", kind="list"),
    Option("max-queue", ServerConfig, "max_queue", "tasks waiting for the GPU before 429s", type=int),
    Option("max-tasks-per-request", ServerConfig, "max_tasks_per_request", "tasks in one HTTP body or WebSocket "
           "frame (more: maxTasksExceeded)", type=int),
    Option("ws-auth-timeout", ServerConfig, "ws_auth_timeout", "seconds a WebSocket may take to authenticate "
           "before it is closed (1008)", type=float),
    Option("max-unauthenticated-websockets", ServerConfig, "max_unauthenticated_websockets", "WebSockets open at "
           "once that have not authenticated; more are refused", type=int),
    Option("image-ttl", ServerConfig, "image_ttl", "seconds images are kept without a ttl", type=int),
    Option("price-per-gpu-hour", ServerConfig, "price_per_gpu_hour", "USD, for includeCost", type=float),
    Option("allow-private-urls", ServerConfig, "allow_private_urls", "let webhooks, uploads and image URLs reach "
           "loopback/private/link-local addresses", kind="switch"),
    Option("max-image-bytes", ServerConfig, "max_image_bytes", "largest accepted input image (bytes, checked "
           "before decoding)", type=int),
    Option("max-image-pixels", ServerConfig, "max_image_pixels", "largest accepted input image (pixels, read "
           "from the header before decoding)", type=int),
    Option("poll-wait", ServerConfig, "poll_wait", "seconds a getResponse waits for an unfinished task before "
           "answering", type=float),
    Option("shutdown-timeout", ServerConfig, "shutdown_timeout", "seconds SIGTERM waits for tasks in flight",
           type=float),
    Option("safety-action", ServerConfig, "safety_action", "for safety-checked tasks: flag images (NSFWContent) "
           "or fail the task with nsfwContentDetected when any image is flagged", choices=("flag", "block")),
    Option("database", ServerConfig, "database", "PostgreSQL URL (postgresql://user:password@host/db) for task "
           "records and the webhook/upload outbox, shared by several front-ends (pip install "
           "'k5serve[postgres]'); default: SQLite files under --data-dir", env_name="K5SERVE_DATABASE_URL"),
    Option("image-store", ServerConfig, "image_store", "where generated and uploaded images live: a folder (a "
           "shared mount lets several front-ends serve the same files) or s3://bucket/prefix (pip install "
           "'k5serve[s3]'; credentials from the AWS environment variables or ~/.aws) (default: images/ under "
           "--data-dir)", type=image_location),
    Option("s3-endpoint", ServerConfig, "s3_endpoint", "with an s3:// image store: the URL of an S3-compatible "
           "server (MinIO, R2, Ceph, ...); default: AWS S3", type=http_url),
    Option("image-urls", ServerConfig, "image_urls", "with an s3:// image store: imageURL on this server, "
           "which streams the object (proxy), or a presigned URL on the bucket valid for the image's TTL, at "
           "most 7 days (presigned)", choices=("proxy", "presigned")),
    Option("task-lease", ServerConfig, "task_lease", "with --database: seconds a front-end may go without "
           "renewing its heartbeat before another front-end fails its tasks (a database outage does not count)",
           type=positive_float),
    Option("min-free-disk", ServerConfig, "min_free_disk", "bytes that must stay free on the disks of --data-dir "
           "and a folder --image-store: below it /ready answers 503 and new tasks and uploads are refused with "
           "storageFull (0: no check)", type=non_negative),
    Option("max-tasks-per-connection", ServerConfig, "max_tasks_per_connection", "tasks of any type one "
           "WebSocket connection may have in flight (until their answers are sent); more are answered "
           "rateLimitExceeded (an HTTP request's are bounded by --max-tasks-per-request)",
           type=positive),
    Option("max-tasks-per-key", ServerConfig, "max_tasks_per_key", "the same over all connections that use one "
           "API key (with open access: over everyone)", type=positive),
    Option("ws-resume-bytes", ServerConfig, "ws_resume_bytes", "bytes of result frames kept for one disconnected "
           "WebSocket session (oldest dropped first, counted in /metrics)", type=positive),
    Option("ws-resume-total-bytes", ServerConfig, "ws_resume_total_bytes", "the same over all sessions of this "
           "front-end", type=positive),
    Option("workers", WorkerConfig, "kind", "where generation runs: local (a thread in this process) or ray "
           "(Ray Serve replicas, one engine on one device each; pip install 'k5serve[ray]')",
           choices=("local", "ray")),
    Option("replicas", WorkerConfig, "replicas", "--workers ray: replicas (default: one per GPU in the Ray "
           "cluster, or 1 without GPUs)", type=positive),
    Option("autoscale", WorkerConfig, "autoscale", "--workers ray: MIN:MAX replicas under Ray Serve's "
           "autoscaling, instead of --replicas", type=replica_range),
    Option("ray-address", WorkerConfig, "ray_address", "--workers ray: join this Ray cluster (auto, or "
           "host:port); default: start a local Ray instance and stop it on exit"),
    Option("ray-app", WorkerConfig, "ray_app", "--workers ray: the name of the Ray Serve application this "
           "front-end deploys its replicas as (and removes on exit); several front-ends on one Ray cluster each "
           "need their own", type=ray_app_name),
    Option("replica-threads", WorkerConfig, "replica_threads", "--workers ray on the CPU: torch threads (and "
           "Ray CPUs) per replica (default: the cluster's cores divided by the replicas)", type=positive),
    Option("warmup", SpeedSettings, "warmup", "generate once at every size before /ready reports ready (and "
           "through the editing model with --i2i-load eager), so no request pays --compile's compilation",
           kind="switch"),
    Option("fallback-tiny", CheckpointChoice, "fallback_tiny", "with no GPU or no downloaded weights, serve "
           "generated tiny weights on the CPU instead of failing", kind="switch"),
)


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> None:
    for option in options:
        option.add_to(parser)


def resolve(options: Iterable[Option], given: argparse.Namespace, environ: Mapping[str, str] | None = None,
            config_file: Path | None = None, explicit: set[str] | None = None) -> dict[str, Any]:
    """Every option's value by dest, from flag > environment > file > default. `explicit`, when given, receives
    the dests of the options given by any of the first three (not left at their default)."""
    options = list(options)
    environ = os.environ if environ is None else environ
    values = {o.dest: o.default for o in options}
    found: dict[str, Any] = {}
    if config_file is not None:
        found |= read_config_file(config_file, options)
    for option in options:
        # A flag wins without its variable being read (Kubernetes sets K5SERVE_PORT=tcp://... for a Service
        # named k5serve); an empty variable counts as unset.
        if not hasattr(given, option.dest) and environ.get(option.env, "").strip():
            found[option.dest] = option.from_text(environ[option.env], f"environment variable {option.env}")
    found |= {o.dest: getattr(given, o.dest) for o in options if hasattr(given, o.dest)}
    if explicit is not None:
        explicit.update(found)
    return values | found


def read_config_file(path: Path, options: Iterable[Option]) -> dict[str, Any]:
    by_key = {o.dest: o for o in options}
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    values = {}
    for key, value in data.items():
        option = by_key.get(key.replace("-", "_"))
        if option is None:
            raise ConfigError(f"{path}: unknown option {key!r}; the options are "
                              + ", ".join(o.name for o in by_key.values()))
        values[option.dest] = option.from_toml(value, f"{path}: {key}")
    return values


def build(target: type, options: Iterable[Option], values: Mapping[str, Any], **extra: Any) -> Any:
    """The `target` dataclass filled from the options that belong to it (lists become tuples)."""
    fields = {o.field: tuple(values[o.dest]) if o.kind == "list" else values[o.dest]
              for o in options if o.target is target}
    return target(**fields, **extra)
