"""Hostile input for the fuzz tests and `benchmarks/fuzz_server.py`: hypothesis strategies for task arrays
and raw bodies, and the checks every answer must pass, over HTTP and WebSocket.

Tasks start from valid ones and have fields replaced by hostile values (wrong types, huge and negative
numbers, lone surrogates, long strings, nesting), or are arbitrary JSON; raw bodies are bytes the JSON
parser refuses for every reason it has. Valid imageInference tasks are async, 10 steps, one image, so a
generated case that happens to be valid costs seconds of CPU, not minutes.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from typing import Any

import httpx
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

MODEL = "runware:kandinsky-5.0-image-lite@1"
ONE_PIXEL_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC")

# 5xx answers the server documents: a generation that failed, a server loading or shutting down. An
# internalServerError (a bug) is never acceptable, whatever the status of the answer it is in.
DOCUMENTED_5XX = {500: {"inferenceError"}, 503: {"modelNotReady", "serviceUnavailable"}}
NEVER = {"internalServerError"}
BODY_ERRORS = {"invalidJSON", "invalidRequestBody", "maxTasksExceeded", "payloadTooLarge", "invalidApiKey"}

FIELDS = [
    "taskType", "taskUUID", "model", "positivePrompt", "negativePrompt", "width", "height", "seed", "steps",
    "scheduler", "CFGScale", "numberResults", "outputType", "outputFormat", "outputQuality", "includeCost", "ttl",
    "deliveryMethod", "webhookURL", "uploadEndpoint", "lora", "acceleratorOptions", "safety", "checkNSFW",
    "seedImage", "strength", "referenceImages", "maskImage", "inputs", "image", "search", "limit", "offset",
    "apiKey", "connectionSessionUUID",
]

surrogates = st.sampled_from(["\ud800", "x\udfff", "\udc00abc", "ok\ud83d"])  # lone halves, not pairs
strings = st.one_of(
    st.text(max_size=40),
    surrogates,
    st.sampled_from(["", " ", "null", "URL", "JPG", "Euler", "fast", "async", MODEL, "http://127.0.0.1/x",
                     "data:image/png;base64,AAAA", f"data:image/png;base64,{ONE_PIXEL_PNG}", "../../etc/passwd",
                     "imageInference", "getResponse", "authentication", "ping", "a" * 5000]),
)
numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(min_value=2**63 - 2, max_value=2**63 + 2),
    st.sampled_from([0, -1, 1, 10, 50, 51, 60, 1024, 2**31, 2**64, 10**300, 2592000, 2592001]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 0.5, 1e-320]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, strings)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner,
                                            max_size=4)),
    max_leaves=12,
)


def image_inference(**fields: Any) -> dict[str, Any]:
    base = {"taskType": "imageInference", "taskUUID": str(uuid.uuid4()), "model": MODEL,
            "positivePrompt": "a red fox in the snow", "width": 1024, "height": 1024, "steps": 10,
            "deliveryMethod": "async", "seed": 1}
    return base | fields


@st.composite
def valid_tasks(draw) -> dict[str, Any]:
    task_uuid = str(draw(st.uuids(version=4)))
    kind = draw(st.sampled_from(["imageInference", "getResponse", "imageUpload", "modelSearch", "ping"]))
    if kind == "imageInference":
        return image_inference(taskUUID=task_uuid)
    if kind == "getResponse":
        return {"taskType": kind, "taskUUID": task_uuid}
    if kind == "imageUpload":
        return {"taskType": kind, "taskUUID": task_uuid, "image": f"data:image/png;base64,{ONE_PIXEL_PNG}"}
    if kind == "modelSearch":
        return {"taskType": kind, "taskUUID": task_uuid, "search": "kandinsky"}
    return {"taskType": "ping", "ping": True}


@st.composite
def mutated_tasks(draw) -> dict[str, Any]:
    task = draw(valid_tasks())
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS))
        if field in ("taskUUID", "deliveryMethod") and draw(st.booleans()):
            continue  # keep most tasks addressable and async
        if draw(st.integers(0, 5)) == 0:
            task.pop(field, None)
        else:
            task[field] = draw(json_values)
    return task


tasks = st.one_of(mutated_tasks(), mutated_tasks(), valid_tasks(), json_values)
task_arrays = st.one_of(st.lists(tasks, min_size=1, max_size=4), st.lists(tasks, max_size=0), json_values)


def dumps(value: Any) -> bytes:
    """JSON as a client would send it; lone surrogates go out as \\udXXX escapes, which is valid JSON."""
    return json.dumps(value, ensure_ascii=True).encode()


raw_bodies = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([
        b"", b" ", b"[", b"]", b"{}", b"null", b"[]", b"[null]", b"[1]", b"NaN", b"[NaN]", b"[Infinity]",
        b"[-Infinity]", b"[1e99999]", b"[" + b"9" * 5000 + b"]", b"[" * 2000 + b"]" * 2000, b"[" * 40 + b"]" * 40,
        b'[{"taskType":"ping"}', b'[{"taskType":"ping"}]]', b"\xef\xbb\xbf[]", b'["\\ud800"]',
        b'[{"taskType":"x\\ud800","taskUUID":"61b9c2db-3e0a-4a66-9e8b-28b77f48e885"}]',
        b'[{"taskType":"getResponse","taskUUID":"\\ud800"}]', "[\"\u00e9\"]".encode("latin-1"),
        b'[{"taskType":"ping"}]\x00', b'{"taskType":"ping"}', dumps([{"taskType": "ping"}] * 101),
    ]),
    task_arrays.map(lambda v: dumps(v)[: max(1, len(dumps(v)) // 2)]),  # truncated JSON
)


def addressable(task: Any) -> str | None:
    """The taskUUID an answer must carry for this task: a well-formed one, on a task that has one to echo."""
    if not isinstance(task, dict) or task.get("taskType") in ("ping", "authentication"):
        return None
    value = task.get("taskUUID")
    if not isinstance(value, str) or not isinstance(task.get("taskType"), str):
        return None
    try:
        uuid.UUID(value)
    except ValueError:
        return None
    return value


def check_answer(status: int, body: bytes) -> dict[str, Any]:
    """What every HTTP answer of POST /v1 must be; returns the parsed body."""
    text = body.decode("utf-8")  # strict: valid UTF-8
    answer = json.loads(text)
    assert isinstance(answer, dict) and ({"data", "errors"} & answer.keys()), answer
    errors = answer.get("errors", [])
    check_frame(answer)
    if status >= 500:
        allowed = DOCUMENTED_5XX.get(status, set())
        assert errors and all(e["code"] in allowed for e in errors), (status, answer)
    return answer


def uuids_in(answer: dict[str, Any]) -> set[str]:
    return {item.get("taskUUID") for item in answer.get("data", []) + answer.get("errors", [])} - {None}


def check_tasks_answered(sent: Any, answer: dict[str, Any]) -> None:
    """Every addressable task got an item or an error carrying its taskUUID, unless the body as a whole was
    refused (bad JSON, not an array, too many tasks, no key)."""
    if any(e.get("code") in BODY_ERRORS and "taskUUID" not in e for e in answer.get("errors", [])):
        return
    if not isinstance(sent, list):
        return
    expected = {u for u in map(addressable, sent) if u is not None}
    missing = expected - uuids_in(answer)
    assert not missing, (missing, answer)


# -- clients and cases, shared by the suite and benchmarks/fuzz_server.py -----------------------------------


class Http:
    """One keep-alive connection, kept across cases: a case that makes the server drop it fails."""

    def __init__(self, host: str, port: int, key: str | None):
        self.conn = http.client.HTTPConnection(host, port, timeout=120)
        self.key = key
        self.sock = None

    def post(self, body: bytes, key: str | None | bool = True) -> tuple[int, bytes]:
        key = self.key if key is True else key
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
        self.conn.request("POST", "/v1", body=body, headers=headers)
        response = self.conn.getresponse()
        data = response.read()
        assert response.getheader("connection", "").lower() != "close", (response.status, data[:300])
        if self.sock is None:
            self.sock = self.conn.sock
        assert self.conn.sock is self.sock, "the server dropped the keep-alive connection"
        return response.status, data

    def close(self) -> None:
        self.conn.close()


class Socket:
    """One authenticated WebSocket connection with no message size limit."""

    def __init__(self, ws_url: str, key: str | None):
        self.ws = connect(ws_url, max_size=None, open_timeout=10).__enter__()
        self.ws.send(json.dumps([{"taskType": "authentication", "apiKey": key}]))
        assert "connectionSessionUUID" in json.loads(self.ws.recv(timeout=10))["data"][0]

    def answers(self, expected: set[str], frames_at_least: int, timeout: float = 60) -> list[dict]:
        """Frames until every expected taskUUID was answered and at least `frames_at_least` arrived."""
        got: list[dict] = []
        seen: set[str] = set()
        deadline = time.monotonic() + timeout
        while not expected <= seen or len(got) < frames_at_least:
            frame = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            got.append(frame)
            seen |= uuids_in(frame)
        return got

    def still_open(self) -> None:
        self.ws.send('[{"taskType":"ping"}]')
        deadline = time.monotonic() + 30
        while True:  # late frames of earlier cases may come first
            frame = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if frame.get("data") == [{"taskType": "ping", "pong": True}]:
                return

    def close(self) -> None:
        self.ws.close()


def http_tasks(client: Http, tasks: Any, key: str | None | bool = True) -> int:
    status, body = client.post(dumps(tasks), key=key)
    answer = check_answer(status, body)
    if key is None:  # no key: 401, unless the body was refused as a whole before the key was looked at
        assert status == 401 and answer["errors"][0]["code"] == "invalidApiKey" or status == 400, answer
    else:
        check_tasks_answered(tasks, answer)
    return status


def http_raw(client: Http, body: bytes) -> int:
    status, data = client.post(body)
    check_answer(status, data)
    assert status < 500, status
    return status


def ws_tasks(socket: Socket, tasks: Any) -> int:
    """Returns the number of frames the answer took."""
    socket.ws.send(dumps(tasks).decode())
    as_list = [tasks] if isinstance(tasks, dict) else tasks
    per_task = isinstance(as_list, list) and 0 < len(as_list) <= 100
    expected = {u for u in map(addressable, as_list) if u} if per_task else set()
    frames = socket.answers(expected, len(as_list) if per_task else 1)
    for frame in frames:
        check_frame(frame)
    socket.still_open()
    return len(frames)


def ws_raw(socket: Socket, body: bytes) -> int:
    socket.still_open()  # late frames of earlier cases are read first, so the next frame answers this one
    try:
        socket.ws.send(body.decode("utf-8"))
    except UnicodeDecodeError:
        socket.ws.send(body)  # a binary frame
    [frame] = socket.answers(set(), 1)
    check_frame(frame)
    socket.still_open()
    return 1


def check_frame(frame: dict[str, Any]) -> None:
    """What every answer (HTTP body or WebSocket frame) must be."""
    assert isinstance(frame, dict) and {"data", "errors"} & frame.keys(), frame
    for error in frame.get("errors", []):
        assert isinstance(error.get("code"), str) and isinstance(error.get("message"), str), error
        assert error["code"] not in NEVER, error
        assert "httpStatus" not in error, error


def check_still_fine(base_url: str) -> None:
    """/health alive, /ready back to 200 once generated tasks drained, /metrics parseable."""
    health = httpx.get(base_url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    deadline = time.monotonic() + 300  # generated tasks that were valid may still fill the queue
    while (ready := httpx.get(base_url + "/ready", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline and ready.json()["reasons"][0].startswith("the queue is full"), ready.text
        time.sleep(1)
    metrics = httpx.get(base_url + "/metrics", timeout=30)
    assert metrics.status_code == 200
    assert any(f.name == "k5serve_tasks" for f in text_string_to_metric_families(metrics.text))
