"""End-to-end HTTP latency against direct pipeline calls, and batching against single requests.

Prints a markdown table: median (and min/max) wall seconds over --runs runs after one warm-up, with
ratios against stock diffusers (`Kandinsky5T2IPipeline.__call__`) measured in the same run on the same
weights. Not a test: numbers depend on the machine.

    .venv/bin/python benchmarks/bench_http.py --tiny                # CPU, generated tiny weights
    .venv/bin/python benchmarks/bench_http.py --model /path/to/k5   # real weights (GPU)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common  # noqa: E402  (puts the project root on sys.path)
import httpx

ROOT = common.ROOT
free_port = common.free_port

MODEL = "runware:kandinsky-5.0-image-lite@1"


def timed(fn, runs: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    args = common.parser(__doc__).parse_args()
    width, height = common.size(args)

    import torch
    from diffusers import Kandinsky5T2IPipeline
    from k5serve.pipelines.device import pick_device, pick_dtype
    from k5serve.pipelines.loader import LoadConfig, load_t2i
    from k5serve.pipelines.worker import GenerationSpec
    from k5serve.weights.hub import resolve
    from k5serve.weights.tiny import ensure_tiny

    data_dir = Path(tempfile.mkdtemp(prefix="k5bench-"))
    path = ensure_tiny(data_dir / "tiny") if args.tiny or not args.model else resolve(args.model)
    device = pick_device(args.device)
    dtype = pick_dtype("auto", device)
    prompt, negative, cfg = "a red fox in the snow, detailed photograph", "", 7.0

    rows: list[tuple[str, list[float], int]] = []

    # 1. stock diffusers, loaded in this process
    stock = Kandinsky5T2IPipeline.from_pretrained(path, dtype=dtype).to(device)
    stock.set_progress_bar_config(disable=True)

    def run_stock(n=1):
        gens = [torch.Generator("cpu").manual_seed(42 + i) for i in range(n)]
        stock(prompt=prompt, negative_prompt=negative, height=height, width=width, num_inference_steps=args.steps,
              guidance_scale=cfg, num_images_per_prompt=n, generator=gens)

    rows.append(("stock diffusers `__call__`, 1 image", timed(run_stock, args.runs), 1))
    rows.append(("stock diffusers `__call__`, 4 images", timed(lambda: run_stock(4), args.runs), 4))
    stock = None  # release this copy before the next one loads

    # 2. our pipeline, called directly
    pipe, _ = load_t2i(LoadConfig(path, str(device), "auto"))

    def run_direct(n=1):
        pipe.generate(GenerationSpec(prompt=prompt, negative_prompt=negative, width=width, height=height, seed=42,
                                     steps=args.steps, guidance_scale=cfg, num_images=n))

    rows.append(("k5serve pipeline `generate`, 1 image", timed(run_direct, args.runs), 1))
    pipe = None  # release this copy before the server loads its own

    # 3. the server, over HTTP on loopback (separate process, same weights)
    port = free_port()
    cmd = [sys.executable, "-m", "k5serve.server.cli", "--log-level", "warning", "serve", "--model", str(path),
           "--device", str(device), "--port", str(port), "--data-dir", str(data_dir)]
    server = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise SystemExit("server did not become healthy")

        def post(n=1, seed=42):
            task = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": MODEL,
                    "positivePrompt": prompt, "width": width, "height": height, "steps": args.steps,
                    "CFGScale": cfg, "seed": seed, "numberResults": n, "outputType": "URL", "outputFormat": "JPG"}
            r = httpx.post(url + "/v1", json=[task], timeout=3600)
            r.raise_for_status()

        rows.append(("HTTP `POST /v1`, 1 image", timed(post, args.runs), 1))
        rows.append(("HTTP, numberResults=4 (one batched call)", timed(lambda: post(4), args.runs), 4))
        sequential = timed(lambda: [post(1, 42 + i) for i in range(4)], args.runs)
        rows.append(("HTTP, 4 sequential requests of 1", sequential, 4))

        def concurrent4():
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: post(1, 42 + i), range(4)))

        rows.append(("HTTP, 4 concurrent requests of 1", timed(concurrent4, args.runs), 4))
    finally:
        server.terminate()
        server.wait(30)

    base1 = statistics.median(rows[0][1])
    print(f"\nweights: {'tiny (generated)' if args.tiny or not args.model else args.model}; device {device}, "
          f"dtype {str(dtype).removeprefix('torch.')}; {width}x{height}, {args.steps} steps, CFG {cfg}; "
          f"median of {args.runs} runs after 1 warm-up; torch threads {torch.get_num_threads()}\n")
    print("| what | images | median s | min s | max s | s per image | vs stock 1 image |")
    print("|---|---|---|---|---|---|---|")
    for name, times, n in rows:
        med = statistics.median(times)
        print(f"| {name} | {n} | {med:.3f} | {min(times):.3f} | {max(times):.3f} | {med / n:.3f} "
              f"| {med / base1:.2f}x |")


if __name__ == "__main__":
    main()
