"""`k5serve`: serve the Runware API, generate offline, build or fetch weights.

Options are declared and resolved in `options.py` (flag > K5SERVE_* environment > --config file > default);
this module turns them into the config objects and runs the command.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

from k5serve.pipelines.config import MEMORY_PROFILES

from . import options as opt

log = logging.getLogger("k5serve")

# What one image costs in the CPU test mode over HTTP at 1024x1024 and the default 20 steps on a 2-core x86_64
# VM (docs/performance.md#cpu-test-mode); the tiny model's cost hardly depends on the size.
TINY_SECONDS_2_CORES = 3


def _prog() -> str:
    """How the user ran k5serve, for commands to paste: the script's path as typed, or `python -m k5serve`."""
    script = Path(sys.argv[0])
    if script.name != "k5serve":
        return f"{sys.executable} -m k5serve"
    if _on_path(script):
        return "k5serve"
    try:
        return str(script.resolve().relative_to(Path.cwd()))  # .venv/bin/k5serve in the checkout
    except ValueError:
        return str(script)


def _on_path(script: Path) -> bool:
    import shutil

    found = shutil.which("k5serve")
    return found is not None and Path(found).resolve() == script.resolve()


def test_mode_box(found, url: str | None = None, key_required: bool = False, width: int = 76) -> str:
    """The block printed in the CPU test mode for a person at a terminal, with the server's addresses and key
    when `url` is given (fits 80 columns: longer lines wrap under their label)."""
    import os
    import textwrap

    prog = _prog()
    rows: list[tuple[str | None, str]] = [  # (label, text); None: no label and no indent
        (None, f"k5serve: CPU TEST MODE ({found.tiny_reason})"),
        (None, ""),
        (None, "Images are noise from tiny random weights: the API, validation and pipeline are the real ones, "
             "the model is not."),
        (None, ""),
        *([("Playground:", f"{url}/"),
           ("API:", f"POST {url}/v1"),
           ("", f"WebSocket {url.replace('http', 'ws', 1)}/v1"),
           ("API key:", "required: send one given with --api-key (Authorization: Bearer KEY)" if key_required
            else "none needed (started without --api-key)")] if url is not None else []),
        ("Speed:", f"about {TINY_SECONDS_2_CORES} s an image at 20 steps on 2 CPU cores (here: "
                   f"{os.cpu_count() or 1}); \"steps\": 10 is a quicker smoke test"),
        ("Real images:", "on a CUDA GPU with the weights downloaded:"),
        ("", f"{prog} weights download"),
        ("", f"{prog} serve"),
    ]
    lines = []
    for label, text in rows:
        indent = "" if label is None else " " * 13
        wrapped = textwrap.wrap(text, width, initial_indent=label.ljust(13) if label else indent,
                                subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)
        lines.extend(wrapped or [""])
    inner = max(len(line) for line in lines)
    rule = "+" + "-" * (inner + 2) + "+"
    return "\n".join([rule, *(f"| {line.ljust(inner)} |" for line in lines), rule])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k5serve", description=__doc__.splitlines()[0],
        epilog="Every option can also be set by its K5SERVE_* environment variable (shown in each command's "
               "--help), and serve's options in a TOML file given with --config; a flag wins over the "
               "environment, which wins over the file.")
    opt.add_options(parser, opt.LOG_OPTIONS)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the Runware-compatible HTTP server")
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="TOML file of serve options (keys as the flags without dashes: image-ttl = 3600) "
                            "[env K5SERVE_CONFIG]")
    opt.add_options(serve, opt.SERVE_OPTIONS)
    serve.add_argument("--inject-oom-prompt", help=argparse.SUPPRESS)  # testing aid: see local.run_job
    serve.add_argument("--inject-crash-prompt", help=argparse.SUPPRESS)  # testing aid: see replica.K5Replica
    serve.set_defaults(func=cmd_serve, options=opt.LOG_OPTIONS + opt.SERVE_OPTIONS)

    gen = sub.add_parser(
        "generate", help="generate images offline from Runware tasks or flags",
        description="Generate images without a server: the same validation, results and costs as the API. "
                    "Images and results.json go to --out.",
        epilog="Without downloaded weights or a GPU add --tiny (CPU test mode: generated tiny weights, noise for "
               f"images), e.g. {_prog()} generate --tiny --prompt 'a red fox' --steps 10")
    everyday = gen.add_argument_group("the image")
    everyday.add_argument("--prompt", help="what to draw (positivePrompt)")
    everyday.add_argument("tasks", nargs="*", type=Path,
                          help="instead of or beside --prompt: JSON file (one task or an array) or JSONL file")
    opt.add_options(everyday, [o for o in opt.MODEL_OPTIONS if o.name == "tiny"])  # no GPU, no weights: this
    everyday.add_argument("--out", type=Path, default=Path("out"),
                          help="folder for images and results.json (default: %(default)s)")
    everyday.add_argument("--width", type=int, default=1024,
                          help="pixels; width x height is one of the model's sizes, e.g. 1024x1024, 1280x768, "
                               "768x1280 (default: %(default)s)")
    everyday.add_argument("--height", type=int, default=1024, help="pixels (default: %(default)s)")
    everyday.add_argument("--steps", type=int, help="denoising steps (default: the API's, 20; 10 is a quick test)")
    everyday.add_argument("--seed", type=int, help="same seed, same image (default: random)")
    everyday.add_argument("--output-format", default="JPG", metavar="{JPG,PNG,WEBP}",
                          help="image file format (default: %(default)s, as the API)")
    everyday.add_argument("--number-results", type=int, help="images per prompt (default: 1)")
    more = gen.add_argument_group("more of the API's parameters")
    more.add_argument("--negative-prompt", help="what to avoid")
    more.add_argument("--cfg-scale", type=float, help="CFGScale: prompt guidance (default: 7)")
    more.add_argument("--scheduler", help="a Runware scheduler name (default: the model's FlowMatch Euler)")
    more.add_argument("--accelerator-options", type=json.loads, metavar="JSON",
                      help="Runware acceleratorOptions for --prompt, e.g. "
                           '\'{"teaCache": true, "teaCacheDistance": 0.3}\'')
    more.add_argument("--stats", action="store_true",
                      help="add per-task stats to results.json: transformer passes computed/skipped per CFG branch, "
                           "seconds per step")
    opt.add_options(gen.add_argument_group("weights and device"), [o for o in opt.MODEL_OPTIONS if o.name != "tiny"])
    gen.set_defaults(func=cmd_generate, options=opt.LOG_OPTIONS + opt.MODEL_OPTIONS)

    calibrate = sub.add_parser("calibrate", help="fit step-cache parameters on the loaded weights")
    csub = calibrate.add_subparsers(dest="calibrate_command", required=True)
    tea = csub.add_parser("teacache",
                          help="fit TeaCache's rescaling polynomial (write JSON for --teacache-coefficients)")
    opt.add_options(tea, opt.MODEL_OPTIONS)
    tea.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: a built-in set)")
    tea.add_argument("--steps", type=int, default=50, help="the step count you serve with (coefficients depend on it)")
    tea.add_argument("--cfg-scale", type=float, default=3.5)
    tea.add_argument("--scheduler", help="Runware scheduler name (default: the model's FlowMatch Euler)")
    tea.add_argument("--size", action="append", default=[], type=_size,
                     help="WIDTHxHEIGHT, repeatable (default 1024x1024)")
    tea.add_argument("--seed", type=int, default=0)
    tea.add_argument("--out", type=Path, default=Path("teacache.json"))
    tea.set_defaults(func=cmd_calibrate_teacache, options=opt.LOG_OPTIONS + opt.MODEL_OPTIONS)

    _add_memory_plan(sub)
    weights = sub.add_parser("weights", help="build tiny weights or download the real ones")
    wsub = weights.add_subparsers(dest="weights_command", required=True)
    tiny = wsub.add_parser("tiny", help="build the tiny test checkpoint(s) into DIR")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--kind", choices=["t2i", "i2i", "all"], default="all")
    tiny.set_defaults(func=cmd_weights_tiny, options=opt.LOG_OPTIONS)
    dl = wsub.add_parser("download", help="fetch the real weights into the Hugging Face cache")
    dl.add_argument("--model", help="one repo id (default: the T2I and I2I Lite sft repos and the safety classifier)")
    dl.add_argument("--cache-dir", type=Path)
    dl.set_defaults(func=cmd_weights_download, options=opt.LOG_OPTIONS)
    return parser


def _add_memory_plan(sub) -> None:
    plans = sub.add_parser(
        "memory-plan", help="which memory profile fits which card: the plans for the published model, no weights "
                            "or GPU needed",
        description="The memory plan of each memory profile for Kandinsky 5.0 Image Lite (built from its "
                    "configuration on the meta device: nothing is downloaded), against the memory a 24, 16 and 12 "
                    "GB card leaves free, or against --memory-budget.")
    plans.add_argument("--editing", action="store_true",
                       help="with the editing model loaded beside (its own transformer; the rest is shared)")
    plans.add_argument("--memory-budget", type=opt.byte_size, metavar="BYTES",
                       help="compare against this (e.g. 20GB, 16GiB) instead of the three cards")
    plans.add_argument("--profile", choices=MEMORY_PROFILES, help="print this profile's whole plan")
    plans.set_defaults(func=cmd_memory_plan, options=opt.LOG_OPTIONS)


def main(argv: list[str] | None = None) -> int:
    import os

    parser = build_parser()
    args = parser.parse_args(argv)
    config_file = getattr(args, "config", None) or (os.environ.get("K5SERVE_CONFIG") if args.command == "serve"
                                                    else None)
    given: set[str] = set()  # the options given by flag, environment or file (a memory profile leaves them be)
    try:
        values = opt.resolve(args.options, args, os.environ, Path(config_file) if config_file else None, given)
    except opt.ConfigError as exc:
        parser.exit(2, f"k5serve: error: {exc}\n")
    vars(args).update(values)
    args.given_options = given
    # serve logs JSON lines for a program to read, and text at a terminal; the other commands log text.
    args.log_format = args.log_format or ("json" if args.command == "serve" and not sys.stderr.isatty() else "text")
    from .ops import logs

    logs.configure(args.log_level, args.log_format, secrets=tuple(getattr(args, "api_key", None) or ()))
    return args.func(args) or 0


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(width), int(height)


def _checkpoints(args: argparse.Namespace, *, i2i: bool = True, safety: bool = True, banner: bool = True):
    """The run's checkpoints (k5serve.weights.checkpoints), with the CPU test mode's banner when it is on
    (`banner=False`: the caller prints its own)."""
    import torch
    from k5serve.pipelines.config import LoadConfig
    from k5serve.weights.checkpoints import CheckpointChoice, CheckpointError, resolve_checkpoints

    from .ops.logs import adopt_library_loggers

    adopt_library_loggers()  # (before the model's libraries load and warn: torchao, for one)
    load = opt.build(LoadConfig, args.options, vars(args), path=Path())
    try:
        found = resolve_checkpoints(opt.build(CheckpointChoice, args.options, vars(args)), args.data_dir / "tiny",
                                    device=load.device, cuda=torch.cuda.is_available(), i2i=i2i, safety=safety)
    except CheckpointError as exc:
        raise SystemExit(f"error: {exc}") from None
    if load.offload != "none" and (found.device == "cpu" or not torch.cuda.is_available()):  # the device used
        raise SystemExit(f"error: --offload {load.offload} needs a CUDA device (this run uses "
                         f"{'the CPU' if found.device in ('cpu', 'auto') else found.device}"
                         f"{'' if torch.cuda.is_available() else ', and no CUDA GPU is visible'})")
    if found.tiny:
        if banner and args.log_format == "text":  # JSON logs stay one object per line; the warning says the same
            print(test_mode_box(found), file=sys.stderr, flush=True)
        log.warning("CPU TEST MODE: serving generated tiny weights from %s (%s); images are noise from a random "
                    "model", found.t2i, found.tiny_reason)
    return found


def _engine_config(args: argparse.Namespace, found):
    from k5serve.accel import AccelSettings
    from k5serve.pipelines.config import EngineConfig, SpeedSettings

    accel = opt.build(AccelSettings, args.options, vars(args))
    speed = opt.build(SpeedSettings, args.options, vars(args))
    return opt.build(EngineConfig, args.options, vars(args), i2i_path=found and found.i2i,
                     safety_path=found and found.safety, accel=accel, speed=speed)


def _check_options(args: argparse.Namespace, found) -> dict[str, Any]:
    """Refuse an option this machine's device cannot do, and a memory plan over budget, before the server starts;
    -> the plan, for /health until the model has loaded. The loader (each Ray replica on its own device) applies
    the profile and plans again when it loads, against the memory free then."""
    from k5serve.pipelines.memory import resolve

    try:
        _, _, plan = resolve(_load_config(args, found), _engine_config(args, found))
    except (RuntimeError, ValueError) as exc:  # (the checks' and the plan's errors are ValueErrors)
        raise SystemExit(f"error: {exc}") from None
    return plan.as_dict()


def _load_config(args: argparse.Namespace, found):
    """Where and how the T2I checkpoint loads: the resolved folder, on the device the run really uses."""
    from k5serve.pipelines.config import LoadConfig, explicit_fields

    return opt.build(LoadConfig, args.options, vars(args) | {"device": found.device}, path=found.t2i,
                     explicit=explicit_fields(getattr(args, "given_options", set())))


def _load_engine(args: argparse.Namespace, found, on_status=None):
    """(The caller has run `_check_options` on the main thread: this may run on the server's loading thread.)"""
    from k5serve.pipelines.loader import load_engine

    return load_engine(_load_config(args, found), _engine_config(args, found), on_status=on_status)


def cmd_serve(args: argparse.Namespace) -> int:
    from k5serve.pipelines.config import WorkerConfig

    from .app import create_app
    from .config import ListenConfig, ServerConfig
    from .protocol.errors import SchemaError, StoreUnavailable
    from .tasks.slot import ModelSlot
    from .tenants import TenantError
    from .transport.listen import serve

    config = opt.build(ServerConfig, args.options, vars(args))
    listen = opt.build(ListenConfig, args.options, vars(args))
    if not config.s3_image_store and (config.s3_endpoint or config.image_urls != "proxy"):
        raise SystemExit("error: --s3-endpoint and --image-urls need an s3:// --image-store")
    if config.database is None:  # a server database is shared by design: no folder to hold alone
        _lock_data_dir(config.data_dir)
    if args.log_format == "json":  # progress bars would break one-JSON-object-per-line (building tiny weights)
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    found = _checkpoints(args, banner=False)
    if found.tiny and (args.log_format == "text" or sys.stderr.isatty()):  # for a person: JSON lines for a program
        host = "127.0.0.1" if listen.host in ("0.0.0.0", "::", "") else listen.host
        url = f"http://{f'[{host}]' if ':' in host else host}:{listen.port}"
        print(test_mode_box(found, url, bool(config.api_keys)), file=sys.stderr, flush=True)
    if any(len(key) < 16 for key in config.api_keys):
        log.warning("an API key shorter than 16 characters is easy to guess; use a long random one (logs mask "
                    "every occurrence of each key, so a short one also masks ordinary text)")
    if not config.api_keys and not _is_loopback(listen.host):
        log.warning("no --api-key given and bound to %s: anyone who can reach this port can use the GPU", listen.host)

    workers = opt.build(WorkerConfig, args.options, vars(args))
    if workers.kind == "local" and (workers.replicas or workers.autoscale or workers.ray_address
                                    or workers.replica_threads or workers.ray_app != WorkerConfig.ray_app):
        raise SystemExit("error: --replicas, --autoscale, --ray-address, --ray-app and --replica-threads need "
                         "--workers ray")
    if workers.replicas and workers.autoscale:
        raise SystemExit("error: give --replicas or --autoscale, not both")
    known: dict[str, Any] = {"tiny_weights": found.tiny}
    if workers.kind == "local" or workers.ray_address is None:  # generation runs on this machine's devices
        known["memory_plan"] = _check_options(args, found)

    def load_worker():
        if workers.kind == "ray":
            from k5serve.pipelines.ray_worker import RayWorker  # ray: only with --workers ray

            return RayWorker(_load_config(args, found), _engine_config(args, found), workers,
                             max_queue=config.max_queue, fault_prompt=args.inject_oom_prompt,
                             crash_prompt=args.inject_crash_prompt, on_status=slot.note)
        from k5serve.pipelines.local import LocalWorker

        engine, info = _load_engine(args, found, on_status=slot.note)
        return LocalWorker(engine, max_queue=config.max_queue, info=info, fault_prompt=args.inject_oom_prompt)

    slot = ModelSlot(load_worker, known=known)  # on /ready and /health from the start
    try:
        app = create_app(config, slot)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("psycopg"):
            raise SystemExit("error: --database needs psycopg: pip install 'k5serve[postgres]'") from None
        if exc.name and exc.name.startswith(("boto3", "botocore")):
            raise SystemExit("error: an s3:// --image-store needs boto3: pip install 'k5serve[s3]'") from None
        raise
    except (StoreUnavailable, SchemaError) as exc:
        raise SystemExit(f"error: {exc}") from None
    except TenantError as exc:
        raise SystemExit(f"error: --tenants {config.tenants_file}: {exc}") from None
    serve(app, listen, log_level=args.log_level.lower(), ws_max_size=config.ws_max_message_bytes,
          timeout_graceful_shutdown=int(config.shutdown_timeout) + 5)
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_tasks(args: argparse.Namespace) -> list[Any]:
    from .protocol.models import MODEL_ID

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
    """Offline generation: the same validation, specs, result items and costs as the server, no HTTP."""
    from k5serve.pipelines.config import engine_features
    from k5serve.pipelines.worker import InvalidInput
    from tqdm import tqdm

    from .config import ServerConfig
    from .protocol.errors import TaskError
    from .protocol.validation import parse_image_inference
    from .tasks.result_items import result_items
    from .tasks.to_spec import input_error, to_spec

    tasks = _read_tasks(args)
    if not tasks:
        raise SystemExit("error: give a tasks file or --prompt")
    if not all(isinstance(raw, dict) for raw in tasks):
        raise SystemExit("error: every task must be a JSON object")

    def validate(raws: list[dict], features: frozenset[str]) -> list[tuple[dict, Any]]:
        valid = []
        for raw in raws:
            try:
                valid.append((raw, parse_image_inference(raw, features=features)))
            except TaskError as err:
                errors.append(err.item.wire())
                log.error("invalid task: %s", err.item.message)
        return valid

    # Offline there is no image store, so input images are not served. The weights are looked for only
    # when a task is valid at all; then the tasks are checked against what the engine really serves.
    errors: list[dict] = []
    served = engine_features(_engine_config(args, None)) | {"safety"}
    parsed = validate(tasks, served - {"image_input", "edit"})
    found = _checkpoints(args) if parsed else None
    if found is not None:
        features = engine_features(_engine_config(args, found)) - {"image_input", "edit"}
        parsed = validate([raw for raw, _ in parsed], features)

    data: list[dict] = []
    stats: list[dict] = []
    if parsed:
        _check_options(args, found)
        engine, _ = _load_engine(args, found)
        args.out.mkdir(parents=True, exist_ok=True)
        for _, task in tqdm(parsed, desc="tasks", unit="task"):
            spec = to_spec(task)
            try:
                with tqdm(total=spec.steps, desc=f"steps {task.taskUUID[:8]}", unit="step", leave=False) as bar:
                    output = engine.generate(spec, on_step=lambda done, total: bar.update(done - bar.n))
            except InvalidInput as exc:
                errors.append(input_error(exc, task.taskType, task.taskUUID).item.wire())
                log.error("task %s refused: %s", task.taskUUID, exc)
                continue
            files: dict[str, Path] = {}

            def save(blob: bytes, ext: str) -> tuple[str, str]:
                image_uuid = str(uuid.uuid4())
                file = files[image_uuid] = (args.out / f"{image_uuid}.{ext}").resolve()
                file.write_bytes(blob)
                return image_uuid, file.as_uri()

            for item, _, _ in result_items(task, output, save, ServerConfig.price_per_gpu_hour):
                data.append(item | {"imagePath": str(files[item["imageUUID"]]), "seconds": round(output.seconds, 3)})
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
    from k5serve.pipelines.worker import GenerationSpec

    from .protocol.models import SCHEDULER_NAMES

    prompts = ([line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
               if args.prompts else CALIBRATION_PROMPTS)
    if args.scheduler is not None and args.scheduler not in SCHEDULER_NAMES:
        raise SystemExit(f"error: unknown scheduler {args.scheduler!r}; use one of {', '.join(SCHEDULER_NAMES)}")
    sizes = args.size or [(1024, 1024)]
    found = _checkpoints(args, i2i=False, safety=False)
    _check_options(args, found)
    engine, info = _load_engine(args, found)
    specs = [GenerationSpec(prompt, "", width=w, height=h, seed=args.seed + i, steps=args.steps,
                            guidance_scale=args.cfg_scale, scheduler=args.scheduler)
             for i, prompt in enumerate(prompts) for w, h in sizes]
    result = calibrate_teacache(engine.t2i, specs)
    result.update(model=info["model_path"], tiny_weights=found.tiny, steps=args.steps, cfg_scale=args.cfg_scale,
                  scheduler=args.scheduler, sizes=[f"{w}x{h}" for w, h in sizes], prompts=len(prompts))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{result['samples']} samples from {result['runs']} runs; fit RMSE {result['rmse']:.4g} "
          f"(identity {result['identity_rmse']:.4g}) -> {args.out}")
    return 0


def cmd_memory_plan(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch
    from k5serve.pipelines.config import EngineConfig, LoadConfig
    from k5serve.pipelines.memory import CARD_FREE, human, plan, with_profile
    from k5serve.weights.full import meta_components

    components = meta_components(editing=args.editing)
    budgets = {"budget": args.memory_budget} if args.memory_budget else dict(CARD_FREE)
    print(f"Kandinsky 5.0 Image Lite{' with the editing model' if args.editing else ''}, bfloat16, on a CUDA GPU; "
          "weights exact, activations estimated (docs/performance.md)\n")
    head = " | ".join(f"fits {name if name == 'budget' else name.upper().replace('GB', ' GB')}" for name in budgets)
    print(f"| profile | weights on the GPU | host memory | peak, 1 image | peak, 4 images | {head} |")
    print("|---" * (5 + len(budgets)) + "|")
    for name in MEMORY_PROFILES:
        load, engine = with_profile(LoadConfig(Path("published")), EngineConfig(), name)
        p = plan(components, load, engine.speed, device=torch.device("cuda"), dtype=torch.bfloat16, profile=name)
        fits = [f"yes ({human(q.usable)} usable)" if q.fits else "no"
                for q in (replace(p, budget=budget) for budget in budgets.values())]
        print(f"| {name} | {human(p.device_weights)} | {human(p.host)} | {human(p.peak_of(1))} | {human(p.peak)} | "
              f"{' | '.join(fits)} |")
        if name == args.profile:
            detail = p.describe()
    if args.profile is not None:
        print("\n" + detail)
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
