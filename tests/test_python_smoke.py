"""Smoke test of an install on the Python it runs on: the package, `k5serve serve --tiny` started through its console
script, one request over HTTP, one over the WebSocket, one through the official `runware` SDK.

Part of the whole suite, and what `scripts/check-python.sh 3.12` runs in a fresh virtualenv of another Python.
One server for the module; real server, real SDK, no mocks.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

# The SDK reads its timeouts (ms) at import time (as in test_sdk.py).
os.environ.setdefault("RUNWARE_IMAGE_INFERENCE_TIMEOUT", "180000")
os.environ.setdefault("RUNWARE_IMAGE_INITIAL_TIMEOUT", "30000")
os.environ.setdefault("RUNWARE_IMAGE_UPLOAD_TIMEOUT", "30000")

import httpx  # noqa: E402
import pytest  # noqa: E402
from conftest import API_KEY, MODEL, ROOT, RunningServer, own_data_dir, task  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from runware import IImageInference, Runware  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

# The console script beside this interpreter: what `pip install` put in the virtualenv's bin/.
K5SERVE = Path(sys.executable).parent / "k5serve"


@pytest.fixture(scope="module")
def smoke_server(data_dir, tmp_path_factory):
    # `k5serve serve --tiny`, the installed console script, started from outside the checkout
    own = own_data_dir(tmp_path_factory, data_dir, "smoke")
    server = RunningServer(own, "--api-key", API_KEY, command=(str(K5SERVE),), cwd=own)
    yield server
    server.stop()


def png_of(blob: bytes) -> tuple[int, int]:
    assert blob[:8] == b"\x89PNG\r\n\x1a\n", blob[:8]
    return int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")  # IHDR width, height


def test_the_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert version in SpecifierSet(project["requires-python"]), version
    assert f"Programming Language :: Python :: {version}" in project["classifiers"]
    assert importlib.metadata.version("k5serve") == project["version"]
    assert K5SERVE.is_file(), K5SERVE
    import k5serve.server.app  # noqa: F401  (FastAPI side)
    import k5serve.weights.tiny  # noqa: F401  (torch side)
    import torch

    print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")
    res = subprocess.run([K5SERVE, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "usage: k5serve" in res.stdout, res.stderr


def test_one_request_over_http(smoke_server):
    resp = httpx.post(smoke_server.url + "/v1", json=[task(outputType="base64Data", outputFormat="PNG")],
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
    assert resp.status_code == 200, resp.text
    [item] = resp.json()["data"]
    assert item["taskType"] == "imageInference" and item["seed"] == 42
    assert png_of(base64.b64decode(item["imageBase64Data"])) == (1024, 1024)


def test_one_request_over_the_websocket(smoke_server):
    with connect(smoke_server.url.replace("http", "ws") + "/v1", max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
        [auth] = json.loads(ws.recv(timeout=10))["data"]
        assert auth["taskType"] == "authentication" and uuid.UUID(auth["connectionSessionUUID"])
        t = task(outputType="URL", outputFormat="PNG")
        ws.send(json.dumps([t]))
        frame = json.loads(ws.recv(timeout=300))
    assert "errors" not in frame, frame
    [item] = frame["data"]
    assert item["taskUUID"] == t["taskUUID"] and item["imageURL"].startswith(smoke_server.url)
    got = httpx.get(item["imageURL"], timeout=30)
    assert got.status_code == 200 and png_of(got.content) == (1024, 1024)


def test_one_request_through_the_runware_sdk(smoke_server):
    async def main():
        rw = Runware(api_key=API_KEY, url=smoke_server.url.replace("http", "ws") + "/v1", log_level=logging.WARNING)
        await asyncio.wait_for(rw.connect(), 15)
        try:
            assert rw.isAuthenticated()
            return await rw.imageInference(requestImage=IImageInference(
                model=MODEL, positivePrompt="a red fox in the snow", width=1024, height=1024, steps=10, seed=7,
                outputType="URL", outputFormat="PNG"))
        finally:
            await rw.disconnect()

    [image] = asyncio.run(asyncio.wait_for(main(), 600))
    assert image.taskType == "imageInference" and image.seed == 7
    got = httpx.get(image.imageURL, timeout=30)
    assert got.status_code == 200 and png_of(got.content) == (1024, 1024)
