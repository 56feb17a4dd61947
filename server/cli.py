"""`k5serve`: serve the Runware API, generate offline, build or fetch weights."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("k5serve")

BANNER = """
==============================================================================
  CPU TEST MODE: serving GENERATED TINY WEIGHTS ({reason}).
  Images are noise from a randomly initialised model. The API, validation and
  pipeline code are the real ones. For real images on a GPU run:
      k5serve weights download && k5serve serve
==============================================================================
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="k5serve", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("K5SERVE_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=["json", "text"], default=os.environ.get("K5SERVE_LOG_FORMAT"),
                        help="json (one object per line, with taskUUID; the default for serve) or text")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Runware-compatible HTTP server")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", action="append", default=[], help="accepted API key (repeatable); none = open")
    serve.add_argument("--public-url", help="base URL for image links (default: the request's own host)")
    serve.add_argument("--model-alias", action="append", default=[], help="extra model id accepted (repeatable)")
    serve.add_argument("--max-queue", type=int, default=64, help="tasks waiting for the GPU before 429s")
    serve.add_argument("--max-tasks-per-request", type=int, default=100,
                       help="tasks in one HTTP body or WebSocket frame (more: maxTasksExceeded)")
    serve.add_argument("--ws-auth-timeout", type=float, default=10.0,
                       help="seconds a WebSocket may take to authenticate before it is closed (1008)")
    serve.add_argument("--max-unauthenticated-websockets", type=int, default=64,
                       help="WebSockets open at once that have not authenticated; more are refused")
    serve.add_argument("--image-ttl", type=int, default=86400, help="seconds images are kept without a ttl")
    serve.add_argument("--price-per-gpu-hour", type=float, default=2.0, help="USD, for includeCost")
    serve.add_argument("--allow-private-urls", action="store_true",
                       help="let webhooks, uploads and image URLs reach loopback/private/link-local addresses")
    serve.add_argument("--max-image-bytes", type=int, default=32 * 1024 * 1024,
                       help="largest accepted input image (bytes, checked before decoding)")
    serve.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                       help="largest accepted input image (pixels, read from the header before decoding)")
    serve.add_argument("--poll-wait", type=float, default=10.0,
                       help="seconds a getResponse waits for an unfinished task before answering")
    serve.add_argument("--shutdown-timeout", type=float, default=60.0,
                       help="seconds SIGTERM waits for tasks in flight")
    serve.add_argument("--safety-action", choices=["flag", "block"], default="flag",
                       help="for safety-checked tasks: flag images (NSFWContent) or fail the task with "
                            "nsfwContentDetected when any image is flagged")
    serve.add_argument("--inject-oom-prompt", help=argparse.SUPPRESS)  # testing aid: see LocalWorker
    serve.add_argument(
        "--fallback-tiny", action="store_true",
        help="with no GPU or no downloaded weights, serve generated tiny weights on the CPU instead of failing",
    )
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate images offline from Runware tasks or flags")
    _model_args(gen)
    gen.add_argument("tasks", nargs="*", type=Path, help="JSON file (one task or an array) or JSONL file")
    gen.add_argument("--out", type=Path, default=Path("out"), help="folder for images and results.json")
    gen.add_argument("--prompt")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--cfg-scale", type=float)
    gen.add_argument("--scheduler")
    gen.add_argument("--number-results", type=int)
    gen.add_argument("--output-format", default="PNG")
    gen.add_argument("--accelerator-options", type=json.loads, metavar="JSON",
                     help='Runware acceleratorOptions for --prompt, e.g. \'{"teaCache": true, "teaCacheDistance": 0.3}\'')
    gen.add_argument("--stats", action="store_true",
                     help="add per-task stats to results.json: transformer passes computed/skipped per CFG branch, "
                          "seconds per step")
    gen.set_defaults(func=cmd_generate)

    calibrate = sub.add_parser("calibrate", help="fit step-cache parameters on the loaded weights")
    csub = calibrate.add_subparsers(dest="calibrate_command", required=True)
    tea = csub.add_parser("teacache", help="fit TeaCache's rescaling polynomial (write JSON for --teacache-coefficients)")
    _model_args(tea)
    tea.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: a built-in set)")
    tea.add_argument("--steps", type=int, default=50, help="the step count you serve with (coefficients depend on it)")
    tea.add_argument("--cfg-scale", type=float, default=3.5)
    tea.add_argument("--scheduler", help="Runware scheduler name (default: the model's FlowMatch Euler)")
    tea.add_argument("--size", action="append", default=[], type=_size,
                     help="WIDTHxHEIGHT, repeatable (default 1024x1024)")
    tea.add_argument("--seed", type=int, default=0)
    tea.add_argument("--out", type=Path, default=Path("teacache.json"))
    tea.set_defaults(func=cmd_calibrate_teacache)

    weights = sub.add_parser("weights", help="build tiny weights or download the real ones")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    tiny = wsub.add_parser("tiny", help="build the tiny test checkpoint(s) into DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--kind", choices=["t2i", "i2i", "all"], default="all")
    tiny.set_defaults(func=cmd_weights_tiny)
    dl = wsub.add_parser("download", help="fetch the real weights into the Hugging Face cache")
    dl.add_argument("--model", help="one repo id (default: the T2I and I2I Lite sft repos and the safety classifier)")
    dl.add_argument("--cache-dir", type=Path)
    dl.set_defaults(func=cmd_weights_download)

    args = parser.parse_args(argv)
    from . import logs

    args.api_keys = tuple(getattr(args, "api_key", None) or ()) + tuple(
        k for k in os.environ.get("K5SERVE_API_KEYS", "").split(",") if k)
    args.log_format = args.log_format or ("json" if args.command == "serve" else "text")
    logs.configure(args.log_level, args.log_format, secrets=args.api_keys)
    return args.func(args) or 0


def _model_args(p: argparse.ArgumentParser) -> None:
    from k5serve.weights.hub import T2I_REPO

    p.add_argument("--model", default=T2I_REPO, help="Hugging Face repo id (in the cache) or local diffusers folder")
    p.add_argument("--tiny", action="store_true", help="use generated tiny weights (CPU test mode)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("K5SERVE_DATA_DIR", ".k5serve")))
    p.add_argument("--i2i-model", help="editing model: repo id (in the cache) or folder; default: the I2I Lite "
                   "repo when it is downloaded; 'none' to disable")
    p.add_argument("--i2i-load", choices=["lazy", "eager"], default="lazy",
                   help="load the editing transformer on the first editing request (lazy) or at start-up")
    p.add_argument("--lora-dir", type=Path, help="folder of LoRA files: lora[].model X loads X.safetensors")
    p.add_argument("--max-loras", type=int, default=8, help="LoRA adapters kept loaded (LRU)")
    p.add_argument("--teacache-coefficients", type=_coefficients, metavar="FILE",
                   help="TeaCache polynomial from `k5serve calibrate teacache` (default: identity, uncalibrated)")
    p.add_argument("--dbcache-fn", type=int, help="DBCache: first blocks always computed (default 8 on the full model)")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                   help="diffusers CPU offload (CUDA only): model = whole components move to the GPU when used "
                        "(fits a 24 GB card), sequential = layer by layer (least memory, slowest)")
    p.add_argument("--safety-model", help="NSFW image classifier for safety checks: repo id (in the cache) or "
                   "folder; default: the Falconsai/nsfw_image_detection repo when downloaded; 'none' to disable")
    p.add_argument("--safety-threshold", type=float, default=0.5,
                   help="flag an image when the classifier's unsafe probability is at least this")


def _coefficients(path: str) -> tuple[float, ...]:
    """Read and check the TeaCache file when the command line is parsed, not when the model has loaded."""
    from k5serve.accel.calibration import load_coefficients

    try:
        return load_coefficients(path)
    except (OSError, ValueError, KeyError) as exc:
        raise argparse.ArgumentTypeError(f"cannot use {path}: {exc}") from None


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(width), int(height)


def _resolve_model(args: argparse.Namespace, fallback: bool) -> tuple[Path, Path | None, str, bool]:
    """-> (T2I checkpoint folder, I2I folder or None, device, tiny?)."""
    path, device, tiny = _resolve_t2i(args, fallback)
    if args.offload != "none":
        import torch

        if device == "cpu" or not torch.cuda.is_available():
            raise SystemExit(f"error: --offload {args.offload} needs a CUDA device (this run uses "
                             f"{'the CPU' if device in ('cpu', 'auto') else device}{'' if torch.cuda.is_available() else ', and no CUDA GPU is visible'})")
    if tiny:
        from k5serve.weights.tiny import ensure_tiny

        i2i = None if args.i2i_model == "none" else ensure_tiny(args.data_dir / "tiny", "i2i")
        return path, i2i, device, tiny
    return path, _resolve_i2i(args), device, tiny


def _resolve_i2i(args: argparse.Namespace) -> Path | None:
    from k5serve.weights.hub import I2I_REPO, WeightsNotFound, resolve

    if args.i2i_model == "none":
        return None
    try:
        return resolve(args.i2i_model or I2I_REPO)
    except WeightsNotFound as exc:
        if args.i2i_model:
            raise SystemExit(f"error: {exc}") from None
        log.warning("no editing model (%s); reference-image requests will be refused", exc)
        return None


def _resolve_t2i(args: argparse.Namespace, fallback: bool) -> tuple[Path, str, bool]:
    import torch

    from k5serve.weights.hub import WeightsNotFound, resolve
    from k5serve.weights.tiny import ensure_tiny

    reason = "--tiny"
    if not args.tiny:
        try:
            path = resolve(args.model)
            if torch.cuda.is_available() or args.device != "auto" or not fallback:
                return path, args.device, False
            reason = "no CUDA GPU found"
        except WeightsNotFound as exc:
            if not fallback:
                raise SystemExit(f"error: {exc}") from None
            reason = f"no downloaded weights for {args.model}"
    path = ensure_tiny(args.data_dir / "tiny", "t2i")
    if args.log_format == "text":  # JSON logs stay one object per line; the warning below says the same
        print(BANNER.format(reason=reason), file=sys.stderr, flush=True)
    log.warning("CPU TEST MODE: serving generated tiny weights from %s (%s); images are noise from a random model",
                path, reason)
    return path, ("cpu" if args.device == "auto" else args.device), True


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from k5serve.pipelines.worker import LocalWorker

    from .app import create_app
    from .config import ServerConfig

    _lock_data_dir(args.data_dir)
    if args.log_format == "json":  # progress bars would break one-JSON-object-per-line (building tiny weights)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    path, i2i, device, tiny = _resolve_model(args, fallback=args.fallback_tiny)
    keys = args.api_keys
    if any(len(key) < 16 for key in keys):
        log.warning("an API key shorter than 16 characters is easy to guess; use a long random one (logs mask "
                    "every occurrence of each key, so a short one also masks ordinary text)")
    if not keys and not _is_loopback(args.host):
        log.warning("no --api-key given and bound to %s: anyone who can reach this port can use the GPU", args.host)
    config = ServerConfig(
        data_dir=args.data_dir,
        api_keys=keys,
        public_url=args.public_url,
        model_aliases=tuple(args.model_alias),
        image_ttl=args.image_ttl,
        price_per_gpu_hour=args.price_per_gpu_hour,
        allow_private_urls=args.allow_private_urls,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        poll_wait=args.poll_wait,
        shutdown_timeout=args.shutdown_timeout,
        safety_action=args.safety_action,
        max_tasks_per_request=args.max_tasks_per_request,
        ws_auth_timeout=args.ws_auth_timeout,
        max_unauthenticated_websockets=args.max_unauthenticated_websockets,
    )

    def load_worker() -> LocalWorker:
        engine, info = _load_engine(args, path, i2i, device, tiny)
        return LocalWorker(engine, max_queue=args.max_queue, info=info | {"tiny_weights": tiny},
                           fault_prompt=args.inject_oom_prompt)

    uvicorn.run(
        create_app(config, load_worker),
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        log_config=None,  # keep our JSON/text handler on uvicorn's loggers
        ws_max_size=config.ws_max_message_bytes,
        timeout_graceful_shutdown=int(config.shutdown_timeout) + 5,
    )
    return 0


_held_locks: list = []  # open lock files, held for the life of the process


def _lock_data_dir(data_dir: Path) -> None:
    """One server per data directory: two would each mark the other's running tasks as lost at start-up."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"error: another k5serve process is serving from {data_dir}; give each its own --data-dir")
    _held_locks.append(handle)


def _resolve_safety(args: argparse.Namespace, tiny: bool) -> Path | None:
    from k5serve.weights.hub import SAFETY_REPO, WeightsNotFound, resolve

    if args.safety_model == "none":
        return None
    if tiny and not args.safety_model:
        from k5serve.weights.tiny import ensure_tiny

        return ensure_tiny(args.data_dir / "tiny", "safety")
    try:
        return resolve(args.safety_model or SAFETY_REPO, marker="config.json")
    except WeightsNotFound as exc:
        if args.safety_model:
            raise SystemExit(f"error: {exc}") from None
        log.warning("no safety classifier (%s); safety-checked requests will be refused", exc)
        return None


def _load_engine(args: argparse.Namespace, path: Path, i2i: Path | None, device: str, tiny: bool,
                 safety: bool = True):
    from k5serve.pipelines.engine import EngineConfig
    from k5serve.pipelines.loader import LoadConfig, load_engine

    from k5serve.accel import AccelSettings

    accel = AccelSettings(teacache_coefficients=args.teacache_coefficients, dbcache_fn_blocks=args.dbcache_fn)
    if not 0.0 <= args.safety_threshold <= 1.0:
        raise SystemExit("error: --safety-threshold must be between 0 and 1")
    engine = EngineConfig(i2i_path=i2i, i2i_load=args.i2i_load, lora_dir=args.lora_dir, max_loras=args.max_loras,
                          accel=accel, safety_path=_resolve_safety(args, tiny) if safety else None,
                          safety_threshold=args.safety_threshold)
    return load_engine(LoadConfig(path, device, args.dtype, args.offload), engine)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_tasks(args: argparse.Namespace) -> list[Any]:
    from .protocol import MODEL_ID

    tasks: list[Any] = []
    for path in args.tasks:
        text = path.read_text()
        try:
            loaded = json.loads(text)
            tasks.extend(loaded if isinstance(loaded, list) else [loaded])
        except json.JSONDecodeError:
            tasks.extend(json.loads(line) for line in text.splitlines() if line.strip())
    if args.prompt:
        flags = {
            "positivePrompt": args.prompt,
            "negativePrompt": args.negative_prompt,
            "width": args.width,
            "height": args.height,
            "seed": args.seed,
            "steps": args.steps,
            "CFGScale": args.cfg_scale,
            "scheduler": args.scheduler,
            "numberResults": args.number_results,
            "outputFormat": args.output_format,
            "acceleratorOptions": args.accelerator_options,
        }
        tasks.append({k: v for k, v in flags.items() if v is not None})
    for task in tasks:
        if isinstance(task, dict):
            task.setdefault("taskType", "imageInference")
            task.setdefault("taskUUID", str(uuid.uuid4()))
            task.setdefault("model", MODEL_ID)
    return tasks


def cmd_generate(args: argparse.Namespace) -> int:
    """Offline generation: the same validation and pipeline code as the server, no HTTP."""
    from tqdm import tqdm

    from .config import ServerConfig
    from .dispatcher import result_item, to_spec
    from .encoding import encode
    from k5serve.pipelines.spec import InvalidInput

    from .protocol import TaskError, task_error
    from .validation import parse_image_inference

    tasks = _read_tasks(args)
    if not tasks:
        raise SystemExit("error: give a tasks file or --prompt")
    parsed, errors = [], []
    # Image inputs need the server's image store; everything the pipeline does itself is served.
    features = frozenset({"acceleration", "safety"} | ({"lora"} if args.lora_dir else set()))
    for raw in tasks:
        try:
            if not isinstance(raw, dict):
                raise SystemExit("error: every task must be a JSON object")
            parsed.append(parse_image_inference(raw, features=features))
        except TaskError as err:
            errors.append(err.item.wire())
            log.error("invalid task: %s", err.item.message)

    data: list[dict] = []
    stats: list[dict] = []
    if parsed:
        path, i2i, device, tiny = _resolve_model(args, fallback=False)
        engine, _ = _load_engine(args, path, i2i, device, tiny)
        args.out.mkdir(parents=True, exist_ok=True)
        for task in tqdm(parsed, desc="tasks", unit="task"):
            spec = to_spec(task)
            try:
                with tqdm(total=spec.steps, desc=f"steps {task.taskUUID[:8]}", unit="step", leave=False) as bar:
                    output = engine.generate(spec, on_step=lambda done, total: bar.update(done - bar.n))
            except InvalidInput as exc:
                errors.append(task_error(exc.code, str(exc), parameter=exc.parameter, task_type=task.taskType,
                                         task_uuid=task.taskUUID).item.wire())
                log.error("task %s refused: %s", task.taskUUID, exc)
                continue
            for index, (image, seed) in enumerate(zip(output.images, output.seeds)):
                blob, ext, mime = encode(image, task.outputFormat, task.outputQuality)
                image_uuid = str(uuid.uuid4())
                file = (args.out / f"{image_uuid}.{ext}").resolve()
                file.write_bytes(blob)
                cost = output.seconds * ServerConfig.price_per_gpu_hour / 3600 / len(output.images)
                item = result_item(task, image_uuid, blob, mime, file.as_uri(), seed, cost,
                                   nsfw=output.nsfw[index] if output.nsfw is not None else None)
                item["imagePath"] = str(file)
                item["seconds"] = round(output.seconds, 3)
                data.append(item)
            stats.append({"taskUUID": task.taskUUID, "seconds": round(output.seconds, 4),
                          "stepSeconds": [round(s, 4) for s in output.step_seconds],
                          "transformerPasses": output.cache_stats})
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"data": data, **({"errors": errors} if errors else {}), **({"stats": stats} if args.stats else {})}
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"{len(data)} image(s), {len(errors)} error(s) -> {args.out / 'results.json'}")
    return 1 if errors else 0


CALIBRATION_PROMPTS = [
    "a red fox in fresh snow, morning light, telephoto photograph",
    "a bowl of ramen on a wooden table, steam, close-up food photography",
    "an old lighthouse on a cliff during a storm, oil painting",
    "a neon sign that says OPEN in a rainy alley at night",
    "portrait of an elderly fisherman, weathered face, soft window light",
    "a futuristic city skyline at dusk, flying cars, concept art",
    "watercolor illustration of a hedgehog reading a book",
    "a mountain lake reflecting pine trees, wide-angle landscape",
    "кот в космическом скафандре на поверхности Луны, цифровая живопись",
    "a vintage poster with the words KANDINSKY FIVE in bold letters",
    "isometric 3D render of a tiny cozy bedroom",
    "macro photograph of a dewdrop on a spider web",
]


def cmd_calibrate_teacache(args: argparse.Namespace) -> int:
    """Fit TeaCache's polynomial on the weights being served; write JSON for --teacache-coefficients."""
    from k5serve.pipelines.calibrate import calibrate_teacache
    from k5serve.pipelines.spec import GenerationSpec

    prompts = ([line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
               if args.prompts else CALIBRATION_PROMPTS)
    from k5serve.pipelines.schedulers import SCHEDULER_NAMES

    if args.scheduler is not None and args.scheduler not in SCHEDULER_NAMES:
        raise SystemExit(f"error: unknown scheduler {args.scheduler!r}; use one of {', '.join(SCHEDULER_NAMES)}")
    sizes = args.size or [(1024, 1024)]
    path, i2i, device, tiny = _resolve_model(args, fallback=False)
    engine, info = _load_engine(args, path, None, device, tiny, safety=False)
    specs = [GenerationSpec(prompt, "", width=w, height=h, seed=args.seed + i, steps=args.steps,
                            guidance_scale=args.cfg_scale, scheduler=args.scheduler)
             for i, prompt in enumerate(prompts) for w, h in sizes]
    result = calibrate_teacache(engine.t2i, specs)
    result.update(model=info["model_path"], tiny_weights=tiny, steps=args.steps, cfg_scale=args.cfg_scale,
                  scheduler=args.scheduler, sizes=[f"{w}x{h}" for w, h in sizes], prompts=len(prompts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['samples']} samples from {result['runs']} runs; fit RMSE {result['rmse']:.4g} "
          f"(identity {result['identity_rmse']:.4g}) -> {args.out}")
    return 0


def cmd_weights_tiny(args: argparse.Namespace) -> int:
    from k5serve.weights.tiny import build_tiny

    for kind in (["t2i", "i2i"] if args.kind == "all" else [args.kind]):
        print(build_tiny(args.dir / kind, kind))
    return 0


def cmd_weights_download(args: argparse.Namespace) -> int:
    from k5serve.weights.hub import I2I_REPO, SAFETY_REPO, T2I_REPO, download

    for repo in [args.model] if args.model else [T2I_REPO, I2I_REPO, SAFETY_REPO]:
        print(f"{repo}: {download(repo, args.cache_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
