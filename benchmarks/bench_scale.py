"""Scaling over Ray Serve replicas: throughput and latency for 1 and N replicas, against the local worker.

Starts real servers (`k5serve serve`, uvicorn on loopback) one after another, in the same run, on the same
weights: `--workers local`, then `--workers ray --replicas 1`, then `--workers ray --replicas N`. Every worker
gets the same torch thread count (`--threads`, default: the cores divided by N; the local worker gets it through
OMP_NUM_THREADS), and every configuration runs the same task mix: `--tasks` tasks kept `replicas` in flight at a
time (one per replica), after one warm-up task per replica.

Prints, per configuration: tasks per second, p50/p99 latency (seconds from POST to the answer), and for N
replicas the scaling figure: throughput(N) / (N x throughput(1)). The front-end overhead per task is the
median latency of one task at a time on 1 replica minus the same on the local worker, broken down with the
server's own metrics into the worker's time (generation and safety, as the worker measured it), the hop
(from handing the job to the worker until its result is back in the front-end, less the worker's time: Ray
Serve's routing, the streamed progress events, the result's transfer) and the rest (HTTP, validation,
encoding and storing the images).

    .venv/bin/python benchmarks/bench_scale.py --tiny --replicas 2 --tasks 24
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import common
import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "runware:kandinsky-5.0-image-lite@1"


def run_tasks(url: str, n: int, in_flight: int, steps: int, width: int, height: int) -> tuple[float, list[float]]:
    """n tasks, `in_flight` at a time -> (wall seconds, latency of each)."""
    latencies: list[float] = []
    lock = threading.Lock()
    left = list(range(n))

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not left:
                        return
                    i = left.pop()
                body = [{"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": MODEL,
                         "positivePrompt": f"a lighthouse at dusk, {i}", "width": width, "height": height,
                         "steps": steps, "seed": i}]
                started = time.perf_counter()
                resp = http.post(url + "/v1", json=body)
                if resp.status_code != 200 or "errors" in resp.json():
                    raise SystemExit(f"task failed: {resp.text[:500]}")
                with lock:
                    latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, latencies


def worker_sums(url: str) -> tuple[float, float]:
    """(generation seconds, queue/hop seconds) summed over every task so far, from /metrics."""
    sums = {"k5serve_generation_seconds_sum": 0.0, "k5serve_queue_wait_seconds_sum": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    return sums["k5serve_generation_seconds_sum"], sums["k5serve_queue_wait_seconds_sum"]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=24, help="tasks per configuration (after the warm-up)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / replicas)")
    ap.set_defaults(steps=10)
    args = ap.parse_args()
    width, height = common.size(args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows, sequential = [], {}
    same = ["--replica-threads", str(threads)]
    configs = [("local", 1, []), ("ray", 1, ["--workers", "ray", "--replicas", "1", *same]),
               ("ray", args.replicas, ["--workers", "ray", "--replicas", str(args.replicas), *same])]
    try:
        for kind, replicas, extra in configs:
            data_dir = work / f"{kind}-{replicas}"
            data_dir.mkdir()
            if (work / "tiny").exists():
                shutil.copytree(work / "tiny", data_dir / "tiny")
            server = common.Server(data_dir, args, *extra, threads=threads)
            try:
                if not (work / "tiny").exists() and (data_dir / "tiny").exists():
                    shutil.copytree(data_dir / "tiny", work / "tiny")
                run_tasks(server.url, replicas, replicas, args.steps, width, height)  # warm-up, one per worker
                if replicas == 1:  # one task at a time: the front-end's own cost shows against the local worker
                    before = worker_sums(server.url)
                    n = max(3, args.runs)
                    _, alone = run_tasks(server.url, n, 1, args.steps, width, height)
                    after = worker_sums(server.url)
                    work_s, hop_s = ((a - b) / n for a, b in zip(after, before, strict=True))
                    sequential[kind] = (statistics.median(alone), statistics.fmean(alone), work_s, hop_s)
                wall, latencies = run_tasks(server.url, args.tasks, replicas, args.steps, width, height)
            finally:
                server.stop()
            rows.append((f"--workers {kind}" + (f" --replicas {replicas}" if kind == "ray" else ""), replicas,
                         args.tasks / wall, statistics.median(latencies), percentile(latencies, 99)))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    one = next(r[2] for r in rows if r[0] == "--workers ray --replicas 1")
    print(f"{args.tasks} tasks per configuration, {args.steps} steps at {width}x{height}, {threads} torch thread(s) "
          f"per worker, one task in flight per worker\n")
    print("| workers | replicas | tasks/s | p50 s | p99 s | vs N x 1 replica |")
    print("|---|---|---|---|---|---|")
    for name, replicas, rate, p50, p99 in rows:
        ratio = f"{rate / (replicas * one):.2f}" if name.startswith("--workers ray") else "-"
        print(f"| {name} | {replicas} | {rate:.3f} | {p50:.2f} | {p99:.2f} | {ratio} |")
    overhead = sequential["ray"][0] - sequential["local"][0]
    print(f"\nfront-end overhead per task (1 replica vs local worker, one task at a time, median): "
          f"{overhead * 1000:+.0f} ms ({sequential['ray'][0]:.3f} s vs {sequential['local'][0]:.3f} s)\n")
    print("| one task at a time, mean per task | latency s | worker s | hop s | rest s |")
    print("|---|---|---|---|---|")
    for kind in ("local", "ray"):
        _, mean, work_s, hop_s = sequential[kind]
        print(f"| --workers {kind} | {mean:.3f} | {work_s:.3f} | {hop_s:.3f} | {mean - work_s - hop_s:.3f} |")


if __name__ == "__main__":
    main()
