"""Fair share over Ray Serve replicas: two replicas, two tenants; a newcomer's task takes the next free replica
instead of waiting behind another tenant's flood. A real local Ray instance, its own server for the module."""

from __future__ import annotations

import time

import httpx
import pytest
from conftest import RunningServer, own_data_dir, task

FLOOD, ONE = "tenant-flood-key-0123456789abcdef", "tenant-one-key-0123456789abcdef"


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory, data_dir):
    home = own_data_dir(tmp_path_factory, data_dir, "ray-fair")
    tenants = home / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nname = "flood"\nkey = "{FLOOD}"\nadmin = true\n'
                       f'[[tenant]]\nname = "one"\nkey = "{ONE}"\n')
    srv = RunningServer(home, "--workers", "ray", "--replicas", "2", "--max-queue", "8", "--poll-wait", "0",
                        "--tenants", str(tenants))
    yield srv
    srv.stop()


def test_a_newcomer_takes_the_next_free_replica(ray_server):
    """The flood fills both replicas and the queue; the newcomer's task is the next to start (it starts when one
    of the two flood tasks running when it came has finished), not the last."""
    flood = [task(deliveryMethod="async") for _ in range(6)]
    for t in flood:  # one by one: the flood's tasks reach the queue in this order
        assert ray_server.post([t], headers={"Authorization": f"Bearer {FLOOD}"}).status_code == 200
    one = task(deliveryMethod="async")
    assert ray_server.post([one], headers={"Authorization": f"Bearer {ONE}"}).status_code == 200
    names = {t["taskUUID"][:8]: f"flood{i}" for i, t in enumerate(flood)} | {one["taskUUID"][:8]: "one"}
    started: list[str] = []  # in the order they were first seen running (the admin's queue view)
    deadline = time.monotonic() + 600
    while len(started) < len(names) and time.monotonic() < deadline:
        view = httpx.get(ray_server.url + "/tasks", headers={"Authorization": f"Bearer {FLOOD}"}).json()
        running = [row["id"] for row in view["tasks"] if row["status"] == "running"]
        started += [names[i] for i in running if names[i] not in started]
        if not view["tasks"]:
            break
        time.sleep(0.05)
    assert len(started) == len(names), started
    assert started.index("one") <= 2, started  # first in first out, it would start last
