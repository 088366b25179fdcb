"""`specray serve`: the embedded default. Starts a local Ray head whose node carries both custom resources
(`target`, `draft`), deploys the application built from the config, serves HTTP on 127.0.0.1 and shuts everything
down cleanly on SIGTERM / SIGINT. On a real cluster use `serve deploy deploy/serve.yaml` instead.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from cluster.config import SpecrayConfig

log = logging.getLogger(__name__)

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def ray_env() -> None:
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)


def start_local_ray(num_cpus: float | None = None, object_store_mb: int = 256) -> None:
    import ray

    ray_env()
    if ray.is_initialized():
        return
    cwd = os.getcwd()
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), resources={"target": 1, "draft": 1}, include_dashboard=False,
             object_store_memory=object_store_mb << 20, namespace="specray", log_to_driver=True,
             runtime_env={"env_vars": {**RAY_ENV, "PYTHONPATH": cwd + os.pathsep + os.environ.get("PYTHONPATH", "")}})


def deploy(cfg: SpecrayConfig, blocking_timeout_s: float = 600.0) -> str:
    """Deploy the application on the connected Ray cluster; returns the base URL."""
    from ray import serve

    from cluster.builder import build_app

    serve.start(http_options={"host": cfg.router.host, "port": cfg.router.port})
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.router.route_prefix, blocking=False)
    deadline = time.monotonic() + blocking_timeout_s
    while time.monotonic() < deadline:  # wait for every deployment of the app to be RUNNING
        status = serve.status().applications.get(cfg.name)
        if status is not None and status.status == "RUNNING":
            break
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"deployment failed: {status.message or status.deployments}")
        time.sleep(0.5)
    else:
        raise TimeoutError(f"the application did not become ready within {blocking_timeout_s:.0f}s")
    return f"http://{cfg.router.host}:{cfg.router.port}{cfg.router.route_prefix.rstrip('/')}"


def shutdown() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(cfg: SpecrayConfig) -> None:
    start_local_ray()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = deploy(cfg)
        print(f"[specray] serving {cfg.served_model_name} at {url}/v1 (target {cfg.target.model}, "
              f"draft {cfg.draft.drafter}, tp {cfg.target.tp}); Ctrl-C or SIGTERM stops it", flush=True)
        stop.wait()
    finally:
        print("[specray] shutting down", flush=True)
        shutdown()
