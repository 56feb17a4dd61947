"""Fixtures that run the real server: `k5serve serve --tiny` under uvicorn on a loopback port."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from ports import free_port

MODEL = "runware:kandinsky-5.0-image-lite@1"
ROOT = Path(__file__).resolve().parent.parent
API_KEY = "k5-test-key-0123456789abcdefXYZ"  # > 24 chars, as ComfyUI's client insists


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300,
               statuses: tuple[int, ...] = (200,)) -> None:
    """Until `url`/ready answers with one of `statuses`; RuntimeError, with the server's log, when the process
    exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code in statuses:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{log.read_text()}")


class RunningServer:
    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None, ready: bool = True,
                 command: tuple[str, ...] = (sys.executable, "-m", "k5serve.server.cli"), cwd: Path = ROOT):
        """Starts `command serve --tiny ...` in `cwd` and waits until /ready says 200 (`ready=False`: until it
        answers at all)."""
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / f"server-{self.port}.log"
        cmd = [*command, "serve", "--tiny", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(data_dir), *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            wait_ready(self.proc, self.url, self.log_path, statuses=(200,) if ready else (200, 503))
        except RuntimeError:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text()

    def post(self, tasks, **kw) -> httpx.Response:
        return httpx.post(self.url + "/v1", json=tasks, timeout=kw.pop("timeout", 300), **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The session's tiny weights live here (built once); `generate` runs use it as their data dir."""
    return tmp_path_factory.mktemp("k5serve-data")


def own_data_dir(tmp_path_factory, data_dir: Path, name: str = "server") -> Path:
    """A data dir of its own for one server (one server per data dir), with the tiny weights copied in."""
    from k5serve.weights.tiny import ensure_tiny

    own = tmp_path_factory.mktemp(name)
    for kind in ("t2i", "i2i"):
        shutil.copytree(ensure_tiny(data_dir / "tiny", kind), own / "tiny" / kind)
    return own


def _server_factory(data_dir, tmp_path_factory):
    """(start(*extra, env=None) -> RunningServer, stop_all)."""
    started: list[RunningServer] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> RunningServer:
        server = RunningServer(own_data_dir(tmp_path_factory, data_dir), *extra, env=env)
        started.append(server)
        return server

    def stop_all() -> None:
        for server in started:
            server.stop()

    return start, stop_all


@pytest.fixture(scope="module")
def start_server(data_dir, tmp_path_factory):
    """Factory: start a server with extra CLI options; they are stopped when the test module ends (each
    server holds about 1.2 GB, and CI has 24 GB)."""
    start, stop_all = _server_factory(data_dir, tmp_path_factory)
    yield start
    stop_all()


@pytest.fixture(scope="session")
def server(data_dir, tmp_path_factory) -> RunningServer:
    """The default open-access server, shared by most tests."""
    start, stop_all = _server_factory(data_dir, tmp_path_factory)
    yield start("--image-ttl", "3600")
    stop_all()


def task(**fields) -> dict:
    """A valid, fast imageInference task (10 steps), with fields overridden."""
    base = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": MODEL,
        "positivePrompt": "a red fox in the snow",
        "width": 1024,
        "height": 1024,
        "steps": 10,
        "seed": 42,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}
