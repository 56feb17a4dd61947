"""Greedy WebSocket clients that never read: what they make the server hold, and whether it stays responsive.

One large result (a 1024x1024 PNG as base64Data, a few MB) is generated first. Then `--clients` WebSocket
clients each authenticate and send their share of `--requests` getResponse tasks for it, one frame each, and
never read a byte (tests/rawws.py: raw sockets with a 4 KiB receive buffer). Meanwhile the server's
resident memory (VmRSS) and `/health` latency are sampled every 0.2 s. After `--hold` seconds the clients
close their sockets, and the memory is followed for `--after` seconds more. A real server (`k5serve serve`
on loopback). Not a timed test.

    .venv/bin/python benchmarks/greedy_clients.py --tiny --clients 50 --requests 400
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import common
import httpx
from load_frontends import MODEL

sys.path.insert(0, str(common.ROOT / "tests"))
from rawws import RawClient  # noqa: E402 - a helper module of the tests' (no test code in it)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=400, help="getResponse tasks in all, one frame each")
    ap.add_argument("--hold", type=float, default=45, help="seconds the clients stay connected without reading")
    ap.add_argument("--after", type=float, default=60, help="seconds memory is followed after they leave")
    ap.set_defaults(steps=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="greedy-"))
    server = common.Server(work, args, "--poll-wait", "0", threads=2)
    samples: list[tuple[float, float, float]] = []  # (seconds since start, RSS MiB, /health seconds)
    stop = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    http.get(server.url + "/health")
                    latency = time.perf_counter() - t0
                except httpx.HTTPError:
                    latency = 60.0
                samples.append((time.monotonic() - started, rss_mib(server.proc.pid), latency))
                time.sleep(0.2)

    try:
        task_uuid = str(uuid.uuid4())
        answer = httpx.post(server.url + "/v1", timeout=600, json=[{
            "taskType": "imageInference", "taskUUID": task_uuid, "model": MODEL, "positivePrompt": "static",
            "width": 1024, "height": 1024, "steps": args.steps, "outputType": "base64Data", "outputFormat": "PNG"}])
        size = len(answer.content) / 2**20
        time.sleep(3)
        baseline = rss_mib(server.proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        clients = [RawClient(server.url) for _ in range(args.clients)]  # they never read
        for c in clients:
            c.send([{"taskType": "authentication", "apiKey": "none"}])
        for i in range(args.requests):
            try:
                clients[i % len(clients)].send([{"taskType": "getResponse", "taskUUID": task_uuid}])
            except OSError:
                pass  # the server stopped reading this client: backpressure
        held_until = time.monotonic() + args.hold
        while time.monotonic() < held_until:
            time.sleep(0.5)
        left = time.monotonic() - started
        for c in clients:
            c.close()
        time.sleep(args.after)
        stop.set()
        sampler.join(30)
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    during = [s for s in samples if s[0] <= left]
    after = [s for s in samples if s[0] > left]
    peak = max(s[1] for s in samples)
    refused = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith('k5serve_tasks_total{outcome="rateLimitExceeded",type="getResponse"}'))
    print(f"{args.clients} WebSocket clients that never read, {args.requests} getResponse of one {size:.2f} MB "
          f"result (a 1024x1024 PNG as base64Data), held {args.hold:g} s, then the clients leave\n")
    trail = [(t, next((r for at, r, _ in after if at - left >= t), after[-1][1])) for t in (10, 30, 60, 120, 180)
             if t <= args.after]
    print("RSS after the clients left: " + ", ".join(f"{t} s: {r:.0f} MiB" for t, r in trail) + "\n")
    print("| RSS before MiB | peak MiB | growth MiB | /health max s (held) | RSS at leave MiB | "
          f"{args.after:g} s after MiB | after vs before MiB | refused 429 |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {baseline:.0f} | {peak:.0f} | {peak - baseline:.0f} | {max(s[2] for s in during):.2f} | "
          f"{during[-1][1]:.0f} | {after[-1][1]:.0f} | {after[-1][1] - baseline:+.0f} | {refused:.0f} |")


if __name__ == "__main__":
    main()
