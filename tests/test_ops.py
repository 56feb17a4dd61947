"""Operations: the safety check (flag and block), /health and /ready, Prometheus metrics, JSON logs,
an injected out-of-memory failure, offload flags. Real servers (uvicorn on loopback) on tiny weights; the
tiny safety classifier is a randomly initialised ViT loaded by the same code as the real one, so tests
pick the outcome with --safety-threshold (0 flags every image, 1 none in practice)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from conftest import API_KEY, task
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_cli import k5serve
from test_delivery import Receiver
from test_http_api import only_error, only_item
from test_ws import Client

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def metrics(server) -> dict[tuple, float]:
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def flagging(start_server):
    """Flags every image (threshold 0), takes webhooks to loopback, fails prompts containing BOOM with OOM."""
    return start_server("--api-key", API_KEY, "--safety-threshold", "0", "--allow-private-urls",
                        "--inject-oom-prompt", "BOOM")


@pytest.fixture(scope="module")
def blocking(start_server):
    return start_server("--safety-threshold", "0", "--safety-action", "block")


# --- safety -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields,expected", [
    ({"safety": {"checkContent": True}}, True),
    ({"safety": {"mode": "fast"}}, True),
    ({"checkNSFW": True}, True),
    ({"safety": {"checkContent": True, "mode": "none"}}, None),  # mode wins
    ({"safety": {"checkContent": False}}, None),
    ({}, None),
])
def test_nsfw_flag_only_when_asked(flagging, fields, expected):
    resp = flagging.post([task(numberResults=2, **fields)], headers=HEADERS)
    assert resp.status_code == 200, resp.text
    items = resp.json()["data"]
    assert len(items) == 2
    assert [i.get("NSFWContent") for i in items] == [expected, expected]


def test_checking_inputs_is_refused_not_ignored(flagging):
    err = only_error(flagging.post([task(safety={"checkContent": True, "checkInputs": True})], headers=HEADERS))
    assert (err["code"], err["parameter"]) == ("unsupportedCheckInputs", "safety.checkInputs")


def test_nsfw_flag_over_websocket(flagging):
    client = Client(flagging)
    try:
        client.auth()
        t = task(safety={"checkContent": True})
        client.send(t)
        [item] = client.until(t["taskUUID"])["data"]
        assert item["NSFWContent"] is True
    finally:
        client.close()


def test_default_threshold_gives_a_boolean(server):
    item = only_item(server.post([task(safety={"checkContent": True})]))
    assert isinstance(item["NSFWContent"], bool)


def test_block_mode_fails_only_the_flagged_task(blocking):
    checked, plain = task(safety={"checkContent": True}), task()
    resp = blocking.post([checked, plain])
    assert resp.status_code == 200
    body = resp.json()
    [err] = body["errors"]
    assert err["code"] == "nsfwContentDetected" and err["taskUUID"] == checked["taskUUID"]
    assert err["parameter"] == "safety" and "1 of 1" in err["message"]
    assert [i["taskUUID"] for i in body["data"]] == [plain["taskUUID"]] and "NSFWContent" not in body["data"][0]
    client = Client(blocking)
    try:
        client.auth()
        t = task(checkNSFW=True)
        client.send(t)
        [err] = client.until(t["taskUUID"])["errors"]
        assert err["code"] == "nsfwContentDetected"
    finally:
        client.close()


def test_safety_refused_without_a_classifier(start_server):
    srv = start_server("--safety-model", "none")
    err = only_error(srv.post([task(safety={"checkContent": True})]))
    assert err["code"] == "unsupportedSafety" and err["parameter"] == "safety" and "not available" in err["message"]
    assert httpx.get(srv.url + "/ready").json()["safety_model"] is None


def test_classifier_scores_and_labels(data_dir, tmp_path):
    import torch
    from k5serve.pipelines.safety import SafetyChecker
    from k5serve.weights.tiny import ensure_tiny
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    checker = SafetyChecker(ensure_tiny(data_dir / "tiny", "safety"), torch.device("cpu"), threshold=0.5)
    images = [Image.new("RGB", (64, 48), c) for c in ((0, 0, 0), (255, 200, 10), (30, 90, 250))]
    scores = checker.scores(images)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 for s in scores) and len(set(scores)) > 1
    assert checker.scores(images) == scores  # deterministic
    assert checker.flags([0.2, 0.5, 0.9]) == [False, True, True]
    # A classifier without an unsafe label is refused at load, not silently useless.
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64, num_labels=2,
                                        id2label={0: "cat", 1: "dog"})).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no unsafe class"):
        SafetyChecker(tmp_path, torch.device("cpu"))


# --- health, readiness ----------------------------------------------------------------------------------------


class InProcessServer:
    """The real app under uvicorn on a loopback port, with a model loader the test controls."""

    def __init__(self, data_dir, tmp_path, load, max_queue: int = 64, known: dict | None = None):
        from k5serve.server.app import create_app
        from k5serve.server.config import ServerConfig
        from k5serve.server.tasks.slot import ModelSlot

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(ServerConfig(data_dir=tmp_path), ModelSlot(load, known=known))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def tiny_worker(data_dir, max_queue=64):
    from k5serve.pipelines.engine import K5Engine
    from k5serve.pipelines.loader import LoadConfig, load_t2i
    from k5serve.pipelines.local import LocalWorker
    from k5serve.weights.tiny import ensure_tiny

    pipe, info = load_t2i(LoadConfig(ensure_tiny(data_dir / "tiny"), "cpu"))
    return LocalWorker(K5Engine(pipe), max_queue=max_queue, info=info)


def test_readiness_follows_loading_and_the_queue(data_dir, tmp_path):
    release = threading.Event()

    def load():
        release.wait(60)
        return tiny_worker(data_dir, max_queue=1)

    srv = InProcessServer(data_dir, tmp_path, load, known={"tiny_weights": True})
    try:
        health, ready = httpx.get(srv.url + "/health"), httpx.get(srv.url + "/ready")
        assert health.status_code == 200 and health.json()["model"] == "loading"
        assert ready.status_code == 503 and ready.json()["reasons"] == ["the model is still loading"]
        assert ready.json()["tiny_weights"] is True  # known before loading: the playground's notice needs it
        # What the model will serve is not known yet: a LoRA request is told to retry, not refused.
        loading = only_error(httpx.post(srv.url + "/v1", json=[task(lora=[{"model": "a:1@1", "weight": 1}])]), 503)
        assert loading["code"] == "modelNotReady"
        assert only_error(httpx.post(srv.url + "/v1", json=[task(steps=5)]), 400)["code"] == "invalidSteps"
        with pytest.raises(openai.InternalServerError) as exc:  # the OpenAI Images API: the same, in its shape
            openai.OpenAI(base_url=srv.url + "/v1", api_key="any", max_retries=0).images.generate(prompt="a fox")
        assert exc.value.status_code == 503 and exc.value.body["code"] == "modelNotReady"
        assert value(metrics(srv), "k5serve_ready") == 0
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        body = httpx.get(srv.url + "/ready").json()
        assert body["ready"] is True and body["model"] == "loaded" and body["queueLimit"] == 1
        # One task running and one waiting fill a queue of one: not ready, and a third is refused.
        slow = [task(steps=40, deliveryMethod="async") for _ in range(2)]
        for t in slow:
            assert httpx.post(srv.url + "/v1", json=[t]).status_code == 200
        time.sleep(0.5)
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and "queue is full" in ready.json()["reasons"][0]
        assert only_error(httpx.post(srv.url + "/v1", json=[task()]), 429)["code"] == "rateLimitExceeded"
        assert value(metrics(srv), "k5serve_queue_depth") == 2
        deadline = time.monotonic() + 120
        while httpx.get(srv.url + "/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(srv.url + "/ready").status_code == 200
    finally:
        release.set()
        srv.stop()


def test_a_failed_load_is_reported(data_dir, tmp_path):
    def load():
        raise RuntimeError("no GPU in this test")

    srv = InProcessServer(data_dir, tmp_path, load)
    try:
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        health, ready = httpx.get(srv.url + "/health"), httpx.get(srv.url + "/ready")
        assert health.status_code == 503 and health.json()["model"] == "error"
        assert ready.status_code == 503 and "no GPU in this test" in ready.json()["reasons"][0]
    finally:
        srv.stop()


# --- failures ---------------------------------------------------------------------------------------------------


def test_out_of_memory_fails_its_task_and_the_server_stays_ready(flagging):
    boom, fine = task(positivePrompt="BOOM goes the GPU"), task()
    resp = flagging.post([boom, fine], headers=HEADERS)
    body = resp.json()
    [err] = body["errors"]
    assert err["code"] == "inferenceError" and err["taskUUID"] == boom["taskUUID"]
    assert "out of memory" in err["message"]
    assert [i["taskUUID"] for i in body["data"]] == [fine["taskUUID"]]
    assert httpx.get(flagging.url + "/ready").status_code == 200
    only_item(flagging.post([task()], headers=HEADERS))
    lines = [json.loads(line) for line in flagging.log().splitlines() if line.startswith("{")]
    assert any(e.get("taskUUID") == boom["taskUUID"] and "out of accelerator memory" in e["message"] for e in lines)
    assert any(e.get("taskUUID") == boom["taskUUID"] and e["message"].endswith("worker local") for e in lines)
    assert value(metrics(flagging), "k5serve_generations_total", outcome="error", replica="local") >= 1


def test_offload_needs_cuda(tmp_path, data_dir):
    res = k5serve("generate", "--tiny", "--data-dir", str(data_dir), "--prompt", "a cat", "--offload", "model",
                  "--out", str(tmp_path / "o"))
    assert res.returncode != 0 and "needs a CUDA device" in res.stderr and "Traceback" not in res.stderr


# --- metrics and logs ---------------------------------------------------------------------------------------


def test_metrics_move_when_tasks_run(flagging):
    before = metrics(flagging)
    receiver = Receiver(failures=1)
    client = Client(flagging)
    try:
        client.auth()
        during = metrics(flagging)
        assert value(during, "k5serve_websocket_connections") >= 1
        t = task(numberResults=2, safety={"checkContent": True}, webhookURL=receiver.url + "/hook")
        only_item_count = len(flagging.post([t], headers=HEADERS).json()["data"])
        assert only_item_count == 2
        flagging.post([task(width=7)], headers=HEADERS)
        assert len(receiver.wait_for(2)) == 2
        time.sleep(0.5)
    finally:
        client.close()
        receiver.close()
    after = metrics(flagging)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("k5serve_tasks_total", type="imageInference", outcome="success") == 1
    assert moved("k5serve_tasks_total", type="imageInference", outcome="invalidWidth") == 1
    assert moved("k5serve_http_requests_total", route="/v1", status="200") == 1
    assert moved("k5serve_http_requests_total", route="/v1", status="400") == 1
    assert moved("k5serve_generations_total", outcome="success", replica="local") == 1
    assert moved("k5serve_images_total") == 2 and moved("k5serve_images_flagged_nsfw_total") == 2
    assert moved("k5serve_step_seconds_count") == 10
    assert moved("k5serve_generation_seconds_count", replica="local") == 1
    assert moved("k5serve_queue_wait_seconds_count") == 1
    assert moved("k5serve_transformer_passes_total", cache="none", branch="cond", outcome="computed") == 10
    assert moved("k5serve_outbound_deliveries_total", kind="webhook", outcome="delivered") == 2
    assert moved("k5serve_outbound_deliveries_total", kind="webhook", outcome="retried") >= 1
    assert moved("k5serve_websocket_connections_opened_total") == 1
    assert value(after, "k5serve_ready") == 1 and value(after, "k5serve_queue_limit") == 64
    retry = [json.loads(line) for line in flagging.log().splitlines() if "outbox: webhook" in line and "retry" in line]
    assert retry and retry[-1].get("taskUUID") == t["taskUUID"]  # delivery lines name their task too
    assert ("k5serve_gpu_memory_bytes", (("kind", "allocated"),)) not in after  # CPU: no GPU series


def test_logs_are_json_with_task_ids_and_never_the_key(flagging):
    t = task()
    only_item(flagging.post([t], headers=HEADERS))
    httpx.post(flagging.url + "/v1?apiKey=" + API_KEY, json=[task()], headers={"Authorization": "Bearer wrong-key"})
    client = Client(flagging)
    try:
        client.auth(key="another-wrong-key-but-long-enough")
    except Exception:  # noqa: BLE001 - the server answers with an error frame; auth() then fails
        pass
    finally:
        client.close()
    time.sleep(0.3)
    log = flagging.log()
    assert API_KEY not in log
    entries = []
    for line in log.splitlines():
        if line.strip() and not line.startswith(("=", " ", "\x1b")):  # the CPU-mode banner is plain text
            entries.append(json.loads(line))
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    about = [e for e in entries if t["taskUUID"] in e["message"]]
    assert about and all(e.get("taskUUID") == t["taskUUID"] for e in about)


def _caller_of(server, task_uuid: str) -> str | None:
    import sqlite3

    with sqlite3.connect(server.data_dir / "tasks.sqlite3") as db:
        return db.execute("SELECT caller FROM tasks WHERE task_uuid = ?", (task_uuid,)).fetchone()[0]


def test_the_request_context_reaches_the_record_and_the_log_lines(flagging):
    """Each transport builds who called, how and under which request id once; the task record keeps the caller
    (never the key) and every log line about the task, those logged on the worker's thread included, carries
    caller and request id (a W3C traceparent's trace id when the client sent one)."""
    import hashlib

    from websockets.sync.client import connect

    caller = "key-" + hashlib.sha256(API_KEY.encode()).hexdigest()[:16]
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    over_http, boom = task(), task(positivePrompt="BOOM on the worker's thread")
    flagging.post([over_http, boom], headers=HEADERS | {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    over_ws = task()
    with connect(flagging.url.replace("http", "ws") + "/v1", max_size=None, open_timeout=10) as ws:
        ws.send(json.dumps([{"taskType": "authentication", "apiKey": API_KEY}]))
        json.loads(ws.recv(timeout=10))
        ws.send(json.dumps([over_ws]))
        frame = json.loads(ws.recv(timeout=120))
        assert frame["data"][0]["taskUUID"] == over_ws["taskUUID"], frame
    assert _caller_of(flagging, over_http["taskUUID"]) == _caller_of(flagging, over_ws["taskUUID"]) == caller
    assert _caller_of(flagging, boom["taskUUID"]) == caller

    entries = [json.loads(line) for line in flagging.log().splitlines() if line.startswith("{")]
    about = {t["taskUUID"]: [e for e in entries if e.get("taskUUID") == t["taskUUID"]]
             for t in (over_http, boom, over_ws)}
    assert all(about.values())
    assert any(e["logger"] == "k5serve.worker" for e in about[boom["taskUUID"]])  # logged on the worker's thread
    for lines in (about[over_http["taskUUID"]], about[boom["taskUUID"]]):
        assert {(e.get("caller"), e.get("requestId"), e.get("transport")) for e in lines} == {(caller, trace, "http")}
    assert {(e.get("caller"), e.get("transport")) for e in about[over_ws["taskUUID"]]} == {(caller, "websocket")}
    [ws_request] = {e["requestId"] for e in about[over_ws["taskUUID"]]}
    assert len(ws_request) == 32 and ws_request != trace  # no traceparent: an id of its own
