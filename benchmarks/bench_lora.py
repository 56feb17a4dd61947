"""What per-request LoRA costs: loading, switching and un-applying adapters against one generation.

Prints a markdown table: median (and min/max) wall seconds over --runs runs after one warm-up, each also as a
fraction of one generation without LoRA, for

* one generation without LoRA;
* the first load of a LoRA (`apply` on a cold adapter: read, normalise, inject, activate);
* a switch between two cached adapters;
* `apply([])`, back to the exact base model;
* one generation with a LoRA active.

Not a test: numbers depend on the machine.

    .venv/bin/python benchmarks/bench_lora.py --tiny                          # CPU, generated tiny weights
    .venv/bin/python benchmarks/bench_lora.py --model /path/to/k5             # real weights, synthetic LoRAs
    .venv/bin/python benchmarks/bench_lora.py --model /path/to/k5 --lora a.safetensors [--lora b.safetensors]

Without --lora, two random LoRAs of --rank (default 16) over every visual attention and FFN layer are written
for the loaded model (for the real model, about 107 MB each in bf16: a realistic size).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (puts the project root on sys.path)

VISUAL = re.compile(r"visual_transformer_blocks\.\d+\.(?:(?:self|cross)_attention\.(?:to_query|to_key|to_value|"
                    r"out_layer)|feed_forward\.(?:in_layer|out_layer))$")


def synth_lora(modules: dict[str, tuple[int, int]], rank: int, seed: int, path: Path, dtype) -> int:
    """A random rank-`rank` LoRA (diffusers/PEFT keys) over the visual attention + FFN layers; returns its bytes."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (fan_in, fan_out) in modules.items():
        if VISUAL.search(name):
            sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) / fan_in**0.5).to(dtype)
            sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).to(dtype)
    save_file(sd, str(path))
    return path.stat().st_size


def place(src: Path, dst: Path) -> None:
    """`src` inside the LoRA folder as `dst` (a hard link when possible; symlinks out of the folder are refused)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy(src, dst)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--lora", action="append", type=Path, default=[],
                    help="a LoRA .safetensors file (give twice for two different ones)")
    ap.add_argument("--rank", type=int, default=16, help="rank of the synthetic LoRAs (without --lora)")
    args = ap.parse_args()
    width, height = common.size(args)
    tiny = args.tiny or not args.model

    import torch
    from k5serve.pipelines.loader import LoadConfig, load_t2i
    from k5serve.pipelines.lora import LoraManager, lora_target_modules
    from k5serve.pipelines.worker import GenerationSpec

    work = Path(tempfile.mkdtemp(prefix="k5bench-lora-"))
    try:
        if tiny:
            from k5serve.weights.tiny import ensure_tiny

            path = ensure_tiny(work / "tiny", "t2i")
        else:
            from k5serve.weights.hub import resolve

            path = resolve(args.model)
        pipe, info = load_t2i(LoadConfig(path, args.device, "auto"))
        device = pipe.transformer.device
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

        lora_dir = work / "loras"
        lora_dir.mkdir()
        if args.lora:
            sources = (args.lora * 2)[:2]
            for name, src in zip(("a", "b"), sources):
                place(src.resolve(), lora_dir / f"{name}.safetensors")
            lora_desc = ", ".join(str(p) for p in args.lora)
        else:
            modules = lora_target_modules(pipe.transformer)
            size = 0
            for name, seed in (("a", 1), ("b", 2)):
                size = synth_lora(modules, args.rank, seed, lora_dir / f"{name}.safetensors", pipe.transformer.dtype)
            n = sum(1 for m in modules if VISUAL.search(m))
            lora_desc = f"synthetic rank {args.rank} on {n} visual attention+FFN layers, {size / 2**20:.1f} MiB"
        # cold loads use fresh ids (hard links to a.safetensors), so every run really loads
        for i in range(args.runs + 1):
            place(lora_dir / "a.safetensors", lora_dir / f"cold{i}.safetensors")

        manager = LoraManager(pipe, lora_dir, max_loaded=4)
        spec = GenerationSpec(prompt="a red fox in the snow, detailed photograph", negative_prompt="", width=width,
                              height=height, seed=42, steps=args.steps, guidance_scale=7.0)

        def gen():
            pipe.generate(spec)
            sync()

        def timed(setup, fn) -> list[float]:
            out = []
            for i in range(args.runs + 1):  # the first is a warm-up
                setup(i)
                sync()
                start = time.perf_counter()
                fn(i)
                sync()
                if i:
                    out.append(time.perf_counter() - start)
            return out

        rows: list[tuple[str, list[float]]] = []
        rows.append(("generation, no LoRA", timed(lambda i: manager.apply([]), lambda i: gen())))
        rows.append(("first load of a LoRA (`apply` on a cold adapter)",
                     timed(lambda i: manager.unload_all(), lambda i: manager.apply([(f"cold{i}", 1.0)]))))
        manager.unload_all()
        manager.apply([("a", 1.0)])
        manager.apply([("b", 1.0)])
        rows.append(("switch between two cached adapters",
                     timed(lambda i: manager.apply([("ab"[i % 2], 1.0)]),
                           lambda i: manager.apply([("ba"[i % 2], 0.8)]))))
        rows.append(("`apply([])`: back to the exact base model",
                     timed(lambda i: manager.apply([("a", 1.0)]), lambda i: manager.apply([]))))
        rows.append(("generation, one LoRA active", timed(lambda i: manager.apply([("a", 1.0)]), lambda i: gen())))
        manager.unload_all()

        base = statistics.median(rows[0][1])
        print(f"\nweights: {'tiny (generated)' if tiny else args.model}; device {info['device']}, "
              f"dtype {info['dtype']}; {width}x{height}, {args.steps} steps, CFG 7; LoRA: {lora_desc}; "
              f"median of {args.runs} runs after 1 warm-up; torch threads {torch.get_num_threads()}\n")
        print("| what | median s | min s | max s | x one generation |")
        print("|---|---|---|---|---|")
        for name, times in rows:
            med = statistics.median(times)
            print(f"| {name} | {med:.4f} | {min(times):.4f} | {max(times):.4f} | {med / base:.4f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
