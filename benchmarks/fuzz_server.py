"""Long fuzz run against a server: the suite's hostile strategies (tests/hostile.py), for as many cases as
you ask, over HTTP (task arrays with and without a key, raw bodies) and WebSocket (task arrays, raw frames).
Random (not derandomized like the suite); failures are counted and the first few printed, not shrunk.
It only talks to the server you name (loopback by default) and stops after --cases.

    .venv/bin/k5serve serve --tiny --port 8080 --api-key fuzz-key-0123456789 --max-queue 1 --poll-wait 0 &
    .venv/bin/python benchmarks/fuzz_server.py --url http://127.0.0.1:8080 --key fuzz-key-0123456789 --cases 10000
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
from pathlib import Path
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import hostile  # noqa: E402

KINDS = {  # name -> (strategy, share of the cases)
    "http tasks": (hostile.task_arrays, 0.35),
    "http raw body": (hostile.raw_bodies, 0.15),
    "http no key": (hostile.task_arrays, 0.10),
    "ws tasks": (hostile.task_arrays, 0.25),
    "ws raw frame": (hostile.raw_bodies, 0.15),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--key", help="the server's API key (none: an open server)")
    ap.add_argument("--cases", type=int, default=10000)
    ap.add_argument("--server-log", type=Path, help="the server's log: lines with a traceback count as failures")
    args = ap.parse_args()
    log_start = args.server_log.stat().st_size if args.server_log else 0
    where = urlsplit(args.url)
    http = hostile.Http(where.hostname, where.port or 80, args.key)
    socket = hostile.Socket(args.url.replace("http", "ws", 1) + "/v1", args.key)
    outcomes: dict[str, collections.Counter] = {kind: collections.Counter() for kind in KINDS}
    failures: list[str] = []
    started = time.monotonic()

    def run(kind: str, value) -> None:
        nonlocal http, socket
        try:
            if kind == "http tasks":
                outcome = hostile.http_tasks(http, value)
            elif kind == "http raw body":
                outcome = hostile.http_raw(http, value)
            elif kind == "http no key":
                outcome = hostile.http_tasks(http, value, key=None) if args.key else "skipped (open server)"
            elif kind == "ws tasks":
                outcome = f"{hostile.ws_tasks(socket, value)} frame(s)"
            else:
                outcome = f"{hostile.ws_raw(socket, value)} frame(s)"
            outcomes[kind][outcome] += 1
        except Exception as exc:  # noqa: BLE001 - a failure of the server is what we count
            outcomes[kind]["FAILED"] += 1
            if len(failures) < 5:
                failures.append(f"{kind}: {value!r:.300}\n{''.join(traceback.format_exception_only(exc))}")
            http.close()  # start clean after a failure
            http = hostile.Http(where.hostname, where.port or 80, args.key)
            socket.close()
            socket = hostile.Socket(args.url.replace("http", "ws", 1) + "/v1", args.key)

    def fuzz(kind: str, strategy, n: int):
        @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(value=strategy)
        def cases(value):
            run(kind, value)

        return cases

    for kind, (strategy, share) in KINDS.items():
        fuzz(kind, strategy, max(1, round(args.cases * share)))()

    try:
        hostile.check_still_fine(args.url)
        after = "/health, /ready and /metrics fine afterwards"
    except AssertionError as exc:
        after = f"/health, /ready or /metrics NOT fine afterwards: {exc}"
    seconds = time.monotonic() - started
    if args.server_log:
        with args.server_log.open("rb") as log:
            log.seek(log_start)
            bad = [line for line in log.read().decode("utf-8", "replace").splitlines()
                   if "Traceback" in line or "internalServerError" in line]
        outcomes["server log"] = collections.Counter({"FAILED": len(bad)} if bad else {"no tracebacks": 1})
        failures += bad[:3]

    total = sum(sum(c.values()) for kind, c in outcomes.items() if kind in KINDS)
    failed = sum(c["FAILED"] for c in outcomes.values())
    print(f"\n{total} cases in {seconds:.0f} s against {args.url}; {failed} failed; {after}\n")
    print(f"| {'kind':<14} | {'cases':>6} | answers (HTTP status, or WebSocket frames per case) |")
    print(f"|{'-' * 16}|{'-' * 8}|{'-' * 53}|")
    for kind, counts in outcomes.items():
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))
        print(f"| {kind:<14} | {sum(counts.values()):>6} | {answers} |")
    for failure in failures:
        print("\n" + failure)
    return 1 if failed or "NOT" in after else 0


if __name__ == "__main__":
    sys.exit(main())
