"""The unmodified official Runware Python SDK (runware==0.5.24) against the real server on tiny weights."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import uuid

# The SDK reads its timeouts (ms) at import time.
os.environ.setdefault("RUNWARE_IMAGE_INFERENCE_TIMEOUT", "180000")
os.environ.setdefault("RUNWARE_IMAGE_INITIAL_TIMEOUT", "30000")
os.environ.setdefault("RUNWARE_IMAGE_UPLOAD_TIMEOUT", "30000")

import httpx  # noqa: E402
import pytest  # noqa: E402
from conftest import API_KEY, MODEL  # noqa: E402
from runware import IAsyncTaskResponse, IImageInference, Runware, RunwareAPIError  # noqa: E402


@pytest.fixture(scope="module")
def sdk_server(start_server):
    return start_server("--api-key", API_KEY, "--poll-wait", "10")


def run(coro_fn, server, key=API_KEY, timeout=600):
    async def main():
        rw = Runware(api_key=key, url=server.url.replace("http", "ws") + "/v1", log_level=logging.WARNING)
        await asyncio.wait_for(rw.connect(), 15)
        try:
            return await coro_fn(rw)
        finally:
            await rw.disconnect()

    return asyncio.run(asyncio.wait_for(main(), timeout))


def request(**kw) -> IImageInference:
    fields = dict(model=MODEL, positivePrompt="a red fox in the snow", width=1024, height=1024, steps=10, seed=42)
    fields.update(kw)
    return IImageInference(**fields)


def test_sync_generation_with_number_results(sdk_server):
    async def body(rw):
        assert rw.isAuthenticated()
        t = str(uuid.uuid4())
        return t, await rw.imageInference(requestImage=request(taskUUID=t, numberResults=2, outputType="URL",
                                                                outputFormat="PNG", includeCost=True))

    t, images = run(body, sdk_server)
    assert len(images) == 2
    assert all(i.taskType == "imageInference" and i.taskUUID == t for i in images)
    assert len({i.imageUUID for i in images}) == 2
    assert sorted(i.seed for i in images) == [42, 43]
    assert all(isinstance(i.cost, float) and i.cost > 0 for i in images)
    got = httpx.get(images[0].imageURL)
    assert got.status_code == 200 and got.content[:4] == b"\x89PNG"


def test_every_output_type(sdk_server):
    async def body(rw):
        [b] = await rw.imageInference(requestImage=request(outputType="base64Data"))
        [d] = await rw.imageInference(requestImage=request(outputType="dataURI", outputFormat="WEBP"))
        [u] = await rw.imageInference(requestImage=request(outputType="URL"))
        return b, d, u

    b, d, u = run(body, sdk_server)
    assert base64.b64decode(b.imageBase64Data)[:3] == b"\xff\xd8\xff"
    assert d.imageDataURI.startswith("data:image/webp;base64,")
    assert u.imageURL.startswith("http://127.0.0.1")


def test_async_then_get_response(sdk_server):
    async def body(rw):
        ack = await rw.imageInference(requestImage=request(deliveryMethod="async", seed=5))
        assert isinstance(ack, IAsyncTaskResponse) and ack.taskType == "imageInference"
        return await rw.getResponse(taskUUID=ack.taskUUID, numberResults=1)

    [res] = run(body, sdk_server)
    assert res.status == "success" and res.imageUUID and res.seed == 5


def test_upload_image(sdk_server, tmp_path):
    from PIL import Image

    path = tmp_path / "fox.png"
    Image.new("RGB", (96, 64), (10, 200, 30)).save(path)

    async def body(rw):
        return await rw.uploadImage(str(path))

    up = run(body, sdk_server)
    assert up.imageUUID and up.imageURL
    assert httpx.get(up.imageURL).content == path.read_bytes()


def test_validation_error_raises_runware_api_error(sdk_server):
    async def body(rw):
        with pytest.raises(RunwareAPIError) as exc:
            await asyncio.wait_for(rw.imageInference(requestImage=request(width=1000, height=1000)), 30)
        return exc.value

    err = run(body, sdk_server)
    assert err.code == "invalidWidth" and err.error_data["taskUUID"]


def test_bad_key_raises_connection_error(sdk_server):
    async def main():
        bad = Runware(api_key="bad-key-000000000000000000000", url=sdk_server.url.replace("http", "ws") + "/v1",
                      log_level=logging.CRITICAL, max_retries=0)
        await asyncio.wait_for(bad.connect(), 10)
        try:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(bad.imageInference(requestImage=request()), 60)
        finally:
            await bad.disconnect()

    asyncio.run(main())


def test_connection_survives_a_long_idle_period(sdk_server, monkeypatch):
    """The SDK's keep-alive: a JSON ping every 5 s, and it gives up after 30 s without a pong. Here, the same
    SDK code at a tenth of those times (its constants, which it reads at import), over 8 s: 16 pings."""
    import runware.server

    monkeypatch.setattr(runware.server, "PING_INTERVAL", 500)
    monkeypatch.setattr(runware.server, "PING_TIMEOUT_DURATION", 3000)

    async def body(rw):
        await asyncio.sleep(8)
        assert rw.connected()
        return await rw.imageInference(requestImage=request(seed=8))

    [img] = run(body, sdk_server)
    assert img.seed == 8
