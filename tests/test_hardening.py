"""Inputs that used to break the server, each against the real server: bodies the JSON parser
refuses for reasons other than syntax, lone surrogates, hostile metric labels, huge numbers, keys in logs,
too many tasks, unauthenticated bodies, WebSocket clients with a 1 MiB message limit, the OpenAPI schema."""

from __future__ import annotations

import http.client
import json
import logging
import time
import uuid
from pathlib import Path

import httpx
import pytest
from conftest import task
from k5serve.server.ops.logs import JsonFormatter, TextFormatter
from k5serve.server.protocol.models import MAX_TTL
from k5serve.server.store.images import DirectoryImageStore
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

SHORT_KEY = "k5sh0rt"
ODD_KEY = "Ab+/cd=ef-0123456789-odd/key+="  # characters that URLs percent-encode
UUID = "61b9c2db-3e0a-4a66-9e8b-28b77f48e885"


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server("--api-key", SHORT_KEY, "--api-key", ODD_KEY, "--max-tasks-per-request", "8",
                        "--safety-action", "block", "--safety-threshold", "0",  # every checked image is flagged
                        "--ws-auth-timeout", "3", "--max-unauthenticated-websockets", "3")


def post(server, body: bytes, key: str | None = SHORT_KEY, path: str = "/v1") -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    return httpx.post(server.url + path, content=body, headers=headers, timeout=120)


def strict_json(resp: httpx.Response) -> dict:
    return json.loads(resp.content.decode("utf-8"))  # valid UTF-8 and valid JSON, or this raises


def only_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    [error] = strict_json(resp)["errors"]
    return error


UNPARSEABLE = {
    "integer over 4300 digits": b"[" + b"9" * 5000 + b"]",
    "nesting 2000 deep": b"[" * 2000 + b"]" * 2000,
    "nesting 40 deep": b"[" * 40 + b"]" * 40,
    "NaN": b'[{"taskType":"ping","x":NaN}]',
    "Infinity": b"[Infinity]",
    "not UTF-8": b'["\xe9"]',
    "empty": b"",
}


@pytest.mark.parametrize("body", UNPARSEABLE.values(), ids=UNPARSEABLE.keys())
def test_unparseable_bodies_are_400_and_keep_the_connection(keyed, body):
    conn = http.client.HTTPConnection("127.0.0.1", keyed.port, timeout=30)
    headers = {"Authorization": f"Bearer {SHORT_KEY}", "Content-Type": "application/json"}
    conn.request("POST", "/v1", body=body, headers=headers)
    first = conn.getresponse()
    error = json.loads(first.read())["errors"][0]
    assert first.status == 400 and error["code"] == "invalidJSON", error
    sock = conn.sock
    conn.request("POST", "/v1", body=b'[{"taskType":"ping"}]', headers=headers)
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read())["data"][0]["pong"] is True
    assert conn.sock is sock, "the keep-alive connection was dropped"
    conn.close()


@pytest.mark.parametrize("body", UNPARSEABLE.values(), ids=UNPARSEABLE.keys())
def test_unparseable_frames_get_an_error_frame_and_the_socket_stays(keyed, body):
    with connect(keyed.url.replace("http", "ws") + "/v1", max_size=None) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": SHORT_KEY}]))
        ws.recv(timeout=10)
        ws.send(body.decode("utf-8")) if body.isascii() else ws.send(body)
        [error] = json.loads(ws.recv(timeout=10))["errors"]
        assert error["code"] == "invalidJSON", error
        ws.send('[{"taskType":"ping"}]')
        assert json.loads(ws.recv(timeout=10)) == {"data": [{"taskType": "ping", "pong": True}]}


SURROGATES = {  # body, code, parameter, whether the answer can carry the taskUUID
    "taskType": ('[{"taskType":"x\\ud800","taskUUID":"' + UUID + '"}]', "unsupportedTaskType", "taskType", True),
    "getResponse taskUUID": ('[{"taskType":"getResponse","taskUUID":"x\\ud800"}]', "invalidTaskUUID", "taskUUID",
                             False),
    "model": (json.dumps([task(taskUUID=UUID, model="m\ud800")]), "invalidModel", "model", True),
    "scheduler": (json.dumps([task(taskUUID=UUID, scheduler="Euler\ud800")]), "invalidScheduler", "scheduler", True),
    "prompt": (json.dumps([task(taskUUID=UUID, positivePrompt="a fox \udfff")]), "invalidPositivePrompt",
               "positivePrompt", True),
    "lora model": (json.dumps([task(taskUUID=UUID, lora=[{"model": "\ud83d"}])]), "invalidLoraModel",
                   "lora[0].model", True),
}


@pytest.mark.parametrize("body,code,parameter,echoed", SURROGATES.values(), ids=SURROGATES.keys())
def test_lone_surrogates_are_refused_naming_the_parameter(keyed, body, code, parameter, echoed):
    error = only_error(post(keyed, body.encode()), 400)
    assert error["code"] == code and error["parameter"] == parameter, error
    assert error.get("taskUUID") == (UUID if echoed else None), error
    metrics = httpx.get(keyed.url + "/metrics")
    assert metrics.status_code == 200
    list(text_string_to_metric_families(metrics.text))  # still parses


def test_surrogate_api_key_is_a_plain_401(keyed):
    error = only_error(post(keyed, b'[{"taskType":"authentication","apiKey":"k\\ud800"}]', key=None), 401)
    assert error["code"] == "invalidApiKey" and "taskUUID" not in error


def task_series(server) -> set[tuple]:
    text = httpx.get(server.url + "/metrics").text
    return {tuple(sorted(s.labels.items())) for f in text_string_to_metric_families(text) if f.name == "k5serve_tasks"
            for s in f.samples}


def test_clients_cannot_choose_metric_labels(keyed):
    before = task_series(keyed)
    hostile_types = [f"madeUp{i}" for i in range(300)] + [ODD_KEY, SHORT_KEY, "x\ud800", "", "a" * 39]
    for start in range(0, len(hostile_types), 8):
        batch = [{"taskType": t, "taskUUID": str(uuid.uuid4())} for t in hostile_types[start:start + 8]]
        assert post(keyed, json.dumps(batch).encode()).status_code == 400
    after = task_series(keyed)
    added = after - before
    assert len(added) <= 3, added  # at most (other, unsupportedTaskType/missingTaskType/...) combinations
    text = httpx.get(keyed.url + "/metrics").text
    assert ODD_KEY not in text and SHORT_KEY not in text and "madeUp" not in text
    assert ('k5serve_tasks_total{outcome="unsupportedTaskType",type="other"}' in text)


def test_every_integer_has_a_storable_upper_bound(keyed):
    error = only_error(post(keyed, json.dumps([task(ttl=2**70)]).encode()), 400)
    assert error["code"] == "invalidTtl" and error["max"] == MAX_TTL
    for field, value in [("seed", 2**70), ("steps", 2**70), ("numberResults", 10**30), ("width", 10**300),
                         ("outputQuality", 2**64), ("acceleratorOptions", {"dbCacheSkipInterval": 2**70}),
                         ("acceleratorOptions", {"cacheStartStep": 2**70}), ("lora", [{"model": "x"}] * 17)]:
        error = only_error(post(keyed, json.dumps([task(**{field: value})]).encode()), 400)
        assert error["code"].startswith("invalid") and "max" in error, (field, error)


def test_the_largest_ttl_is_served(keyed):
    resp = post(keyed, json.dumps([task(ttl=MAX_TTL)]).encode())
    assert resp.status_code == 200, resp.text
    expires = httpx.get(resp.json()["data"][0]["imageURL"]).headers["cache-control"]
    assert int(expires.split("max-age=")[1]) > MAX_TTL - 60


def test_image_store_leaves_no_partial_file_when_a_write_fails(tmp_path):
    store = DirectoryImageStore(tmp_path)
    with pytest.raises(OverflowError):
        store.put(b"\xff\xd8\xff" + b"0" * 1000, "jpg", 2**70)  # an expiry the file system cannot hold
    assert list(tmp_path.iterdir()) == []


class DiskFullOnSecondImage(DirectoryImageStore):
    """Fault injection at the storage boundary: the second write of a task fails as a full disk would."""

    def put(self, data, ext, ttl):
        if any(self.root.iterdir()):
            raise OSError(28, "No space left on device")
        return super().put(data, ext, ttl)


def test_a_task_whose_images_cannot_all_be_stored_leaves_none(tmp_path):
    import asyncio
    from concurrent.futures import Future

    from k5serve.pipelines.worker import GenerationOutput
    from k5serve.server.config import ServerConfig
    from k5serve.server.protocol.errors import TaskError
    from k5serve.server.protocol.validation import parse_image_inference
    from k5serve.server.store.task_records import ERROR, SQLiteTaskStore, TaskRecord
    from k5serve.server.tasks.dispatcher import Dispatcher
    from k5serve.server.tasks.slot import ModelSlot
    from k5serve.server.tasks.to_spec import to_spec
    from PIL import Image

    store = DiskFullOnSecondImage(tmp_path / "images")
    records = SQLiteTaskStore(tmp_path / "tasks.sqlite3")
    dispatcher = Dispatcher(ServerConfig(data_dir=tmp_path), ModelSlot(lambda: None), store, records)
    t = parse_image_inference(task(numberResults=2))
    records.create(TaskRecord(t.taskUUID, t.taskType, expected_items=2, created_at=0, expires_at=1e12))
    images = [Image.new("RGB", (64, 64), (i * 90, 20, 20)) for i in range(2)]
    generated: Future = Future()
    generated.set_result(GenerationOutput(images=images, seeds=[42, 43], width=64, height=64, seconds=1.0))
    with pytest.raises(TaskError) as failed:
        asyncio.run(dispatcher.inference._finish(t, to_spec(t), generated, "http://127.0.0.1/"))
    assert failed.value.item.code == "internalServerError"
    assert list((tmp_path / "images").iterdir()) == []
    assert records.get(t.taskUUID).status == ERROR
    records.close()


def test_an_unauthenticated_body_is_refused_before_it_is_all_sent(keyed):
    """The server answers 401 after reading 64 KiB of a body that declares 32 MiB: it did not wait for the
    rest (the old server read whole bodies, up to 64 MiB, before looking at the key)."""
    import socket

    with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as conn:
        head = (f"POST /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {32 * 2**20}\r\n\r\n[").encode()
        conn.sendall(head + b" " * (80 * 1024))
        answer = conn.recv(65536).decode()
        if "\r\n\r\n{" not in answer:  # the body may come in a packet of its own
            answer += conn.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert "invalidApiKey" in answer


def test_get_response_answers_a_failed_task_with_its_own_status(keyed):
    """A task refused after it ran (here: every image flagged and --safety-action block) is a client error
    (400) when polled too, not a 500; the stored status never reaches the wire."""
    t = task(deliveryMethod="async", safety={"checkContent": True})
    assert post(keyed, json.dumps([t]).encode()).status_code == 200
    deadline = time.monotonic() + 120
    while True:
        resp = post(keyed, json.dumps([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]).encode())
        if resp.status_code != 200:
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    error = only_error(resp, 400)
    assert error["code"] == "nsfwContentDetected" and error["taskUUID"] == t["taskUUID"], error
    assert error["status"] == "error" and "httpStatus" not in error


def test_websockets_must_authenticate_soon_and_only_a_few_may_wait(keyed):
    url = keyed.url.replace("http", "ws") + "/v1"
    waiting = [connect(url).__enter__() for _ in range(3)]
    with pytest.raises(Exception) as refused:  # the fourth is refused at the handshake
        connect(url, open_timeout=5).__enter__()
    assert "403" in str(refused.value)
    waiting[0].send(json.dumps([{"taskType": "authentication", "apiKey": SHORT_KEY}]))
    assert "data" in json.loads(waiting[0].recv(timeout=10))
    with connect(url) as fourth:  # one authenticated: there is room again
        fourth.send('[{"taskType":"ping"}]')
        assert json.loads(fourth.recv(timeout=10))["data"][0]["pong"] is True
    with pytest.raises(Exception):
        waiting[1].recv(timeout=10)  # closed by the server after --ws-auth-timeout (3 s)
    assert waiting[1].close_code == 1008
    time.sleep(1)
    waiting[0].send('[{"taskType":"ping"}]')  # the authenticated one stays open
    assert json.loads(waiting[0].recv(timeout=10))["data"][0]["pong"] is True
    for ws in waiting:
        ws.close()


def test_log_lines_name_only_well_formed_task_uuids(keyed):
    for bad in ("x\nFAKE LOG LINE", "a" * 100, "not-a-uuid"):
        post(keyed, json.dumps([{"taskType": "modelSearch", "taskUUID": bad}]).encode())
    for line in keyed.log().splitlines():
        if line.startswith("{") and '"taskUUID"' in line:
            assert uuid.UUID(json.loads(line)["taskUUID"]), line


def test_keys_are_masked_in_every_form(keyed):
    quoted = "Ab%2B%2Fcd%3Def-0123456789-odd%2Fkey%2B%3D"
    mixed = "Ab%2b%2Fcd%3def-0123456789-odd/key+%3d"  # lower-case hex, some characters left raw
    for query in (f"?apiKey={SHORT_KEY}", f"?apiKey={quoted}", f"?token={mixed}&apiKey={ODD_KEY}"):
        assert post(keyed, b'[{"taskType":"ping"}]', path="/v1" + query).status_code == 200
    with connect(keyed.url.replace("http", "ws") + f"/v1?apiKey={quoted}") as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": ODD_KEY}]))
        ws.recv(timeout=10)
    time.sleep(0.5)
    log = keyed.log()
    assert "apiKey=***" in log
    for form in (SHORT_KEY, ODD_KEY, quoted, mixed, "Ab%2B", "Ab%2b", "Ab+/cd"):
        assert form not in log, form


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_log_formatters_mask_keys_anywhere_in_a_line(formatter):
    """Not only in query strings: a key in any message, raw or percent-encoded in any mix, of any length."""
    fmt = formatter(secrets=(SHORT_KEY, ODD_KEY, "k"))
    forms = [SHORT_KEY, ODD_KEY, "Ab%2B%2Fcd%3Def-0123456789-odd%2Fkey%2B%3D", "Ab%2b/cd=ef-0123456789-odd%2fkey+="]
    record = logging.LogRecord("k5serve.outbound", logging.INFO, __file__, 1, "found: %s %s %s %s", tuple(forms), None)
    line = fmt.format(record)
    assert line.count("***") >= 4 and not any(f in line for f in forms), line
    assert "k" not in line.split("found:")[1], line  # a one-letter key is masked too


def test_tasks_per_request_are_bounded(keyed):
    eight = [{"taskType": "ping"}] * 8
    assert post(keyed, json.dumps(eight).encode()).status_code == 200
    error = only_error(post(keyed, json.dumps(eight + [{"taskType": "ping"}]).encode()), 400)
    assert error["code"] == "maxTasksExceeded" and error["max"] == 8
    with connect(keyed.url.replace("http", "ws") + "/v1") as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": SHORT_KEY}] + [{"taskType": "ping"}] * 7))
        assert all("data" in json.loads(ws.recv(timeout=10)) for _ in range(8))
        ws.send(json.dumps([{"taskType": "ping"}] * 9))
        [error] = json.loads(ws.recv(timeout=10))["errors"]
        assert error["code"] == "maxTasksExceeded"


def test_empty_task_array_gets_the_same_error_on_both_transports(keyed):
    http_error = only_error(post(keyed, b"[]"), 400)
    with connect(keyed.url.replace("http", "ws") + "/v1") as ws:
        ws.send("[]")
        [ws_error] = json.loads(ws.recv(timeout=10))["errors"]
    assert http_error == ws_error and ws_error["code"] == "invalidRequestBody"


def test_unauthenticated_bodies_are_read_only_up_to_a_small_limit(keyed):
    padding = b" " * (256 * 1024)
    for key in (None, "wrong-key"):
        error = only_error(post(keyed, b"[" + padding + b'{"taskType":"ping"}]', key=key), 401)
        assert error["code"] == "invalidApiKey"
    # a large body is fine once its first task authenticates it, or its header does
    auth = json.dumps({"taskType": "authentication", "apiKey": ODD_KEY}).encode()
    resp = post(keyed, b"[" + auth + b"," + padding + b'{"taskType":"ping"}]', key=None)
    assert resp.status_code == 200 and resp.json()["data"][-1]["pong"] is True
    resp = post(keyed, b"[" + padding + b'{"taskType":"ping"}]')
    assert resp.status_code == 200
    # a small body without a key is read and refused as before
    assert only_error(post(keyed, b'[{"taskType":"ping"}]', key=None), 401)["code"] == "invalidApiKey"


def test_websocket_client_with_a_1_mib_limit_gets_two_base64_images(keyed):
    """The `websockets` default max_size (1 MiB), as some official clients connect: each item fits alone,
    both together would not."""
    t = task(numberResults=2, outputType="base64Data", outputFormat="JPG", outputQuality=90)
    with connect(keyed.url.replace("http", "ws") + "/v1", max_size=2**20) as ws:  # the library's default
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": SHORT_KEY}]))
        ws.recv(timeout=10)
        ws.send(json.dumps([t]))
        frames = [ws.recv(timeout=300) for _ in range(2)]
    items = [item for f in frames for item in json.loads(f)["data"]]
    assert [i["seed"] for i in items] == [42, 43] and all(i["taskUUID"] == t["taskUUID"] for i in items)
    assert all(len(f) < 2**20 for f in frames) and sum(map(len, frames)) > 2**20


def test_a_frame_too_large_for_common_clients_is_logged_with_the_remedy(keyed):
    t = task(outputType="base64Data", outputFormat="PNG")
    with connect(keyed.url.replace("http", "ws") + "/v1", max_size=None) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": SHORT_KEY}]))
        ws.recv(timeout=10)
        ws.send(json.dumps([t]))
        frame = ws.recv(timeout=300)
    assert len(frame) > 2**20
    time.sleep(0.2)
    [line] = [line for line in keyed.log().splitlines() if "1 MiB WebSocket message limit" in line]
    assert "outputType URL" in line and t["taskUUID"] in line


def test_get_response_items_arrive_one_per_frame(keyed):
    t = task(numberResults=2, deliveryMethod="async")
    with connect(keyed.url.replace("http", "ws") + "/v1", max_size=None) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": SHORT_KEY}]))
        ws.recv(timeout=10)
        ws.send(json.dumps([t]))
        assert json.loads(ws.recv(timeout=30))["data"] == [{"taskType": "imageInference", "taskUUID": t["taskUUID"]}]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ws.send(json.dumps([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]))
            first = json.loads(ws.recv(timeout=30))["data"]
            assert len(first) == 1
            if first[0]["status"] == "success":
                second = json.loads(ws.recv(timeout=30))["data"]
                assert len(second) == 1 and second[0]["status"] == "success"
                assert first[0]["imageUUID"] != second[0]["imageUUID"]
                return
            time.sleep(0.5)
    pytest.fail("the task did not finish")


def test_openapi_describes_every_task_and_answer(keyed):
    doc = httpx.get(keyed.url + "/openapi.json").json()
    post_v1 = doc["paths"]["/v1"]["post"]
    body = post_v1["requestBody"]["content"]["application/json"]["schema"]
    names = {ref["$ref"].rsplit("/", 1)[1] for ref in body["items"]["oneOf"]}
    assert names == {"ImageInferenceTask", "GetResponseTask", "ImageUploadTask", "ModelSearchTask",
                     "AuthenticationTask", "PingTask"}
    assert body["maxItems"] == 8
    schemas = doc["components"]["schemas"]
    assert schemas["ImageInferenceTask"]["properties"]["ttl"]["anyOf"][0]["maximum"] == MAX_TTL
    assert {"ImageResult", "ErrorItem", "TaskResponse", "ModelSearchResult"} <= schemas.keys()
    assert {"200", "400", "401", "409", "429", "500", "503"} <= post_v1["responses"].keys()
    assert "/v1/" not in doc["paths"]


def test_openapi_document_is_valid(keyed, tmp_path: Path):
    import schemathesis

    schemathesis.openapi.from_url(keyed.url + "/openapi.json").validate()


def test_every_error_code_in_the_source_is_in_the_closed_set():
    """Metrics label outcomes with error_codes(); a code raised somewhere but missing there would read `other`."""
    import re

    from k5serve.server.protocol.validation import error_codes

    root = Path(__file__).resolve().parent.parent
    pattern = re.compile(r'(?:code=|task_error\(|request_error\(|fail\()\s*"([a-zA-Z]+)"')
    found = {code for folder in ("server", "pipelines") for path in (root / folder).rglob("*.py")
             for code in pattern.findall(path.read_text())}
    assert len(found) > 30, found  # the pattern still finds them
    assert found - error_codes() == set()
