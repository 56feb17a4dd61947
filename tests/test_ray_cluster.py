"""The multi-node path on one machine: a two-node Ray cluster (Ray's own test-cluster utility: a head node and a
second raylet, one CPU each), a replica on each node, and the server joining the cluster with --ray-address."""

from __future__ import annotations

import re
import threading

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
        nodes = {workers[t["taskUUID"]].split("/")[0] for t in tasks}
        assert len(nodes) == 2, workers  # one replica per node, both did work
    finally:
        srv.stop()
    # The server joined a cluster it did not start: stopping it leaves the cluster running.
    assert len(cluster.list_all_nodes()) == 2
