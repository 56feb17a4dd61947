"""Fair share between tenants: how long one task of tenant B waits behind a flood from tenant A.

A real server (`k5serve serve`, uvicorn on loopback) with a tenants file of three tenants: A and B (weight 1
each) and an admin that watches the queue. Each run: A sends `--flood` async tasks in one request, then B at
once sends one task and waits for its answer (deliveryMethod sync). Measured: B's answer time, also in units of
one task's time alone (measured first, the median of `--runs`), and the time until A's flood is done.

Two ways, the same load each:
- **fair share**: A and B are different tenants; B's task goes ahead of A's queued ones (each free slot goes to
  the tenants in turn), so B waits for at most one of A's tasks per slot: about 2 task times in all.
- **one queue**: B sends with A's key, so both are one tenant and its tasks run first in, first out, as every
  client's did before tenants: B waits for the whole flood, about `--flood` + 1 task times.

`--server-args "--workers ray --replicas 2"` runs the same on two Ray Serve replicas. Not a timed test.

    .venv/bin/python benchmarks/load_tenants.py --tiny --flood 30 --runs 3 --steps 10
"""

from __future__ import annotations

import shlex
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import common
import httpx
from load_frontends import MODEL

KEYS = {name: f"load-tenants-{name}-key-{uuid.uuid4().hex}" for name in ("a", "b", "admin")}


def tenants_toml() -> str:
    return "".join(f'[[tenant]]\nname = "{name}"\nkey = "{key}"\n{"admin = true" if name == "admin" else ""}\n'
                   for name, key in KEYS.items())


def one_task(args, delivery: str) -> dict:
    width, height = common.size(args)
    return {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": MODEL, "positivePrompt": "load",
            "width": width, "height": height, "steps": args.steps, "deliveryMethod": delivery, "outputType": "URL"}


def post(url: str, key: str, tasks: list[dict]) -> httpx.Response:
    answer = httpx.post(url + "/v1", json=tasks, headers={"Authorization": f"Bearer {key}"}, timeout=3600)
    if answer.status_code != 200:
        raise SystemExit(f"the server answered {answer.status_code}: {answer.text[:500]}")
    return answer


def until_idle(url: str) -> None:
    """Until no task is queued or running (the admin's queue view, 4 times a second: polling harder takes CPU
    from the generation on a small machine)."""
    with httpx.Client(headers={"Authorization": f"Bearer {KEYS['admin']}"}) as http:
        while http.get(url + "/tasks").json()["tasks"]:
            time.sleep(0.25)


def run(url: str, args, b_key: str) -> tuple[float, float]:
    """One flood from A and one task from B with `b_key`: (B's answer s, A's flood done s)."""
    until_idle(url)
    start = time.perf_counter()
    post(url, KEYS["a"], [one_task(args, "async") for _ in range(args.flood)])
    sent = time.perf_counter()
    post(url, b_key, [one_task(args, "sync")])
    b_seconds = time.perf_counter() - sent
    until_idle(url)
    return b_seconds, time.perf_counter() - start


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--flood", type=int, default=30, help="tasks A sends at once before B's one")
    ap.add_argument("--server-args", default="", help="more options for `k5serve serve`, e.g. '--workers ray'")
    ap.set_defaults(steps=10, runs=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="load-tenants-"))
    (work / "tenants.toml").write_text(tenants_toml())
    server = common.Server(work, args, "--tenants", str(work / "tenants.toml"), "--poll-wait", "0",
                           *shlex.split(args.server_args), threads=2)
    rows = {}
    try:
        post(server.url, KEYS["a"], [one_task(args, "sync")])  # warm-up
        alone = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            post(server.url, KEYS["a"], [one_task(args, "sync")])
            alone.append(time.perf_counter() - t0)
        one = statistics.median(alone)
        for way, b_key in (("fair share (A, B: two tenants)", KEYS["b"]), ("one queue (B sends with A's key)",
                                                                           KEYS["a"])):
            rows[way] = [run(server.url, args, b_key) for _ in range(args.runs)]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"A sends {args.flood} tasks, then B one; {args.size}, {args.steps} steps, "
          f"{'tiny weights' if args.model is None else args.model}, {args.server_args or 'the local worker'}; "
          f"{args.runs} runs each, one task alone: {one:.2f} s (median)\n")
    print("| | B's answer s (median) | (max) | B's answer / one task (median) | A's flood done s (median) |")
    print("|---|---|---|---|---|")
    for way, results in rows.items():
        b = [r[0] for r in results]
        print(f"| {way} | {statistics.median(b):.2f} | {max(b):.2f} | {statistics.median(b) / one:.1f} | "
              f"{statistics.median(r[1] for r in results):.1f} |")


if __name__ == "__main__":
    main()
