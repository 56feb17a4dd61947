"""Webhooks, uploads and durable task records, through the real server."""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from conftest import RunningServer, own_data_dir, task
from ports import free_port


class Receiver:
    """A local HTTP endpoint that fails the first `failures` requests, then records the rest."""

    def __init__(self, failures: int = 1):
        self.failures = failures
        self.attempts = 0
        self.received: list[tuple[str, str, dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.attempts += 1
                if receiver.attempts <= receiver.failures:
                    self.send_response(503)
                    self.end_headers()
                    return
                receiver.received.append((self.command, self.path, dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            do_POST = do_PUT = _handle

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_for(self, count: int, timeout: float = 60) -> list:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.received

    def close(self):
        self.httpd.shutdown()


@pytest.fixture
def receiver():
    r = Receiver(failures=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def private_server(start_server):
    return start_server("--allow-private-urls", "--poll-wait", "10")


def test_sync_request_with_webhook_gets_results_and_one_post_per_image(private_server, receiver):
    t = task(numberResults=2, webhookURL=receiver.url + "/hook?token=abc")
    resp = private_server.post([t])
    assert resp.status_code == 200
    items = resp.json()["data"]
    got = receiver.wait_for(2)
    assert len(got) == 2 and receiver.attempts == 3  # the first attempt failed and was retried
    bodies = sorted((json.loads(body) for _, _, _, body in got), key=lambda b: b["data"][0]["seed"])
    assert [b["data"] for b in bodies] == [[items[0]], [items[1]]]
    assert all(method == "POST" and path == "/hook?token=abc" for method, path, _, _ in got)
    assert all(h["Content-Type"] == "application/json" for _, _, h, _ in got)


def test_async_with_webhook(private_server, receiver):
    t = task(deliveryMethod="async", webhookURL=receiver.url + "/hook")
    resp = private_server.post([t])
    assert resp.json() == {"data": [{"taskType": "imageInference", "taskUUID": t["taskUUID"]}]}
    [(_, _, _, body)] = receiver.wait_for(1)
    [item] = json.loads(body)["data"]
    assert item["taskUUID"] == t["taskUUID"] and item["imageUUID"]


def test_upload_endpoint_gets_raw_image_bytes(private_server, receiver):
    t = task(outputFormat="PNG", uploadEndpoint=receiver.url + "/bucket/out.png?X-Amz-Signature=s")
    [item] = private_server.post([t]).json()["data"]
    [(method, path, headers, body)] = receiver.wait_for(1)
    assert method == "PUT" and path == "/bucket/out.png?X-Amz-Signature=s"
    assert headers["Content-Type"] == "image/png"
    assert body == httpx.get(item["imageURL"]).content


def test_async_over_http_and_get_response(private_server):
    t = task(deliveryMethod="async", numberResults=2)
    assert private_server.post([t]).json()["data"] == [{"taskType": "imageInference", "taskUUID": t["taskUUID"]}]
    items = private_server.post([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]).json()["data"]
    assert [i["status"] for i in items] == ["success", "success"]  # poll-wait 10 s covers the generation
    resp = private_server.post([{"taskType": "getResponse", "taskUUID": str(uuid.uuid4())}])
    assert resp.status_code == 404 and resp.json()["errors"][0]["code"] == "taskFailedOrNotFound"


def test_results_survive_a_restart_and_a_killed_task_is_an_error_after_restart(tmp_path_factory, data_dir):
    """...and its error webhook is sent once by the restarted server (a webhook-only client learns of it)."""
    own = own_data_dir(tmp_path_factory, data_dir, "durable")
    receiver = Receiver(failures=0)
    first = RunningServer(own, "--poll-wait", "1", "--allow-private-urls")
    done = task(deliveryMethod="async")
    first.post([done])
    killed = task(deliveryMethod="async", steps=50, numberResults=20,  # minutes on the CPU
                  webhookURL=receiver.url + "/hook")
    first.post([killed])
    deadline = time.monotonic() + 120
    before = None
    while time.monotonic() < deadline:  # until the first has succeeded and the second is running
        before = before or first.post([{"taskType": "getResponse", "taskUUID": done["taskUUID"]}]).json()["data"][0]
        before = before if before["status"] == "success" else None
        data = first.post([{"taskType": "getResponse", "taskUUID": killed["taskUUID"]}], timeout=60).json()["data"]
        if before and data and data[-1].get("progress", 0) > 0:
            break
    assert before and before["status"] == "success"
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    first.stop()

    second = RunningServer(own, "--poll-wait", "0", "--allow-private-urls")
    try:
        [after] = second.post([{"taskType": "getResponse", "taskUUID": done["taskUUID"]}]).json()["data"]
        assert after == before
        path = after["imageURL"].split("/image/")[1]
        assert httpx.get(f"{second.url}/image/{path}").status_code == 200
        resp = second.post([{"taskType": "getResponse", "taskUUID": killed["taskUUID"]}])
        [err] = resp.json()["errors"]
        assert err["code"] == "inferenceError" and "restarted" in err["message"] and err["status"] == "error"
        assert not list((own / "images").glob(".*.tmp"))
        [(method, path, _, body)] = receiver.wait_for(1)
        hook = json.loads(body)
        assert method == "POST" and path == "/hook" and list(hook) == ["errors"]
        assert hook["errors"][0] == {k: v for k, v in err.items() if k != "status"}  # what getResponse says
        time.sleep(2)
        assert len(receiver.received) == 1  # once
    finally:
        second.stop()
        receiver.close()


def test_sigterm_finishes_tasks_in_flight(tmp_path_factory, data_dir):
    own = own_data_dir(tmp_path_factory, data_dir, "sigterm")
    srv = RunningServer(own, "--poll-wait", "0")
    t = task(deliveryMethod="async", steps=30)
    srv.post([t])
    time.sleep(1)
    srv.proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after a clean shutdown, so the exit status says "terminated by SIGTERM".
    assert srv.proc.wait(120) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in srv.log()
    srv.stop()
    again = RunningServer(own, "--poll-wait", "0")
    try:
        [item] = again.post([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]).json()["data"]
        assert item["status"] == "success"
    finally:
        again.stop()
