"""Tenants (`--tenants FILE`): each key its own name, its own tasks; the file re-read while serving.

One real server on tiny weights with three tenants (web, batch, and ops, an admin), driven over HTTP, a raw
WebSocket and the unmodified runware SDK. The reload test comes last: it changes the tenants."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
import uuid

import httpx
import pytest
from conftest import task
from k5serve.server.tenants import TenantError, Tenants, key_digest, parse_tenants
from test_http_api import only_error, only_item
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

WEB, BATCH, OPS, LATE, CAPPED, METERED = (f"tenant-{n}-key-0123456789abcdef"
                                           for n in ("web", "batch", "ops", "late", "capped", "metered"))


def tenants_toml(*entries: str) -> str:
    return "\n".join(entries)


WEB_T = f'[[tenant]]\nname = "web"\nkey = "{WEB}"\nweight = 2\n'
BATCH_T = f'[[tenant]]\nname = "batch"\nkey_sha256 = "{key_digest(BATCH)}"\n'
OPS_T = f'[[tenant]]\nname = "ops"\nkey = "{OPS}"\nadmin = true\n'
LATE_T = f'[[tenant]]\nname = "late"\nkey = "{LATE}"\n'
CAPPED_T = f'[[tenant]]\nname = "capped"\nkey = "{CAPPED}"\nmax_queued = 1\n'
METERED_T = f'[[tenant]]\nname = "metered"\nkey = "{METERED}"\nmax_per_minute = 2\n'


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    path.write_text(tenants_toml(WEB_T, BATCH_T, OPS_T, CAPPED_T, METERED_T))
    return path


@pytest.fixture(scope="module")
def server(start_server, tenants_file):
    return start_server("--tenants", str(tenants_file))


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def caller_of(server, task_uuid: str) -> str | None:
    with sqlite3.connect(server.data_dir / "tasks.sqlite3") as db:
        return db.execute("SELECT caller FROM tasks WHERE task_uuid = ?", (task_uuid,)).fetchone()[0]


def get_response(server, key: str, task_uuid: str) -> httpx.Response:
    return server.post([{"taskType": "getResponse", "taskUUID": task_uuid}], headers=auth(key))


def finished(server, key: str, task_uuid: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = get_response(server, key, task_uuid).json()
        items = body.get("data", [])
        if items and all(i.get("status") == "success" for i in items):
            return items[0]
    raise AssertionError(f"task {task_uuid} did not finish")


# --- the file -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, says", [
    ('[[tenant]]\nname = "a"\n', "exactly one of key and key_sha256"),
    ('[[tenant]]\nname = "a"\nkey = "k"\nkey_sha256 = "' + "0" * 64 + '"\n', "exactly one of key and key_sha256"),
    ('[[tenant]]\nname = "a"\nkey_sha256 = "abc"\n', "64 hex digits"),
    ('[[tenant]]\nname = "a b"\nkey = "k"\n', "name must be"),
    ('[[tenant]]\nname = "a"\nkey = "k"\nweight = 0\n', "weight must be a number from 0.001 to 1000"),
    ('[[tenant]]\nname = "a"\nkey = "k"\nweight = 1e-309\n', "weight must be a number from 0.001 to 1000"),
    ('[[tenant]]\nname = "a"\nkey = "k"\nmax_queued = 0\n', "max_queued must be a whole number"),
    ('[[tenant]]\nname = "a"\nkey = "k"\nmax_per_minute = 1.5\n', "max_per_minute must be a whole number"),
    ('[[tenant]]\nname = "a"\nkey = "k"\nadmin = "yes"\n', "admin must be true or false"),
    ('[[tenant]]\nname = "a"\nkey = "k"\npriority = 1\n', "unknown field(s) priority"),
    ('[tenant]\nname = "a"\n', "[[tenant]] tables"),
    ('[[tenants]]\nname = "a"\n', "unknown top-level key(s) tenants"),
    ('[[tenant]\nname = "a"', "not valid TOML"),
])
def test_a_file_that_cannot_be_used_says_where_and_why(text, says):
    with pytest.raises(TenantError) as exc:
        parse_tenants(text)
    assert says in str(exc.value)


def test_a_missing_or_garbled_file_is_reported_once_and_changes_nothing(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(WEB_T)
    tenants = Tenants((), path)
    assert not tenants.changed()
    path.unlink()
    assert tenants.changed() and tenants.reload() is None and "cannot read" in tenants.error
    assert not tenants.changed()  # not looked at again every second while it stays away
    assert tenants.identify(WEB).name == "web"  # the tenants in force stay
    path.write_bytes(b'[[tenant]]\nname = "\xff"\n')
    assert tenants.changed() and tenants.reload() is None and "not UTF-8" in tenants.error
    path.write_text(WEB_T + BATCH_T)
    assert tenants.changed() and tenants.reload() == set() and tenants.error is None
    assert tenants.identify(BATCH).name == "batch"


def test_names_and_keys_are_unique_and_api_keys_are_admin_tenants(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(WEB_T + WEB_T.replace('"web"', '"web2"'))
    with pytest.raises(TenantError, match="has the key of another tenant"):
        Tenants((), path)
    path.write_text(WEB_T + BATCH_T.replace('"batch"', '"web"'))
    with pytest.raises(TenantError, match="named twice"):
        Tenants((), path)
    path.write_text(WEB_T)
    tenants = Tenants(("an-api-key-long-enough",), path)
    web, legacy = tenants.identify(WEB), tenants.identify("an-api-key-long-enough")
    assert web.name == "web" and not web.operator and tenants.get("web").weight == 2
    assert legacy.name == "key-" + key_digest("an-api-key-long-enough")[:16] and legacy.operator
    assert tenants.identify(BATCH) is None and tenants.identify("") is None and tenants.identify(None) is None
    assert not tenants.open and Tenants((), None).open


# --- against the server -----------------------------------------------------------------------------------------


def test_each_tenant_calls_under_its_own_name(server, tenants_file):
    health = httpx.get(server.url + "/health").json()
    assert health["tenants"]["count"] == 5 and health["tenants"]["file"] == str(tenants_file)
    assert "error" not in health["tenants"]
    t = task()
    only_item(server.post([t], headers=auth(WEB)))
    assert caller_of(server, t["taskUUID"]) == "web"
    err = only_error(server.post([task()], headers=auth("not-a-tenant-key-0123456789")), 401)
    assert err["code"] == "invalidApiKey"
    log = server.log()
    assert all(key not in log for key in (WEB, BATCH, OPS))


def test_get_response_shows_a_tenant_only_its_own_tasks(server):
    mine = task(deliveryMethod="async", steps=40)  # several seconds: longer than an answer may take below
    assert server.post([mine], headers=auth(WEB)).status_code == 200
    unknown = str(uuid.uuid4())
    # Another tenant's task, running or finished, is answered exactly as an unknown one: at once, although the
    # server holds a getResponse of one's own running task up to --poll-wait (10 s) for it to finish.
    for _ in range(2):
        theirs = get_response(server, BATCH, mine["taskUUID"])
        never = get_response(server, BATCH, unknown)
        assert theirs.status_code == never.status_code == 404
        assert theirs.elapsed.total_seconds() < 1.5 and never.elapsed.total_seconds() < 1.5
        _same_unknown(theirs.json()["errors"][0], never.json()["errors"][0], mine["taskUUID"], unknown)
        finished(server, WEB, mine["taskUUID"])
    assert finished(server, OPS, mine["taskUUID"])["taskUUID"] == mine["taskUUID"]  # an admin reads every task


def test_another_tenants_task_uuid_is_refused_and_the_task_stays_its_owners(server):
    """README: a taskUUID taken by another tenant is conflictTaskUUID, as one's own is; nothing is overwritten."""
    mine = task(seed=5)
    first = only_item(server.post([mine], headers=auth(WEB)))
    err = only_error(server.post([task(taskUUID=mine["taskUUID"], seed=6)], headers=auth(BATCH)), 409)
    assert err["code"] == "conflictTaskUUID" and err["taskUUID"] == mine["taskUUID"]
    assert caller_of(server, mine["taskUUID"]) == "web"
    assert finished(server, WEB, mine["taskUUID"])["imageUUID"] == first["imageUUID"]
    assert get_response(server, BATCH, mine["taskUUID"]).status_code == 404


def test_over_the_sdk_another_tenants_task_is_unknown(server):
    from runware import RunwareAPIError
    from test_sdk import request, run

    ack = run(lambda rw: rw.imageInference(requestImage=request(deliveryMethod="async", seed=3)), server, WEB)
    [mine] = run(lambda rw: rw.getResponse(taskUUID=ack.taskUUID), server, WEB)
    assert mine.status == "success"
    with pytest.raises(RunwareAPIError) as exc:
        run(lambda rw: rw.getResponse(taskUUID=ack.taskUUID), server, BATCH)
    assert "taskFailedOrNotFound" in str(exc.value)
    [seen] = run(lambda rw: rw.getResponse(taskUUID=ack.taskUUID), server, OPS)
    assert seen.imageUUID == mine.imageUUID


def test_the_queue_view_shows_a_tenant_only_its_own_tasks(server):
    web_tasks = [task(deliveryMethod="async") for _ in range(3)]
    batch_task = task(deliveryMethod="async")
    for t in web_tasks:
        assert server.post([t], headers=auth(WEB)).status_code == 200
    assert server.post([batch_task], headers=auth(BATCH)).status_code == 200
    web_ids = {t["taskUUID"][:8] for t in web_tasks}
    batch_id = batch_task["taskUUID"][:8]
    views = {key: httpx.get(server.url + "/tasks", headers=auth(key)).json() for key in (WEB, BATCH, OPS)}
    assert views[WEB]["tasks"] and {r["id"] for r in views[WEB]["tasks"]} <= web_ids  # the batch task: last, queued
    assert [r["id"] for r in views[BATCH]["tasks"]] == [batch_id] and "tenant" not in views[BATCH]["tasks"][0]
    assert views[BATCH]["tasks"][0]["position"] >= 1
    tenants = {r["id"]: r["tenant"] for r in views[OPS]["tasks"]}
    assert tenants[batch_id] == "batch" and set(tenants.values()) <= {"web", "batch"}
    for t in web_tasks:
        finished(server, WEB, t["taskUUID"])
    finished(server, BATCH, batch_task["taskUUID"])
    mine = httpx.get(server.url + "/tasks", headers=auth(BATCH)).json()
    assert mine["tasks"] == [] and mine["tasksCompleted"] == 1  # its own counts
    assert httpx.get(server.url + "/tasks", headers=auth(OPS)).json()["tasksCompleted"] >= 5


def _same_unknown(theirs: dict, never: dict, task_uuid: str, unknown: str) -> None:
    """Two error items alike but for the taskUUID they name."""
    a, b = dict(theirs), dict(never)
    assert a.pop("taskUUID") == task_uuid and b.pop("taskUUID") == unknown
    assert a.pop("message").replace(task_uuid, "X") == b.pop("message").replace(unknown, "X")
    assert a == b


def _quiet(client) -> bool:
    """Nothing is waiting for this socket: the next frame after a ping is its pong."""
    client.send({"taskType": "ping", "ping": True})
    return client.recv(10) == {"data": [{"taskType": "ping", "pong": True}]}


def test_over_a_websocket_a_tenant_sees_only_its_own_tasks_and_sessions(server):
    """Result frames go to the submitting tenant's socket only; getResponse on a socket answers another tenant's
    task as unknown (an admin's: found); another tenant's connectionSessionUUID gives a session of one's own and
    none of the first tenant's buffered results, which its owner still gets when it resumes."""
    from test_ws import Client

    web, batch, ops = Client(server), Client(server), Client(server)
    try:
        web_session = web.auth(WEB)
        batch.auth(BATCH)
        ops.auth(OPS)
        t = task(outputType="URL")
        web.send(t)
        assert web.until(t["taskUUID"])["data"][0]["imageURL"]
        unknown = str(uuid.uuid4())
        for _ in range(2):
            batch.send({"taskType": "getResponse", "taskUUID": t["taskUUID"]})
            [theirs] = batch.until(t["taskUUID"], 10)["errors"]
            batch.send({"taskType": "getResponse", "taskUUID": unknown})
            [never] = batch.until(unknown, 10)["errors"]
            _same_unknown(theirs, never, t["taskUUID"], unknown)
        assert theirs["code"] == "taskFailedOrNotFound"
        ops.send({"taskType": "getResponse", "taskUUID": t["taskUUID"]})
        assert ops.until(t["taskUUID"], 10)["data"][0]["status"] == "success"
        assert _quiet(batch) and _quiet(ops)  # no result frame of web's reached them

        later = task(outputType="URL")
        web.send(later)
        web.close()  # its result waits in web's session
        finished(server, WEB, later["taskUUID"])
        thief = Client(server)
        try:
            assert thief.auth(BATCH, session=web_session) != web_session
            assert _quiet(thief)
        finally:
            thief.close()
        web = Client(server)
        assert web.auth(WEB, session=web_session) == web_session
        assert web.until(later["taskUUID"], 30)["data"][0]["taskUUID"] == later["taskUUID"]
    finally:
        for client in (web, batch, ops):
            client.close()


def test_over_a_websocket_a_tenant_over_its_limit_gets_an_error_frame(server):
    from test_ws import Client

    _until(lambda: httpx.get(server.url + "/tasks", headers=auth(CAPPED)).json()["tasks"] == [], timeout=120)
    capped = Client(server)
    try:
        capped.auth(CAPPED)
        first, second = task(outputType="URL"), task(outputType="URL")
        capped.send(first, second)
        [err] = capped.until(second["taskUUID"], 30)["errors"]
        assert err["code"] == "rateLimitExceeded" and "max_queued" in err["message"] and err["retryAfter"] == 5
        assert capped.until(first["taskUUID"])["data"][0]["taskUUID"] == first["taskUUID"]
    finally:
        capped.close()


def test_max_queued_bounds_a_tenants_tasks_in_flight_and_no_one_elses(server):
    first, second = task(deliveryMethod="async"), task(deliveryMethod="async")
    assert server.post([first], headers=auth(CAPPED)).status_code == 200
    refused = server.post([second], headers=auth(CAPPED))
    err = only_error(refused, 429)
    assert err["code"] == "rateLimitExceeded" and "max_queued" in err["message"]
    assert err["taskUUID"] == second["taskUUID"]
    assert refused.headers["Retry-After"] == str(err["retryAfter"]) == "5"
    other = task(deliveryMethod="async")
    assert server.post([other], headers=auth(WEB)).status_code == 200  # other tenants: unaffected
    finished(server, CAPPED, first["taskUUID"])
    _until(lambda: server.post([task(deliveryMethod="async")], headers=auth(CAPPED)).status_code == 200)
    finished(server, WEB, other["taskUUID"])


def test_max_per_minute_bounds_a_tenants_submissions(server):
    accepted = [server.post([task(deliveryMethod="async")], headers=auth(METERED)) for _ in range(2)]
    assert [r.status_code for r in accepted] == [200, 200]
    refused = server.post([task(deliveryMethod="async")], headers=auth(METERED))
    err = only_error(refused, 429)
    assert err["code"] == "rateLimitExceeded" and "max_per_minute" in err["message"]
    assert 1 <= int(refused.headers["Retry-After"]) == err["retryAfter"] <= 60
    assert server.post([task(deliveryMethod="async")], headers=auth(WEB)).status_code == 200


def _done_order(server, task_uuids: set[str]) -> list[str]:
    """The tasks among these in the order their results were stored (their log lines)."""
    order = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("taskUUID") in task_uuids and " done: " in entry["message"]:
                order.append(entry["taskUUID"])
    return order


def test_a_newcomer_waits_for_at_most_one_task_of_a_flood(server):
    """Fair share on the local worker (one slot): web floods the queue, then batch sends one task; batch's
    task runs as soon as the web task running when it came has finished, not after the whole flood."""
    _until(lambda: httpx.get(server.url + "/tasks", headers=auth(OPS)).json()["tasks"] == [], timeout=300)
    flood = [task(deliveryMethod="async") for _ in range(6)]
    assert server.post(flood, headers=auth(WEB)).status_code == 200
    one = task(deliveryMethod="async")
    assert server.post([one], headers=auth(BATCH)).status_code == 200
    for t in flood:
        finished(server, WEB, t["taskUUID"])
    finished(server, BATCH, one["taskUUID"])
    order = _done_order(server, {t["taskUUID"] for t in flood} | {one["taskUUID"]})
    names = {t["taskUUID"]: f"web{i}" for i, t in enumerate(flood)} | {one["taskUUID"]: "batch"}
    assert len(order) == 7 and order.index(one["taskUUID"]) <= 1, [names[u] for u in order]  # FIFO: it'd be last


def _until(condition, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _ws(server, key):
    ws = connect(server.url.replace("http", "ws") + "/v1", open_timeout=10).__enter__()
    ws.send(json.dumps([{"taskType": "authentication", "apiKey": key}]))
    assert "data" in json.loads(ws.recv(timeout=10))
    return ws


def _pong(ws) -> bool:
    ws.send(json.dumps([{"taskType": "ping", "ping": True}]))
    return json.loads(ws.recv(timeout=10))["data"][0]["pong"] is True


def test_the_file_is_reread_while_serving(server, tenants_file):
    """Adding and removing tenants takes effect without a restart; a removed tenant's sockets are closed with the
    reason, the others stay open; a broken file changes nothing and /health says why; SIGHUP re-reads it even
    when nothing about the file's time or size changed."""
    web, batch, ops = _ws(server, WEB), _ws(server, BATCH), _ws(server, OPS)
    try:
        tenants_file.write_text(tenants_toml(WEB_T, OPS_T.replace("admin = true", "admin = false"), LATE_T))
        _until(lambda: server.post([{"taskType": "ping", "ping": True}], headers=auth(LATE)).status_code == 200)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                batch.recv(timeout=10)
        assert closed.value.rcvd.code == 4003 and "no longer accepted" in closed.value.rcvd.reason
        with pytest.raises(ConnectionClosed) as closed:  # an admin no more: authenticated as what it is not
            while True:
                ops.recv(timeout=10)
        assert closed.value.rcvd.code == 4003
        assert only_error(server.post([task()], headers=auth(BATCH)), 401)["code"] == "invalidApiKey"
        assert _pong(web)
        assert httpx.get(server.url + "/health").json()["tenants"]["count"] == 3

        tenants_file.write_text("[[tenant]\nthis is not TOML")
        _until(lambda: "error" in httpx.get(server.url + "/health").json()["tenants"])
        health = httpx.get(server.url + "/health")
        assert health.status_code == 200 and "not valid TOML" in health.json()["tenants"]["error"]
        assert server.post([{"taskType": "ping", "ping": True}], headers=auth(LATE)).status_code == 200
        assert _pong(web)

        # Same size, same modification time: only SIGHUP tells the server to look again.
        text = tenants_toml(WEB_T, OPS_T, LATE_T)
        tenants_file.write_text(text)
        _until(lambda: "error" not in httpx.get(server.url + "/health").json()["tenants"])
        stat = tenants_file.stat()
        tenants_file.write_text(text.replace(LATE, LATE[::-1]))
        os.utime(tenants_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        time.sleep(1.5)  # a poll or more: the watch sees no change
        assert server.post([{"taskType": "ping", "ping": True}], headers=auth(LATE)).status_code == 200
        os.kill(server.proc.pid, signal.SIGHUP)
        _until(lambda: server.post([{"taskType": "ping", "ping": True}], headers=auth(LATE[::-1])).status_code == 200)
        assert server.post([{"taskType": "ping", "ping": True}], headers=auth(LATE)).status_code == 401
        assert _pong(web)
    finally:
        web.close()
        batch.close()
        ops.close()


def _per_caller(server, marker: str) -> dict[str, int]:
    """How many of the server's task log lines containing `marker` each caller has."""
    counts: dict[str, int] = {}
    for line in server.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if marker in entry["message"] and entry.get("caller"):
                counts[entry["caller"]] = counts.get(entry["caller"], 0) + 1
    return counts


def test_usage_matches_the_work_done_and_survives_a_restart(server, tenants_file):
    """GET /usage per tenant (its own; an admin's: everyone's) equals what the log says was done, the metrics
    say the same, and a new server process on the same data reads the same usage (from the ledger)."""
    from conftest import RunningServer
    from prometheus_client.parser import text_string_to_metric_families

    tenants_file.write_text(tenants_toml(WEB_T, BATCH_T, OPS_T, CAPPED_T, METERED_T))
    _until(lambda: server.post([{"taskType": "ping", "ping": True}], headers=auth(BATCH)).status_code == 200)
    _until(lambda: httpx.get(server.url + "/tasks", headers=auth(OPS)).json()["tasks"] == [], timeout=300)
    done, failed = _per_caller(server, " done: "), _per_caller(server, " failed: ")
    assert done["web"] > 5 and set(done) <= {"web", "batch", "capped", "metered", "ops"}
    admin = httpx.get(server.url + "/usage", params={"since": "0"}, headers=auth(OPS)).json()
    rows = {row["tenant"]: row for row in admin["tenants"]}
    assert {name: row["tasks"] for name, row in rows.items()} == {
        name: done.get(name, 0) + failed.get(name, 0) for name in set(done) | set(failed)}
    for name, row in rows.items():
        assert row["images"] == done.get(name, 0) and row["failures"] == failed.get(name, 0)
        assert row["generationSeconds"] > 0 and row["costUSD"] == pytest.approx(row["generationSeconds"] * 2 / 3600,
                                                                                rel=1e-3, abs=1e-6)
    mine = httpx.get(server.url + "/usage", params={"since": "1970-01-01"}, headers=auth(WEB)).json()
    assert mine["tenants"] == [rows["web"]]  # a tenant: its own only
    assert httpx.get(server.url + "/usage", params={"since": "yesterday"}, headers=auth(WEB)).status_code == 400
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
               for s in family.samples}
    assert samples[("k5serve_tenant_tasks_total", (("outcome", "success"), ("tenant", "web")))] == done["web"]

    server.stop()
    again = RunningServer(server.data_dir, "--tenants", str(tenants_file))
    try:
        after = httpx.get(again.url + "/usage", params={"since": "0"}, headers=auth(OPS)).json()
        assert after["tenants"] == admin["tenants"]
    finally:
        again.stop()
