"""A database outage in the middle of a run: two front-ends on one PostgreSQL, N async tasks with webhooks,
PostgreSQL stopped for longer than the task lease while they run, then started again.

Counts: tasks ended by state (success, error, never finished), flips (a task a client saw as failed and later
as succeeded, or the other way round), tasks a polling client ever saw fail (serviceUnavailable answers to
getResponse during the outage are not failures: they say "retry"), webhooks per task (missing, duplicated).
During the outage it also measures what a load balancer and a client see: `/health` and `/ready` latency
(max), and how long a new task takes to be refused (max). Real servers (`k5serve serve` on loopback) and a
real PostgreSQL server (a throw-away cluster from Debian's binaries, the tests' pgserver.py helper; it is
stopped and started with pg_ctl). Not a timed test.

    .venv/bin/python benchmarks/outage.py --tiny --tasks 30 --outage 45
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import common
import httpx
from load_frontends import MODEL, Receiver


def task(steps: int, webhook: str | None = None, i: int = 0) -> dict:
    body = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": MODEL, "deliveryMethod": "async",
            "positivePrompt": f"a lighthouse in a storm, {i}", "width": 1024, "height": 1024, "steps": steps,
            "seed": i, "outputFormat": "JPG"}
    return body | ({"webhookURL": webhook} if webhook else {})


class Watch:
    """Polls every task's getResponse on the other front-end and records what a client would have read."""

    def __init__(self, tasks: list[tuple[dict, str]]):
        self.tasks = tasks  # (task, URL of the front-end polled)
        self.seen: dict[str, list[str]] = {t["taskUUID"]: [] for t, _ in tasks}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stop.is_set():
                for t, url in self.tasks:
                    try:
                        body = http.post(url + "/v1", json=[{"taskType": "getResponse",
                                                             "taskUUID": t["taskUUID"]}]).json()
                    except (httpx.HTTPError, ValueError):
                        continue
                    state = (body["errors"][0]["code"] if "errors" in body else
                             "success" if all(i.get("status") == "success" for i in body["data"]) else "processing")
                    states = self.seen[t["taskUUID"]]
                    if not states or states[-1] != state:
                        states.append(state)
                time.sleep(0.5)

    def final(self, task_uuid: str) -> str:
        states = [s for s in self.seen[task_uuid] if s != "serviceUnavailable"]
        return states[-1] if states else "unknown"


class Probe:
    """Every 0.5 s: GET /health and /ready on both front-ends, and a new task on each (during the outage)."""

    def __init__(self, urls: list[str], steps: int):
        self.urls, self.steps = urls, steps
        self.health: list[float] = []
        self.ready: list[float] = []
        self.refused: list[float] = []
        self.refusals: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _timed(self, call) -> float:
        started = time.perf_counter()
        try:
            call()
        except httpx.HTTPError:
            return 60.0
        return time.perf_counter() - started

    def _run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                for url in self.urls:
                    self.health.append(self._timed(lambda: http.get(url + "/health")))
                    self.ready.append(self._timed(lambda: http.get(url + "/ready")))
                    answer: list[httpx.Response] = []
                    self.refused.append(self._timed(lambda: answer.append(http.post(url + "/v1", json=[
                        task(self.steps)]))))
                    if answer:
                        code = answer[0].json().get("errors", [{}])[0].get("code", "accepted")
                        self.refusals[f"{answer[0].status_code} {code}"] += 1
                time.sleep(0.5)


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--tasks", type=int, default=30, help="async tasks with webhooks, half to each front-end")
    ap.add_argument("--outage", type=float, default=45, help="seconds PostgreSQL is stopped")
    ap.add_argument("--outage-after", type=float, default=5, help="seconds after the tasks are sent")
    ap.add_argument("--lease", type=float, default=30, help="--task-lease of both front-ends")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for every task to end")
    ap.set_defaults(steps=10)
    args = ap.parse_args()
    sys.path.insert(0, str(common.ROOT / "tests"))
    from pgserver import PostgresServer

    work = Path(tempfile.mkdtemp(prefix="outage-"))
    pg, receiver, servers = PostgresServer(), Receiver(), []
    flags = ["--database", pg.url, "--image-store", str(work / "images"), "--allow-private-urls", "--poll-wait", "0",
             "--task-lease", str(args.lease)]
    try:
        for name in ("a", "b"):
            (work / name).mkdir()
            if (work / "a" / "tiny").exists() and name != "a":  # built by the first server: the other reuses it
                shutil.copytree(work / "a" / "tiny", work / name / "tiny")
            servers.append(common.Server(work / name, args, *flags, threads=1))
        a, b = servers
        tasks = [task(args.steps, receiver.url, i) for i in range(args.tasks)]
        sent = time.monotonic()
        with httpx.Client(timeout=60) as http:
            for i, t in enumerate(tasks):
                assert http.post((a, b)[i % 2].url + "/v1", json=[t]).status_code == 200
        watch = Watch([(t, (b, a)[i % 2].url) for i, t in enumerate(tasks)])
        time.sleep(max(0.0, args.outage_after - (time.monotonic() - sent)))
        pg.stop()
        probe = Probe([a.url, b.url], args.steps)
        time.sleep(args.outage)
        probe.stop.set()
        probe.thread.join(120)
        pg.start()
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and any(watch.final(t["taskUUID"]) in ("processing", "unknown")
                                                  for t in tasks):
            time.sleep(1)
        wall = time.monotonic() - sent
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(receiver.counts[t["taskUUID"]] > 0 for t in tasks) < len(tasks):
            time.sleep(0.5)
        time.sleep(5)  # time for a second delivery, if there were one
        watch.stop.set()
        watch.thread.join(60)
    finally:
        for server in servers:
            server.stop()
        receiver.close()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)

    ends = Counter(watch.final(t["taskUUID"]) for t in tasks)
    failures = [u for u, states in watch.seen.items() if set(states) - {"processing", "success", "serviceUnavailable"}]
    flips = [u for u, states in watch.seen.items()
             if "success" in states and set(states) - {"processing", "success", "serviceUnavailable"}]
    hooks = [receiver.counts[t["taskUUID"]] for t in tasks]
    print(f"2 front-ends on one PostgreSQL (--task-lease {args.lease:g}), {args.tasks} async tasks with webhooks "
          f"({args.steps} steps, 1024x1024, tiny weights on the CPU), PostgreSQL stopped {args.outage_after:g} s "
          f"after they were sent, for {args.outage:g} s\n")
    print("| tasks | success | error | never finished | clients saw a failure | flips | webhooks per task (min-max) "
          "| missing | duplicated | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    errors = sum(n for s, n in ends.items() if s not in ("success", "processing", "unknown"))
    print(f"| {len(tasks)} | {ends['success']} | {errors} "
          f"| {ends['processing'] + ends['unknown']} | {len(failures)} | {len(flips)} | {min(hooks)}-{max(hooks)} | "
          f"{sum(h == 0 for h in hooks)} | {sum(h > 1 for h in hooks)} | {wall:.0f} |")
    print("\nDuring the outage (every 0.5 s, both front-ends):\n")
    print("| /health max s | /ready max s | a new task answered within (max s) | answers to new tasks |")
    print("|---|---|---|---|")
    print(f"| {max(probe.health):.2f} | {max(probe.ready):.2f} | {max(probe.refused):.2f} | "
          f"{', '.join(f'{n} x {k}' for k, n in probe.refusals.most_common())} |")


if __name__ == "__main__":
    main()
