"""A local multi-node Ray cluster (`ray.cluster_utils.Cluster`): a head without pool resources, one node with the
`target` resource and one with `draft`. The application's pools must land on their own nodes, and serve."""

from __future__ import annotations

import time

import pytest
import requests

from cluster.config import load_config
from workers.wire import free_port

pytestmark = pytest.mark.slow

STORE = 100 << 20


def _three_node_cluster(attempts: int = 3):
    """Head + `target` node + `draft` node. Ray gives a starting raylet a fixed 30 s to register with the GCS; on a
    loaded 2-core machine (processes of the previous test still exiting) that can run out, so a node that fails to
    start tears the half-built cluster down and the whole cluster is built again, a bounded number of times."""
    from ray.cluster_utils import Cluster

    for attempt in range(1, attempts + 1):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": STORE})
            target_node = cluster.add_node(num_cpus=1, resources={"target": 1}, object_store_memory=STORE)
            draft_node = cluster.add_node(num_cpus=1, resources={"draft": 1}, object_store_memory=STORE)
            cluster.wait_for_nodes(timeout=60)
            return cluster, target_node, draft_node
        except Exception:
            if cluster is not None:
                cluster.shutdown()
            if attempt == attempts:
                raise
            time.sleep(5.0 * attempt)


def test_pools_are_placed_on_their_own_nodes(tiny_llama):
    import ray
    from ray import serve

    from cluster import launch

    launch.ray_env()
    cluster, target_node, draft_node = _three_node_cluster()
    try:
        ray.init(address=cluster.address, namespace="specray")
        cfg = load_config(None, {
            "name": "placement", "target.model": str(tiny_llama), "target.dtype": "fp32", "target.num_cpus": 0.5,
            "target.resources": {"target": 0.5}, "draft.num_cpus": 0.5, "draft.resources": {"draft": 0.5},
            "router.port": free_port(), "router.num_cpus": 0.2, "target.max_model_len": 512,
        })
        url = launch.deploy(cfg, blocking_timeout_s=300)
        on = {name: serve.get_deployment_handle(f"placement-{name}", app_name="placement").node_id.remote().result()
              for name in ("target", "draft")}
        assert on["target"] == target_node.node_id
        assert on["draft"] == draft_node.node_id
        r = requests.post(url + "/v1/completions", json={"model": cfg.served_model_name, "prompt": "Hello world",
                                                         "max_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
