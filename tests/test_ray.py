"""`--workers ray`: the real server in front of a real local Ray instance with two Ray Serve replicas, each
one engine on tiny weights on its own CPU core. One server (one Ray instance) for the module."""

from __future__ import annotations

import base64
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import API_KEY, RunningServer, own_data_dir, task
from safetensors.torch import save_file
from test_http_api import only_error, only_item
from test_image_inputs import data_uri, encoded
from test_lora import ATTN, peft_lora
from test_sdk import request, run

CRASH = "CRASH-THE-REPLICA"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, data_dir):
    home = own_data_dir(tmp_path_factory, data_dir, "ray")
    (home / "loras").mkdir()
    save_file(peft_lora(ATTN, seed=3), home / "loras" / "style.safetensors")
    srv = RunningServer(home, "--workers", "ray", "--replicas", "2", "--max-queue", "1", "--poll-wait", "0",
                        "--lora-dir", str(home / "loras"), "--inject-crash-prompt", CRASH)
    yield srv
    srv.stop()


def finished(srv, task_uuid: str, timeout: float = 300) -> list[dict]:
    """getResponse until the task is done; -> every answer seen (processing items included)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = srv.post([{"taskType": "getResponse", "taskUUID": task_uuid}]).json()
        seen.append(body)
        if "errors" in body or all(i.get("status") == "success" for i in body["data"]):
            return seen
        time.sleep(0.1)
    raise AssertionError(f"task {task_uuid} did not finish")


def workers_in_log(srv) -> dict[str, str]:
    return dict(re.findall(r'task (\S+) done: .*, worker ([^\s",]+)', srv.log()))


def test_health_describes_the_replicas(ray_server):
    body = httpx.get(ray_server.url + "/health").json()
    assert body["status"] == "ok" and body["workers"] == "ray" and body["replicaTarget"] == 2
    assert body["threads_per_replica"] >= 1 and body["queueLimit"] == 1
    assert body["replicaStates"] == {"RUNNING": 2} and body["deploymentStatus"] == "HEALTHY"
    rows = body["replicas"]  # one row per replica, also before it has run a task
    assert len({r["id"] for r in rows}) == 2 and len({r["pid"] for r in rows}) == 2
    assert all(r["state"] == "RUNNING" and r["device"] == "cpu" and r["threads"] == body["threads_per_replica"]
               and r["nodeId"] and r["tasksDone"] >= 0 for r in rows)
    # each replica planned its memory on its own device; the front-end's plan is the one made before it started
    assert all(r["memoryProfile"] == "full" and r["memoryPeakBytes"] > 0 for r in rows)
    assert body["memory_plan"]["profile"] == "full"
    ready = httpx.get(ray_server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_two_tasks_run_in_parallel_one_per_replica(ray_server):
    results: dict[str, dict] = {}

    def one(t):
        results[t["taskUUID"]] = only_item(ray_server.post([t]))

    tasks = [task(seed=s) for s in (1, 2)]
    threads = [threading.Thread(target=one, args=(t,)) for t in tasks]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert set(results) == {t["taskUUID"] for t in tasks}
    workers = workers_in_log(ray_server)
    assert len({workers[t["taskUUID"]] for t in tasks}) == 2, workers  # both replicas did work
    time.sleep(1.1)  # the replica view is read at most once a second
    rows = {r["id"]: r for r in httpx.get(ray_server.url + "/health").json()["replicas"]}
    assert all(rows[workers[t["taskUUID"]]]["tasksDone"] >= 1 for t in tasks)
    text = httpx.get(ray_server.url + "/metrics").text
    for replica in {workers[t["taskUUID"]] for t in tasks}:  # generation metrics carry the replica id
        assert f'k5serve_generations_total{{outcome="success",replica="{replica}"}}' in text
        assert f'k5serve_generation_seconds_count{{replica="{replica}"}}' in text


def test_async_task_reports_progress_from_the_replica(ray_server):
    t = task(deliveryMethod="async", steps=30)
    assert only_item(ray_server.post([t]))["taskUUID"] == t["taskUUID"]
    seen = finished(ray_server, t["taskUUID"])
    progress = [i["progress"] for body in seen for i in body.get("data", []) if i.get("status") == "processing"]
    assert any(0 < p < 100 for p in progress), progress
    [item] = seen[-1]["data"]
    assert item["status"] == "success" and httpx.get(item["imageURL"]).status_code == 200


def test_a_full_queue_answers_429(ray_server):
    """Two replicas and --max-queue 1: three tasks may be in flight; the fourth is refused, and none runs twice."""
    tasks = [task(deliveryMethod="async", seed=10 + i) for i in range(4)]
    resp = ray_server.post(tasks)
    body = resp.json()
    [err] = body["errors"]
    assert err["code"] == "rateLimitExceeded" and len(body["data"]) == 3
    accepted = [i["taskUUID"] for i in body["data"]]
    for task_uuid in accepted:
        assert "errors" not in finished(ray_server, task_uuid)[-1]
    assert all(ray_server.log().count(f"task {u} done") == 1 for u in accepted)


def test_a_bad_lora_is_refused_before_queueing(ray_server):
    err = only_error(ray_server.post([task(lora=[{"model": "no-such-lora", "weight": 1.0}])]), 400)
    assert err["code"] == "invalidLoraModel" and err["parameter"] == "lora[0].model"


def test_a_replica_that_dies_fails_its_task_only(ray_server):
    crash = task(positivePrompt=f"a fox {CRASH}")
    err = only_error(ray_server.post([crash]), 500)
    assert err["code"] == "inferenceError" and "stopped before it finished" in err["message"]
    failed = re.search(rf'task {crash["taskUUID"]} failed: .*, worker ([^\s",]+)', ray_server.log())
    assert failed and failed.group(1) != "?", ray_server.log()[-2000:]  # the log names the replica that died
    # The other replica (and the one Ray Serve starts in its place) go on serving.
    assert only_item(ray_server.post([task(seed=5)]))["imageUUID"]
    assert httpx.get(ray_server.url + "/health").json()["status"] == "ok"


def test_same_bytes_as_the_local_worker(ray_server, tmp_path_factory, data_dir):
    """Same device type, dtype and CPU thread count (float sums depend on it): the same bytes, for a plain
    request and for each feature the replicas run (LoRA, step caching, editing, image-to-image, safety)."""
    threads = httpx.get(ray_server.url + "/health").json()["threads_per_replica"]
    local_server = RunningServer(own_data_dir(tmp_path_factory, data_dir, "local"), "--lora-dir",
                                 str(ray_server.data_dir / "loras"), env={"OMP_NUM_THREADS": str(threads)})
    picture = data_uri(encoded((300, 200)))
    variants = {
        "plain": {},
        "lora": {"lora": [{"model": "style", "weight": 0.8}]},
        "fbCache": {"acceleratorOptions": {"fbCache": True, "cacheStartStep": 1}},
        "editing": {"inputs": {"referenceImages": [picture]}},
        "image-to-image": {"seedImage": picture, "strength": 0.6},
        "safety": {"safety": {"checkContent": True}},
    }
    try:
        for name, fields in variants.items():
            t = dict(task(seed=77, outputType="base64Data", outputFormat="PNG", steps=10, **fields))
            with ThreadPoolExecutor(2) as both:  # at once: each worker has its own threads
                local, remote = both.map(lambda srv: only_item(srv.post([dict(t, taskUUID=str(uuid.uuid4()))])),
                                         (local_server, ray_server))
            assert base64.b64decode(local.pop("imageBase64Data")) == base64.b64decode(
                remote.pop("imageBase64Data")), name
            for item in (local, remote):
                item.pop("taskUUID")
                item.pop("imageUUID", None)
            assert local == remote, name  # every other result field too (seed, NSFWContent, cost...)
    finally:
        local_server.stop()


def test_the_runware_sdk_over_websocket(tmp_path_factory, data_dir, ray_server):
    """The unmodified SDK against --workers ray (the module's server has no key: pass any)."""
    async def body(rw):
        return await rw.imageInference(requestImage=request(numberResults=2, outputType="URL"))

    images = run(body, ray_server, key=API_KEY)
    assert len(images) == 2 and sorted(i.seed for i in images) == [42, 43]
