"""What the benchmark scripts share: the common command-line options and the measurement policy."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "tests") not in sys.path:  # the tests' helper modules (no test code in them): rawws, pgserver, ...
    sys.path.insert(0, str(ROOT / "tests"))

from ports import free_port  # noqa: E402,F401 - defined once, for the tests and the benchmarks


def parser(doc: str | None) -> argparse.ArgumentParser:
    """--tiny/--model/--device/--runs/--steps/--size; scripts add their own options."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="generated tiny weights (the default without --model)")
    ap.add_argument("--model", help="local diffusers folder or cached repo id")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", type=int, default=5, help="measured runs (median reported), after one warm-up")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT")
    return ap


def size(args: argparse.Namespace) -> tuple[int, int]:
    width, height = map(int, args.size.split("x"))
    return width, height


class Server:
    """`k5serve serve` on a free loopback port, started and waited for until /ready is 200."""

    def __init__(self, data_dir: Path, args, *extra: str, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model = ["--tiny"] if args.model is None else ["--model", args.model]
        cmd = [sys.executable, "-m", "k5serve.server.cli", "--log-level", "warning", "serve", *model,
               "--port", str(self.port), "--data-dir", str(data_dir), "--max-queue", "256", *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
        self.log = open(data_dir / "server.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise SystemExit(f"server exited: {(data_dir / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit("server not ready after 600 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
