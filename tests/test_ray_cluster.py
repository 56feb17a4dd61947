"""The multi-node path on one machine: a two-node Ray cluster (Ray's own test-cluster utility: a head node and a
second raylet, one CPU each), a replica on each node, and the server joining the cluster with --ray-address."""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest
from conftest import RunningServer, own_data_dir, task
from test_http_api import only_item

cluster_utils = pytest.importorskip("ray.cluster_utils")


@pytest.fixture(scope="module")
def cluster():
    cluster = cluster_utils.Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def test_a_replica_on_each_node_of_a_joined_cluster(cluster, tmp_path_factory, data_dir):
    srv = RunningServer(own_data_dir(tmp_path_factory, data_dir, "cluster"), "--workers", "ray", "--replicas", "2",
                        "--ray-address", cluster.address)
    try:
        tasks = [task(seed=s) for s in (3, 4)]
        done: dict[str, dict] = {}
        threads = [threading.Thread(target=lambda t=t: done.update({t["taskUUID"]: only_item(srv.post([t]))}))
                   for t in tasks]
        for th in threads:
            th.start()
        for th in threads:
            th.join(300)
        assert set(done) == {t["taskUUID"] for t in tasks}
        workers = dict(re.findall(r'task (\S+) done: .*, worker ([^\s",]+)', srv.log()))
        rows = {r["id"]: r for r in httpx.get(srv.url + "/health").json()["replicas"]}
        nodes = {rows[workers[t["taskUUID"]]]["nodeId"] for t in tasks}
        assert len(nodes) == 2, (workers, rows)  # one replica per node, both did work
        assert all(r["state"] == "RUNNING" and r["device"] == "cpu" and r["tasksDone"] == 1 for r in rows.values())
    finally:
        srv.stop()
    # The server joined a cluster it did not start: stopping it leaves the cluster running.
    assert len(cluster.list_all_nodes()) == 2


def test_two_front_ends_on_one_cluster_each_own_their_replicas(cluster, tmp_path_factory, data_dir):
    """Front-ends joining the same cluster with their own --ray-app: each deploys its replica, both serve, and
    one stopping (it removes its application) leaves the other's replica serving."""
    first = RunningServer(own_data_dir(tmp_path_factory, data_dir, "app-one"), "--workers", "ray", "--replicas", "1",
                          "--ray-address", cluster.address, "--ray-app", "k5serve-one")
    try:
        second = RunningServer(own_data_dir(tmp_path_factory, data_dir, "app-two"), "--workers", "ray", "--replicas",
                               "1", "--ray-address", cluster.address, "--ray-app", "k5serve-two")
        try:
            ids = {srv.url: {r["id"] for r in httpx.get(srv.url + "/health").json()["replicas"]}
                   for srv in (first, second)}
            assert all(len(v) == 1 for v in ids.values()) and not set.intersection(*ids.values())
            only_item(second.post([task()]))
        finally:
            second.stop()
        only_item(first.post([task()]))  # the other application, and its replica, are untouched
        assert len(httpx.get(first.url + "/health").json()["replicas"]) == 1
    finally:
        first.stop()


def test_replicas_that_cannot_load_their_weights_are_reported(cluster, tmp_path_factory, data_dir):
    """Weights that do not load on the replicas (a truncated file: the front-end never reads it) are reported by
    /ready and /health with the replica's own error, and the server stays up to say so."""
    home = own_data_dir(tmp_path_factory, data_dir, "broken")
    weights = home / "tiny" / "t2i" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    srv = RunningServer(home, "--workers", "ray", "--replicas", "1", "--ray-address", cluster.address, ready=False)
    try:
        deadline = time.monotonic() + 240
        while (body := httpx.get(srv.url + "/ready").json())["model"] == "loading" and time.monotonic() < deadline:
            time.sleep(1)
        assert httpx.get(srv.url + "/ready").status_code == 503
        [reason] = body["reasons"]
        assert "replicas failed to load: OSError: Unable to load weights" in reason and weights.name in reason
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "error"
    finally:
        srv.stop()


def test_replicas_the_cluster_cannot_place_are_reported_while_loading(cluster, tmp_path_factory, data_dir):
    """A replica asking for more than any node has (4 CPUs; the nodes have 1) waits for resources: /ready says
    so, in Ray Serve's words, instead of a bare "still loading"."""
    srv = RunningServer(own_data_dir(tmp_path_factory, data_dir, "unplaced"), "--workers", "ray", "--replicas",
                        "1", "--replica-threads", "4", "--ray-address", cluster.address, ready=False)
    try:
        deadline = time.monotonic() + 120
        while "resources" not in str(body := httpx.get(srv.url + "/ready").json()) and time.monotonic() < deadline:
            time.sleep(1)
        [reason] = body["reasons"]
        assert reason.startswith("the model is still loading (") and "CPU" in reason, body
    finally:
        srv.stop()
