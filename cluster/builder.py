"""One builder turns a `SpecrayConfig` into the Ray Serve application (Ray Serve LLM's builder pattern).

    router (HTTP ingress, FastAPI)  --gRPC Generate-->  target pool (TP groups)  <==gRPC Speculate==>  draft pool

Each pool is its own deployment with its own replica count or autoscaling, CPUs/GPUs and custom resources, so
Ray places target replicas on `target` nodes and draft replicas on `draft` nodes and scales them independently.
Autoscaling pools are sized by the sequences their replicas serve (`cluster/autoscaling.py`), and a replica that
is removed drains: it leaves the registry, then its live sequences get `drain_timeout_s` to finish.
Used by `serve run deploy/serve.yaml` (import path `cluster.builder:build_app`) and by `specray serve`.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from cluster.autoscaling import with_pool_policy
from cluster.config import PoolScaling, SpecrayConfig
from cluster.deployments import DraftPool, Router, TargetPool


def _options(name: str, pool: PoolScaling, ranks: int = 1) -> dict[str, Any]:
    actor = {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus, "resources": dict(pool.resources)}
    opts: dict[str, Any] = {"name": name, "ray_actor_options": actor, "health_check_period_s": 5,
                            "health_check_timeout_s": 30, "graceful_shutdown_timeout_s": pool.drain_timeout_s + 10}
    if pool.autoscaling_config:  # sized by the sequences the replicas serve, not by Serve requests they never get
        opts["autoscaling_config"] = with_pool_policy(pool.autoscaling_config)
    else:
        opts["num_replicas"] = pool.num_replicas
    if ranks > 1:  # one replica = one TP group: rank 0 is the replica, ranks 1.. get their own bundles
        bundle = {"CPU": pool.num_cpus, **({"GPU": pool.num_gpus} if pool.num_gpus else {}), **pool.resources}
        opts["placement_group_bundles"] = [bundle] * ranks
        opts["placement_group_strategy"] = "STRICT_PACK"
    return opts


def build_app(args: dict[str, Any] | SpecrayConfig) -> serve.Application:
    cfg = args if isinstance(args, SpecrayConfig) else SpecrayConfig.model_validate(args or {})
    config = cfg.model_dump()
    draft = serve.deployment(DraftPool).options(**_options(f"{cfg.name}-draft", cfg.draft)).bind(config)
    target = serve.deployment(TargetPool).options(
        **_options(f"{cfg.name}-target", cfg.target, ranks=cfg.target.tp)).bind(config)
    router_opts = {"name": f"{cfg.name}-router", "num_replicas": cfg.router.num_replicas,
                   "ray_actor_options": {"num_cpus": cfg.router.num_cpus}}
    router = serve.deployment(serve.ingress()(Router)).options(**router_opts)
    return router.bind(config, target, draft)
