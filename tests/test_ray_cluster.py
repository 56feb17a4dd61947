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


def test_front_ends_joining_one_cluster_each_own_a_replica_on_its_own_node(cluster, tmp_path_factory, data_dir):
    """Two front-ends join the cluster with --ray-address, each with its own --ray-app and one replica. The nodes
    have one CPU each, so the replicas land on different nodes; both serve, at once. One front-end stopping (it
    removes its application) leaves the other's replica serving; stopping both leaves the cluster running."""
    first = RunningServer(own_data_dir(tmp_path_factory, data_dir, "app-one"), "--workers", "ray", "--replicas", "1",
                          "--ray-address", cluster.address, "--ray-app", "k5serve-one")
    try:
        second = RunningServer(own_data_dir(tmp_path_factory, data_dir, "app-two"), "--workers", "ray", "--replicas",
                               "1", "--ray-address", cluster.address, "--ray-app", "k5serve-two")
        try:
            rows = {srv.url: httpx.get(srv.url + "/health").json()["replicas"] for srv in (first, second)}
            assert all(len(r) == 1 and r[0]["state"] == "RUNNING" and r[0]["device"] == "cpu" for r in rows.values())
            assert len({r[0]["nodeId"] for r in rows.values()}) == 2, rows  # one on each node
            done: dict[str, dict] = {}
            threads = [threading.Thread(target=lambda s=srv: done.update({s.url: only_item(s.post([task()]))}))
                       for srv in (first, second)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(300)
            assert set(done) == {first.url, second.url}
            for srv in (first, second):
                [row] = httpx.get(srv.url + "/health").json()["replicas"]
                assert row["tasksDone"] == 1
                assert re.search(rf"done: .*, worker {row['id']}", srv.log())  # each ran on its own replica
        finally:
            second.stop()
        only_item(first.post([task()]))  # the other application, and its replica, are untouched
        assert len(httpx.get(first.url + "/health").json()["replicas"]) == 1
    finally:
        first.stop()
    # The servers joined a cluster they did not start: stopping them leaves the cluster running.
    assert len(cluster.list_all_nodes()) == 2


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
