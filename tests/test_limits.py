"""What one client may cost and take: WebSocket sessions belong to their key and to one socket at a time, tasks
in flight are bounded per connection and per key, answers to repeated requests are shared, the resume
buffer is bounded in bytes; and a full disk is named, refused early and survived (a real tmpfs, as root)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import uuid

import httpx
import pytest
from conftest import API_KEY, RunningServer, own_data_dir, task
from rawws import RawClient
from test_http_api import only_error, only_item
from test_ws import Client
from websockets.exceptions import ConnectionClosed

from k5serve.context import ANONYMOUS, RequestContext

CONTEXT = RequestContext(ANONYMOUS, "http")  # what a transport hands a handler

OTHER_KEY = "k5-other-key-abcdefghijklmnopqrstuv"


@pytest.fixture(scope="module")
def srv(start_server):
    return start_server("--api-key", API_KEY, "--api-key", OTHER_KEY, "--max-tasks-per-connection", "4",
                        "--max-tasks-per-key", "6", "--poll-wait", "10")


def closed_with(client: Client, timeout: float = 10) -> tuple[int, str]:
    """Read until the server closes the socket -> (close code, reason)."""
    deadline = time.monotonic() + timeout
    with pytest.raises(ConnectionClosed) as closed:
        while time.monotonic() < deadline:
            client.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
    return closed.value.rcvd.code, closed.value.rcvd.reason


# --- sessions ---------------------------------------------------------------------------------------------


def test_a_second_socket_takes_a_live_session_over_and_the_first_is_told(srv):
    first = Client(srv)
    session = first.auth()
    running = task(steps=30)
    first.send(running)
    second = Client(srv)
    try:
        assert second.auth(session=session) == session
        code, reason = closed_with(first)
        assert code == 4001 and "resumed on another connection" in reason  # not silence
        frame = second.until(running["taskUUID"], timeout=300)  # the session's results follow it
        assert frame["data"][0]["taskUUID"] == running["taskUUID"]
        second.send({"taskType": "ping"})
        assert second.recv(10) == {"data": [{"taskType": "ping", "pong": True}]}
    finally:
        second.close()


def test_a_take_over_does_not_wait_for_a_socket_that_stopped_reading(srv):
    big = task(outputType="base64Data", outputFormat="PNG")
    only_item(srv.post([big], headers={"Authorization": f"Bearer {API_KEY}"}))
    stuck = RawClient(srv.url)  # reads its authentication answer, then nothing more
    stuck.send([{"taskType": "authentication", "apiKey": API_KEY}])
    session = stuck.read_frame()["data"][0]["connectionSessionUUID"]
    try:
        stuck.send([{"taskType": "getResponse", "taskUUID": big["taskUUID"]} for _ in range(3)])
        time.sleep(2)  # the server is now stuck sending megabytes nobody reads
        fresh = Client(srv)
        started = time.monotonic()
        assert fresh.auth(session=session) == session
        assert time.monotonic() - started < 10  # not the 30 s a send may wait
        frame = fresh.until(big["taskUUID"], timeout=60)  # what the stuck socket could not take comes here
        assert frame["data"][0]["imageBase64Data"]
        fresh.close()
    finally:
        stuck.close()


def test_a_session_belongs_to_the_key_that_opened_it(srv):
    mine = Client(srv)
    session = mine.auth()
    other = Client(srv)
    try:
        assert other.auth(key=OTHER_KEY, session=session) != session  # a session of its own
        mine.send({"taskType": "ping"})
        assert mine.recv(10) == {"data": [{"taskType": "ping", "pong": True}]}  # the owner keeps its socket
    finally:
        mine.close()
        other.close()


# --- bounded work ------------------------------------------------------------------------------------------


def running_task(srv) -> str:
    """A long async task, queued or running: a getResponse for it stays in flight for --poll-wait seconds."""
    t = task(deliveryMethod="async", steps=50, numberResults=4)
    only_item(srv.post([t], headers={"Authorization": f"Bearer {API_KEY}"}))
    return t["taskUUID"]


def test_tasks_in_flight_on_one_connection_are_bounded(srv):
    target = running_task(srv)
    c = Client(srv)
    try:
        c.auth()
        c.send(*[{"taskType": "getResponse", "taskUUID": target} for _ in range(6)])
        started = time.monotonic()
        refused = [c.recv(5) for _ in range(2)]  # at once, while the 4 admitted wait for the task
        assert time.monotonic() - started < 3
        for frame in refused:
            [err] = frame["errors"]
            assert err["code"] == "rateLimitExceeded" and err["taskUUID"] == target and err["retryAfter"] >= 1
            assert "--max-tasks-per-connection" in err["message"]
        answers = [c.recv(30) for _ in range(4)]  # the admitted ones answer when --poll-wait (or the task) ends
        assert all(f["data"][-1]["taskUUID"] == target for f in answers)
        c.send({"taskType": "getResponse", "taskUUID": target})  # room again
        assert c.recv(30)["data"][-1]["taskUUID"] == target
    finally:
        c.close()


def test_tasks_in_flight_per_key_are_bounded_over_every_connection(srv):
    target = running_task(srv)
    one, two = Client(srv), Client(srv)
    try:
        one.auth()
        two.auth()
        one.send(*[{"taskType": "getResponse", "taskUUID": target} for _ in range(4)])
        two.send(*[{"taskType": "getResponse", "taskUUID": target} for _ in range(2)])
        time.sleep(1)  # (6 in flight for this key until --poll-wait ends, 10 s; the task takes longer)
        poll = [{"taskType": "getResponse", "taskUUID": target}]
        refused = srv.post(poll, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        err = only_error(refused, 429)
        assert err["code"] == "rateLimitExceeded" and "--max-tasks-per-key" in err["message"]
        assert refused.headers["Retry-After"] == "5"
        other = srv.post(poll, headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=30)
        assert other.status_code == 200  # another key is not held up
    finally:
        one.close()
        two.close()


def test_repeated_get_response_shares_one_answer_and_one_frame(tmp_path):
    from k5serve.server.protocol.wire import data_frame
    from k5serve.server.store.task_records import SQLiteTaskStore, TaskRecord
    from k5serve.server.tasks.get_response import GetResponse

    class Counted(SQLiteTaskStore):  # the real store, its reads counted
        reads = 0

        def get(self, task_uuid):
            Counted.reads += 1
            return super().get(task_uuid)

    store = Counted(tmp_path / "tasks.sqlite3")
    task_uuid = str(uuid.uuid4())
    big = {"taskType": "imageInference", "taskUUID": task_uuid, "imageBase64Data": "A" * 3_000_000}
    store.create(TaskRecord(task_uuid, "imageInference", created_at=time.time(), expires_at=time.time() + 60))
    store.update(task_uuid, status="success", items=[big])
    handler = GetResponse(store, poll_wait=0)
    raw = {"taskType": "getResponse", "taskUUID": task_uuid}

    async def many():
        return await asyncio.gather(*(handler(raw, CONTEXT) for _ in range(50)))

    answers = asyncio.run(many())
    assert all(a is answers[0] for a in answers) and Counted.reads == 1  # one read, one answer for all in flight
    later = asyncio.run(handler(raw, CONTEXT))
    assert later is answers[0] and Counted.reads == 1  # and for every request while it is held
    assert data_frame(later[0]) is data_frame(answers[0][0])  # encoded once
    assert later[0]["status"] == "success" and later[0]["imageBase64Data"] == big["imageBase64Data"]
    store.close()


def test_the_resume_buffer_is_bounded_in_bytes_oldest_first():
    from k5serve.server.transport.sessions import Session, Sessions

    drops: list[tuple[str, int]] = []
    sessions = Sessions(60, 100, max_bytes=1000, max_total_bytes=1500, on_drop=lambda r, n: drops.append((r, n)))
    a, b = Session("a", "x", sessions), Session("b", "x", sessions)
    sessions._by_uuid.update(a=a, b=b)
    for i in range(5):
        sessions.keep(a, f"{i}" * 300)  # 1500 bytes for a: its two oldest go
    assert [text[0] for _, text in a.buffer] == ["2", "3", "4"] and drops == [("session", 1), ("session", 1)]
    sessions.keep(b, "b" * 700)  # 1600 in all: the oldest of all (a's) goes first
    assert [text[0] for _, text in a.buffer] == ["3", "4"] and sessions.buffered_bytes == 1300
    assert drops[-1] == ("total", 1)
    assert sessions.drain(a) == ["3" * 300, "4" * 300] and sessions.buffered_bytes == 700


# --- a full disk -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory):
    """A 40 MiB tmpfs (mounting needs root; otherwise the tests are skipped)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    where = tmp_path_factory.mktemp("small-disk")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(where)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(where, leave: int) -> None:
    """Write a filler file until `leave` bytes are free (or fewer)."""
    free = shutil.disk_usage(where).free
    with open(where / "filler", "ab") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_full_disk_is_named_refused_early_and_survived(small_disk, tmp_path_factory, data_dir):
    own = own_data_dir(tmp_path_factory, data_dir, "full-disk")
    on_disk = small_disk / "data"
    shutil.copytree(own, on_disk)
    srv = RunningServer(on_disk, "--min-free-disk", str(8 * 2**20), "--poll-wait", "0")
    try:
        before = only_item(srv.post([task(outputFormat="JPG")]))
        fill(small_disk, 4 * 2**20)
        deadline = time.monotonic() + 10  # the probes look once a second
        while httpx.get(srv.url + "/ready").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        ready = httpx.get(srv.url + "/ready")
        assert ready.status_code == 503 and any("below --min-free-disk" in r for r in ready.json()["reasons"])
        assert httpx.get(srv.url + "/health").status_code == 200
        started = time.monotonic()
        err = only_error(srv.post([task()]), 503)
        assert err["code"] == "storageFull" and "low on disk space" in err["message"]
        assert time.monotonic() - started < 2  # refused before generating
        upload = {"taskType": "imageUpload", "taskUUID": str(uuid.uuid4()), "image": before["imageURL"]}
        assert only_error(srv.post([upload]), 503)["code"] == "storageFull"
        assert httpx.get(before["imageURL"]).status_code == 200  # earlier results survive

        (small_disk / "filler").unlink()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(srv.url + "/ready").status_code == 200
        only_item(srv.post([task(outputFormat="JPG")]))
    finally:
        srv.stop()
        (small_disk / "filler").unlink(missing_ok=True)


def test_a_write_that_fails_for_lack_of_space_is_storage_full_not_500(small_disk, tmp_path_factory, data_dir):
    own = own_data_dir(tmp_path_factory, data_dir, "no-space")
    images = small_disk / "images"
    srv = RunningServer(own, "--image-store", str(images), "--min-free-disk", "0", "--poll-wait", "0")
    try:
        fill(small_disk, 0)
        t = task(outputFormat="PNG")
        err = only_error(srv.post([t]), 503)
        assert err["code"] == "storageFull" and "disk is full" in err["message"] and err["taskUUID"] == t["taskUUID"]
        [recorded] = srv.post([{"taskType": "getResponse", "taskUUID": t["taskUUID"]}]).json()["errors"]
        assert recorded["code"] == "storageFull"  # recorded, not left running
        assert not [p for p in images.iterdir()]  # nothing half-written
        (small_disk / "filler").unlink()
        only_item(srv.post([task(outputFormat="PNG")]))
    finally:
        srv.stop()
        (small_disk / "filler").unlink(missing_ok=True)
