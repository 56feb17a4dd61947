"""Slow clients against a real server: connections that never finish their request heads (a third send
nothing, a third part of a head, a third trickle a header a byte a second) must be closed by
--header-timeout, and past --max-connections new connections are answered 503 at once. Meanwhile a client
on a keep-alive connection opened before the flood times GET /health every 50 ms, and the server's open
file descriptors are counted from /proc.

Starts its own server (generated tiny weights) on a loopback port and talks to nothing else; each round
stops by itself (header timeout + 30 s at most).

    .venv/bin/python benchmarks/slow_clients.py
    .venv/bin/python benchmarks/slow_clients.py --rounds 200 400 --header-timeout 10 --max-connections 300
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import common  # noqa: E402  (puts the project root on sys.path)
import httpx

KINDS = ("silent", "partial head", "trickle")
PARTIAL_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
SLACK = 30.0  # seconds past the header timeout a round waits before it gives up on a connection


async def slow_client(port: int, kind: str, limit: float) -> tuple[float | None, bytes]:
    """Seconds until the server closed the connection (None: still open after `limit`) and what it sent."""
    start, answer = time.monotonic(), b""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind != "silent":
            writer.write(PARTIAL_HEAD + (b"X-Slow: " if kind == "trickle" else b""))
        while time.monotonic() - start < limit:
            try:
                data = await asyncio.wait_for(reader.read(4096), 1.0)
            except TimeoutError:
                if kind == "trickle":
                    writer.write(b"x")  # one more byte of a header value that never ends
                continue
            if not data:
                return time.monotonic() - start, answer
            answer += data
        return None, answer
    except ConnectionError:
        return time.monotonic() - start, answer
    finally:
        writer.close()


async def flood(port: int, connections: int, limit: float) -> list[tuple[float | None, bytes]]:
    return await asyncio.gather(*(slow_client(port, KINDS[i % len(KINDS)], limit) for i in range(connections)))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Probe(threading.Thread):
    """GET /health every 50 ms on one keep-alive connection; latencies and answers by phase, and the server's
    largest count of open descriptors."""

    def __init__(self, url: str, pid: int):
        super().__init__(daemon=True)
        self.url, self.pid, self.phase, self.peak_fds = url, pid, "idle", 0
        self.latencies: dict[str, list[float]] = {}
        self.failures: dict[str, int] = {}
        self.done = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            client.get(self.url + "/health")  # the connection is made before any flood
            self.ready.set()
            while not self.done.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get(self.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.setdefault(self.phase, []).append(time.perf_counter() - started)
                self.failures[self.phase] = self.failures.get(self.phase, 0) + (not ok)
                self.peak_fds = max(self.peak_fds, open_fds(self.pid))
                time.sleep(0.05)


def summary(results: list[tuple[float | None, bytes]], timeout: float) -> dict:
    refused = [s for s, answer in results if s is not None and answer.startswith(b"HTTP/1.1 503 ")]
    closed = [s for s, answer in results if s is not None and not answer]
    still_open = sum(s is None and not answer for s, answer in results)
    return {"refused": len(refused), "refused_last": max(refused, default=0.0), "closed": len(closed),
            "in_time": sum(s <= timeout + 1 for s in closed), "last": max(closed, default=0.0),
            "open": still_open, "other": len(results) - len(refused) - len(closed) - still_open}


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.1f} / {max(values) * 1000:.1f}"


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--rounds", type=int, nargs="+", default=[200, 400],
                    help="slow connections opened at once, one round each")
    ap.add_argument("--header-timeout", type=float, default=10.0)
    ap.add_argument("--max-connections", type=int, default=300)
    args = ap.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="k5bench-slow-"))
    server = common.Server(data_dir, args, "--header-timeout", str(args.header_timeout), "--max-connections",
                           str(args.max_connections), threads=os.cpu_count() or 1)
    probe = Probe(server.url, server.proc.pid)
    rows = []
    try:
        probe.start()
        probe.ready.wait(60)
        for i, connections in enumerate(args.rounds):
            probe.phase = f"before {i}"
            time.sleep(2)
            fds_before, probe.peak_fds = open_fds(server.proc.pid), 0
            probe.phase = f"during {i}"
            results = asyncio.run(flood(server.port, connections, args.header_timeout + SLACK))
            probe.phase = f"after {i}"
            time.sleep(0.5)
            rows.append((connections, summary(results, args.header_timeout), fds_before, probe.peak_fds,
                         open_fds(server.proc.pid), i))
    finally:
        probe.done.set()
        probe.join(60)
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"--header-timeout {args.header_timeout:g} --max-connections {args.max_connections}; kinds: "
          f"{', '.join(KINDS)} in turn; {os.cpu_count()} cores\n")
    print("| opened | answered 503 and closed (within) | closed by the timeout | of them within timeout + 1 s "
          "| last closed after | still open | other answers | server fds before / peak / after |")
    print("|---|---|---|---|---|---|---|---|")
    for connections, s, before, peak, after, _ in rows:
        print(f"| {connections} | {s['refused']} ({s['refused_last']:.2f} s) | {s['closed']} | {s['in_time']} "
              f"| {s['last']:.2f} s | {s['open']} | {s['other']} | {before} / {peak} / {after} |")
    print("\n| opened | GET /health on a keep-alive connection, median / max ms: before | during | failed during |")
    print("|---|---|---|---|")
    for connections, _, _, _, _, i in rows:
        print(f"| {connections} | {ms(probe.latencies[f'before {i}'])} | {ms(probe.latencies[f'during {i}'])} "
              f"| {probe.failures[f'during {i}']} |")


if __name__ == "__main__":
    main()
