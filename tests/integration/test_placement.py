"""A local multi-node Ray cluster (`ray.cluster_utils.Cluster`): a head without pool resources, one node with the
`target` resource and one with `draft`. The application's pools must land on their own nodes, and serve."""

from __future__ import annotations

import pytest
import requests

from cluster.config import load_config

pytestmark = pytest.mark.slow


def test_pools_are_placed_on_their_own_nodes(tiny_llama):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster import launch

    launch.ray_env()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 << 20})
    target_node = cluster.add_node(num_cpus=1, resources={"target": 1}, object_store_memory=100 << 20)
    draft_node = cluster.add_node(num_cpus=1, resources={"draft": 1}, object_store_memory=100 << 20)
    try:
        ray.init(address=cluster.address, namespace="specray")
        cfg = load_config(None, {
            "name": "placement", "target.model": str(tiny_llama), "target.dtype": "fp32", "target.num_cpus": 0.5,
            "target.resources": {"target": 0.5}, "draft.num_cpus": 0.5, "draft.resources": {"draft": 0.5},
            "router.port": 18441, "router.num_cpus": 0.2, "target.max_model_len": 512,
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
