"""What unauthenticated clients cost a server: N concurrent large bodies without a key (or with a wrong one),
and the server process's resident memory before and at its peak, against the same bodies sent with the key.
It reads the server's memory from /proc, so run it on the server's machine; loopback only by default.

    .venv/bin/k5serve serve --tiny --port 8080 --api-key bench-key-0123456789 &
    .venv/bin/python benchmarks/unauth_memory.py --url http://127.0.0.1:8080 --pid $! --key bench-key-0123456789
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

import httpx


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Peak:
    """Samples the server's RSS every 5 ms while a round runs."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


async def round_(url: str, headers: dict, body: bytes, clients: int) -> list[int]:
    async with httpx.AsyncClient(timeout=120) as client:
        answers = await asyncio.gather(*(client.post(url + "/v1", content=body, headers=headers)
                                         for _ in range(clients)))
    return [a.status_code for a in answers]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--pid", type=int, required=True, help="the server's process id")
    ap.add_argument("--key", required=True, help="the server's API key")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--mib", type=int, default=60, help="body size per client")
    args = ap.parse_args()
    body = b"[" + b" " * (args.mib * 2**20) + b'{"taskType":"ping"}]'
    rounds = [("no key", {}), ("wrong key", {"Authorization": "Bearer wrong"}),
              ("valid key", {"Authorization": f"Bearer {args.key}"})]
    print(f"{args.clients} concurrent bodies of {args.mib} MiB each\n")
    print("| client    | answers        | server RSS before | peak      | added     |")
    print("|-----------|----------------|-------------------|-----------|-----------|")
    for name, headers in rounds:
        time.sleep(1)
        before = rss_bytes(args.pid)
        with Peak(args.pid) as peak:
            statuses = asyncio.run(round_(args.url, headers | {"Content-Type": "application/json"}, body,
                                          args.clients))
        answers = ", ".join(f"{s} x{statuses.count(s)}" for s in sorted(set(statuses)))
        print(f"| {name:<9} | {answers:<14} | {before / 2**20:>13.0f} MiB | {peak.peak / 2**20:>5.0f} MiB | "
              f"{(peak.peak - before) / 2**20:>5.0f} MiB |")


if __name__ == "__main__":
    main()
