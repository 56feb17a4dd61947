"""Load test: many concurrent WebSocket clients, each with several tasks in flight, against a running server.

Reports completed / failed / lost task counts and latency percentiles. Bounded in tasks and time; it only
talks to the URL you give it (loopback by default).

    .venv/bin/k5serve serve --tiny --port 8080 --max-queue 512 &
    .venv/bin/python benchmarks/load_ws.py --url ws://127.0.0.1:8080/v1 --clients 32 --tasks 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import websockets

MODEL = "runware:kandinsky-5.0-image-lite@1"


async def client(url: str, key: str, n_tasks: int, steps: int, deadline: float, stats: dict) -> None:
    try:
        ws = await websockets.connect(url, max_size=None)
    except OSError:
        stats["connect_failed"] += 1
        stats["lost"] += n_tasks
        return
    async with ws:
        await ws.send(json.dumps([{"taskType": "authentication", "apiKey": key}]))
        auth = json.loads(await ws.recv())
        if "errors" in auth:
            stats["connect_failed"] += 1
            stats["lost"] += n_tasks
            return
        sent: dict[str, float] = {}
        for i in range(n_tasks):
            t = str(uuid.uuid4())
            sent[t] = time.monotonic()
            await ws.send(json.dumps([{"taskType": "imageInference", "taskUUID": t, "model": MODEL,
                                       "positivePrompt": f"load test image {i}", "width": 1024, "height": 1024,
                                       "steps": steps, "outputType": "URL"}]))
        seen: set[str] = set()
        while len(seen) < n_tasks and time.monotonic() < deadline:
            try:
                frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
            except (TimeoutError, websockets.ConnectionClosed):
                break
            for item in frame.get("data", []):
                t = item.get("taskUUID")
                if t in sent and t not in seen:
                    seen.add(t)
                    stats["completed"] += 1
                    stats["latency"].append(time.monotonic() - sent[t])
                elif t in seen:
                    stats["duplicates"] += 1
            for err in frame.get("errors", []):
                t = err.get("taskUUID")
                if t in sent and t not in seen:
                    seen.add(t)
                    stats["failed"] += 1
                    stats["codes"][err.get("code")] = stats["codes"].get(err.get("code"), 0) + 1
        stats["lost"] += n_tasks - len(seen)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8080/v1")
    ap.add_argument("--key", default="load-test-key-000000000000000")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=4, help="tasks in flight per client")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    args = ap.parse_args()
    stats = {"completed": 0, "failed": 0, "lost": 0, "duplicates": 0, "connect_failed": 0, "latency": [],
             "codes": {}}
    start = time.monotonic()
    deadline = start + args.timeout
    await asyncio.gather(*(client(args.url, args.key, args.tasks, args.steps, deadline, stats)
                           for _ in range(args.clients)))
    wall = time.monotonic() - start
    lat = sorted(stats["latency"])

    def pct(p: float) -> str:
        return f"{lat[min(len(lat) - 1, int(p / 100 * len(lat)))]:.2f}" if lat else "-"

    total = args.clients * args.tasks
    print(f"\n{args.clients} clients x {args.tasks} tasks = {total} tasks, {args.steps} steps each, {wall:.1f} s wall")
    print("| completed | failed | lost | duplicates | connect failed | p50 s | p90 s | p99 s | max s | tasks/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {stats['completed']} | {stats['failed']} | {stats['lost']} | {stats['duplicates']} | "
          f"{stats['connect_failed']} | {pct(50)} | {pct(90)} | {pct(99)} | {max(lat) if lat else 0:.2f} | "
          f"{stats['completed'] / wall:.2f} |")
    if stats["codes"]:
        print("error codes:", stats["codes"])
    if lat:
        print(f"mean latency {statistics.mean(lat):.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
