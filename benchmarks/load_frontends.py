"""Load on front-ends that share one task view: 2 front-ends x N concurrent async tasks on PostgreSQL, against
one front-end with the same 2 x N tasks on its SQLite files.

Every task is sent with deliveryMethod async and a webhookURL (a receiver in this script); its result is
then polled with getResponse on the *other* front-end (on SQLite: the same one). Counts, per store:
completed (success with its image), failed (an error answer), lost (never finished, or unknown to the
front-end polled), duplicated (a task whose webhook arrived more than once, or that shows more images than
it asked for). getResponse latency is measured while the tasks run (every poll) and once they are done
(`--idle-polls` polls of finished tasks, one at a time). Real servers (`k5serve serve`, uvicorn on loopback)
and a real PostgreSQL server: `--database URL`, or a throw-away cluster started here with Debian's
`postgresql` binaries (the tests' pgserver.py helper, which has no test code in it). Not a timed test.

    .venv/bin/python benchmarks/load_frontends.py --tiny --tasks 50
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import common
import httpx

MODEL = "runware:kandinsky-5.0-image-lite@1"


class Receiver:
    """Counts webhook deliveries per taskUUID."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        lock = threading.Lock()
        counts = self.counts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                for item in body.get("data", []) + body.get("errors", []):
                    with lock:
                        counts[item.get("taskUUID")] += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def run_load(submit_to: list[str], poll_on: list[str], n: int, steps: int, receiver: Receiver,
             timeout: float) -> dict:
    """n async tasks sent to each of `submit_to` at once; each polled on the matching `poll_on` front-end."""
    lock = threading.Lock()
    polls: list[float] = []
    outcome: dict[str, str] = {}
    extra_images: set[str] = set()
    errors: list[str] = []
    jobs = [(submit, poll, str(uuid.uuid4()), i) for submit, poll in zip(submit_to, poll_on, strict=True)
            for i in range(n)]

    def one(job) -> None:
        submit, poll, task_uuid, i = job
        body = [{"taskType": "imageInference", "taskUUID": task_uuid, "model": MODEL, "deliveryMethod": "async",
                 "positivePrompt": f"a harbour at night, {i}", "width": 1024, "height": 1024, "steps": steps,
                 "seed": i, "webhookURL": receiver.url}]
        with httpx.Client(timeout=60) as http:
            ack = http.post(submit + "/v1", json=body)
            if ack.status_code != 200:
                with lock:
                    outcome[task_uuid] = "failed"
                    errors.append(ack.text[:300])
                return
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                started = time.perf_counter()
                answer = http.post(poll + "/v1", json=[{"taskType": "getResponse", "taskUUID": task_uuid}]).json()
                with lock:
                    polls.append(time.perf_counter() - started)
                if "errors" in answer:
                    code = answer["errors"][0].get("code")
                    with lock:
                        errors.append(json.dumps(answer["errors"][0])[:300])
                        outcome[task_uuid] = "lost" if code == "taskFailedOrNotFound" else "failed"
                    return
                items = answer["data"]
                if items and all(item.get("status") == "success" for item in items):
                    with lock:
                        outcome[task_uuid] = "completed"
                        if len(items) > 1:
                            extra_images.add(task_uuid)
                    return
                time.sleep(0.5)
            with lock:
                outcome[task_uuid] = "lost"

    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:  # every task in flight at once
        list(pool.map(one, jobs))
    wall = time.perf_counter() - started
    for error in sorted(set(errors))[:5]:
        print("error:", error, file=sys.stderr)
    deadline = time.monotonic() + 30
    while sum(receiver.counts[j[2]] > 0 for j in jobs) < len(jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(5)  # time for a second delivery, if there were one
    duplicated = {j[2] for j in jobs if receiver.counts[j[2]] > 1} | extra_images
    kinds = Counter(outcome.get(j[2], "lost") for j in jobs)
    return {"tasks": len(jobs), "wall": wall, "completed": kinds["completed"], "failed": kinds["failed"],
            "lost": kinds["lost"], "duplicated": len(duplicated), "webhooks_missing":
            sum(receiver.counts[j[2]] == 0 for j in jobs), "polls": polls, "finished": [j[2] for j in jobs],
            "poll_on": [j[1] for j in jobs]}


def idle_polls(result: dict, count: int) -> list[float]:
    times = []
    with httpx.Client(timeout=60) as http:
        for task_uuid, url in list(zip(result["finished"], result["poll_on"], strict=True))[:count]:
            started = time.perf_counter()
            http.post(url + "/v1", json=[{"taskType": "getResponse", "taskUUID": task_uuid}])
            times.append(time.perf_counter() - started)
    return times


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tasks", type=int, default=50, help="async tasks per front-end, all sent at once")
    ap.add_argument("--database", help="a PostgreSQL URL (default: a throw-away cluster started here)")
    ap.add_argument("--idle-polls", type=int, default=50)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds a task may take before it counts as lost")
    ap.set_defaults(steps=10)  # the model page's minimum
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="load-frontends-"))
    receiver, pg, rows = Receiver(), None, []
    common_flags = ["--allow-private-urls", "--poll-wait", "0", "--max-queue", str(4 * args.tasks)]
    try:
        url = args.database
        if url is None:
            sys.path.insert(0, str(common.ROOT / "tests"))
            from pgserver import PostgresServer

            pg = PostgresServer()
            url = pg.url
        (work / "a").mkdir()
        a = common.Server(work / "a", args, "--database", url, "--image-store", str(work / "images"),
                          *common_flags, threads=1)
        (work / "b").mkdir()
        if (work / "a" / "tiny").exists():  # built by the first server: the others reuse it
            shutil.copytree(work / "a" / "tiny", work / "b" / "tiny")
        try:
            b = common.Server(work / "b", args, "--database", url, "--image-store", str(work / "images"),
                              *common_flags, threads=1)
        except BaseException:
            a.stop()
            raise
        try:
            result = run_load([a.url, b.url], [b.url, a.url], args.tasks, args.steps, receiver, args.timeout)
            rows.append(("PostgreSQL", 2, result, idle_polls(result, args.idle_polls)))
        finally:
            a.stop()
            b.stop()
        (work / "sqlite").mkdir()
        if (work / "a" / "tiny").exists():
            shutil.copytree(work / "a" / "tiny", work / "sqlite" / "tiny")
        one = common.Server(work / "sqlite", args, *common_flags, threads=2)
        try:
            result = run_load([one.url, one.url], [one.url, one.url], args.tasks, args.steps, receiver,
                              args.timeout)
            rows.append(("SQLite", 1, result, idle_polls(result, args.idle_polls)))
        finally:
            one.stop()
    finally:
        receiver.close()
        if pg is not None:
            pg.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"{2 * args.tasks} async tasks sent at once ({args.tasks} per front-end, or all to the one SQLite "
          f"front-end), {args.steps} steps at 1024x1024, polled with getResponse every 0.5 s on the other "
          "front-end\n")
    print("| store | front-ends | tasks | completed | failed | lost | duplicated | webhooks missing | wall s | "
          "getResponse under load p50 / p95 ms | idle p50 / p95 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for store, fronts, r, idle in rows:
        print(f"| {store} | {fronts} | {r['tasks']} | {r['completed']} | {r['failed']} | {r['lost']} | "
              f"{r['duplicated']} | {r['webhooks_missing']} | {r['wall']:.0f} | "
              f"{statistics.median(r['polls'] or [0]) * 1000:.1f} / {percentile(r['polls'] or [0], 95) * 1000:.1f} | "
              f"{statistics.median(idle) * 1000:.1f} / {percentile(idle, 95) * 1000:.1f} |")


if __name__ == "__main__":
    main()
