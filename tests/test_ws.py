"""The WebSocket transport, frame by frame, with a raw client (the exact JSON the SDKs depend on)."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import API_KEY, task
from PIL import Image
from websockets.sync.client import connect


class Client:
    """A bare WebSocket client: send a JSON array, read JSON objects."""

    def __init__(self, server, path="/v1"):
        self.ws = connect(server.url.replace("http", "ws") + path, max_size=None, open_timeout=10).__enter__()

    def send(self, *tasks):
        self.ws.send(json.dumps(list(tasks)))

    def recv(self, timeout=120) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def auth(self, key=API_KEY, session=None) -> str:
        msg = {"taskType": "authentication", "apiKey": key}
        if session:
            msg["connectionSessionUUID"] = session
        self.send(msg)
        frame = self.recv(10)
        [item] = frame["data"]
        return item["connectionSessionUUID"]

    def until(self, task_uuid, timeout=120) -> dict:
        """Next frame about `task_uuid` (skips others)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.recv(max(0.1, deadline - time.monotonic()))
            if any(i.get("taskUUID") == task_uuid for i in frame.get("data", []) + frame.get("errors", [])):
                return frame

    def close(self):
        self.ws.close()


@pytest.fixture(scope="module")
def ws_server(start_server):
    return start_server("--api-key", API_KEY, "--allow-private-urls", "--poll-wait", "0")


@pytest.fixture
def client(ws_server):
    c = Client(ws_server)
    yield c
    c.close()


def png_bytes(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_authentication_frame_is_exact(ws_server):
    for path in ("/v1", "/v1/", "/v1?sdk=js&version=1.2&dryRun=1"):
        c = Client(ws_server, path)
        c.send({"taskType": "authentication", "apiKey": API_KEY})
        frame = c.recv(10)
        assert list(frame) == ["data"] and len(frame["data"]) == 1
        item = frame["data"][0]
        assert set(item) == {"taskType", "connectionSessionUUID"} and item["taskType"] == "authentication"
        assert uuid.UUID(item["connectionSessionUUID"])
        c.close()


def test_bad_key_gets_error_before_anything_and_socket_stays_usable(ws_server):
    c = Client(ws_server)
    c.send({"taskType": "authentication", "apiKey": "bad-key-000000000000000000000"})
    frame = c.recv(10)
    assert frame == {"errors": [{"code": "invalidApiKey",
                                 "message": "Invalid API key. Get one at https://my.runware.ai/signup",
                                 "parameter": "apiKey", "taskType": "authentication"}]}
    assert c.auth()  # the same socket can still authenticate
    c.close()


def test_ping_pong_frame(client):
    client.send({"taskType": "ping", "ping": True})
    assert client.recv(5) == {"data": [{"taskType": "ping", "pong": True}]}


def test_task_before_authentication_gets_task_error(client):
    t = task()
    client.send(t)
    [err] = client.recv(10)["errors"]
    assert err["code"] == "missingApiKey" and err["taskUUID"] == t["taskUUID"]
    assert err["taskType"] == "imageInference"


def test_sync_generation_streams_each_item_once(client, ws_server):
    client.auth()
    t = task(numberResults=2, outputType="URL")
    client.send(t)
    frames = [client.until(t["taskUUID"]) for _ in range(2)]
    assert [len(f["data"]) for f in frames] == [1, 1]  # one item per frame
    items = [f["data"][0] for f in frames]
    assert [i["seed"] for i in items] == [42, 43]
    assert all(i["taskUUID"] == t["taskUUID"] and i["imageURL"].startswith("http://127.0.0.1") for i in items)
    assert httpx.get(items[0]["imageURL"]).status_code == 200
    # Nothing more about this task arrives.
    client.send({"taskType": "ping", "ping": True})
    assert client.recv(10) == {"data": [{"taskType": "ping", "pong": True}]}


def test_validation_error_is_scoped_to_its_task(client):
    client.auth()
    t = task(width=1000)
    client.send(t)
    [err] = client.until(t["taskUUID"])["errors"]
    assert err["code"] == "invalidWidth" and err["taskUUID"] == t["taskUUID"]


def test_ping_is_answered_while_the_gpu_is_busy(client):
    client.auth()
    t = task(steps=50, numberResults=2)
    client.send(t)
    time.sleep(0.5)
    start = time.monotonic()
    client.send({"taskType": "ping", "ping": True})
    assert client.recv(10) == {"data": [{"taskType": "ping", "pong": True}]}
    assert time.monotonic() - start < 2.0
    assert [len(client.until(t["taskUUID"], 300)["data"]) for _ in range(2)] == [1, 1]


def test_async_ack_then_get_response(client):
    client.auth()
    t = task(deliveryMethod="async", numberResults=2)
    client.send(t)
    assert client.until(t["taskUUID"]) == {"data": [{"taskType": "imageInference", "taskUUID": t["taskUUID"]}]}
    client.send({"taskType": "getResponse", "taskUUID": t["taskUUID"]})
    [first] = client.until(t["taskUUID"])["data"]
    assert first["status"] in ("processing", "success")
    if first["status"] == "processing":
        assert 0 <= first["progress"] <= 100 and first["taskType"] == "imageInference"
    else:
        client.until(t["taskUUID"])  # the answer's second item
    deadline = time.monotonic() + 120
    while True:  # each item of an answer comes in its own frame; a batch finishes together
        client.send({"taskType": "getResponse", "taskUUID": t["taskUUID"]})
        [item] = client.until(t["taskUUID"])["data"]
        if item["status"] == "success":
            [second] = client.until(t["taskUUID"])["data"]
            items = [item, second]
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert len(items) == 2 and all(i["status"] == "success" and i["taskType"] == "imageInference" for i in items)
    assert [i["seed"] for i in items] == [42, 43]


def test_get_response_for_unknown_task(client):
    client.auth()
    unknown = str(uuid.uuid4())
    client.send({"taskType": "getResponse", "taskUUID": unknown})
    [err] = client.until(unknown)["errors"]
    assert err["code"] == "taskFailedOrNotFound" and err["taskUUID"] == unknown


def test_reused_task_uuid_conflicts_and_original_stays_retrievable(client):
    client.auth()
    t = task()
    client.send(t)
    [item] = client.until(t["taskUUID"])["data"]
    client.send(dict(t, positivePrompt="something else entirely"))
    [err] = client.until(t["taskUUID"])["errors"]
    assert err["code"] == "conflictTaskUUID"
    client.send({"taskType": "getResponse", "taskUUID": t["taskUUID"]})
    [again] = client.until(t["taskUUID"])["data"]
    assert again["imageUUID"] == item["imageUUID"] and again["status"] == "success"


def test_results_finished_while_away_are_redelivered_on_resume(ws_server):
    c = Client(ws_server)
    session = c.auth()
    t = task(steps=20)
    c.send(t)
    time.sleep(0.3)
    c.close()  # leave before the image is ready
    time.sleep(8)
    c2 = Client(ws_server)
    assert c2.auth(session=session) == session
    [item] = c2.until(t["taskUUID"], 60)["data"]
    assert item["imageUUID"]
    c2.close()


def test_many_connections_with_several_tasks_each(ws_server):
    def one_client(i):
        c = Client(ws_server)
        c.auth()
        tasks = [task(seed=i * 10 + k) for k in range(2)]
        c.send(*tasks)
        got = {}
        while len(got) < 2:
            frame = c.recv(300)
            for item in frame.get("data", []):
                got[item["taskUUID"]] = item
        c.close()
        return sorted(got) == sorted(t["taskUUID"] for t in tasks)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(one_client, range(4)))


def test_image_upload_forms_and_use(client, ws_server):
    client.auth()
    raw = png_bytes()
    forms = [
        "data:image/png;base64," + base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode(),
    ]
    uploaded = []
    for image in forms:
        t = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": image}
        client.send(t)
        [item] = client.until(t["taskUUID"])["data"]
        assert item["taskType"] == "imageUpload" and uuid.UUID(item["imageUUID"])
        assert httpx.get(item["imageURL"]).content == raw
        uploaded.append(item)
    # A URL (this server allows private URLs, so it can fetch its own image) and a stored UUID.
    for image in (uploaded[0]["imageURL"], uploaded[0]["imageUUID"]):
        t = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": image}
        client.send(t)
        [item] = client.until(t["taskUUID"])["data"]
        assert httpx.get(item["imageURL"]).content == raw


@pytest.mark.parametrize("image,fragment", [
    ("data:image/png;base64,@@@@", "not valid base64"),
    (base64.b64encode(b"not an image at all").decode(), "not a readable image"),
    ("ftp://example.com/a.png", "not valid base64"),
    (str(uuid.uuid4()), "no stored image"),
])
def test_image_upload_errors(client, image, fragment):
    client.auth()
    t = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": image}
    client.send(t)
    [err] = client.until(t["taskUUID"])["errors"]
    assert err["code"] == "invalidImage" and err["parameter"] == "image" and fragment in err["message"]


def test_large_inbound_frame_is_accepted(client):
    client.auth()
    big = Image.frombytes("RGB", (2048, 2048), bytes(range(256)) * (2048 * 2048 * 3 // 256))
    buf = io.BytesIO()
    big.save(buf, format="PNG", compress_level=0)
    assert len(buf.getvalue()) > 10 * 1024 * 1024
    t = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()),
         "image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}
    client.send(t)
    [item] = client.until(t["taskUUID"], 60)["data"]
    assert item["imageUUID"]


def test_model_search_and_unsupported_types(client):
    client.auth()
    t = {"taskType": "modelSearch", "taskUUID": str(uuid.uuid4()), "search": "kandinsky"}
    client.send(t)
    [item] = client.until(t["taskUUID"])["data"]
    assert item["totalResults"] == 1 and item["results"][0]["air"] == "runware:kandinsky-5.0-image-lite@1"
    t = {"taskType": "videoInference", "taskUUID": str(uuid.uuid4())}
    client.send(t)
    [err] = client.until(t["taskUUID"])["errors"]
    assert err["code"] == "unsupportedTaskType"


def test_loopback_urls_refused_by_default(server):
    t = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": f"{server.url}/health"}
    [err] = server.post([t]).json()["errors"]
    assert err["code"] == "invalidImage" and "loopback" in err["message"].lower(), err
    resp = server.post([task(webhookURL="http://127.0.0.1:9/hook")])
    [err] = resp.json()["errors"]
    assert err["code"] == "invalidWebhookURL"
