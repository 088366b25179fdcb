"""Both pools autoscale on a local Ray from the sequences they serve over gRPC (cluster/autoscaling.py): load on
the router scales the target and draft pools up to their max_replicas, and they come back down when it stops,
with every request answered. Serve's default policy would see no requests on either pool (the negative control
is the unit test `test_serves_default_policy_is_blind_to_grpc_load`)."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from cluster.config import load_config

pytestmark = pytest.mark.slow

APP = "autoscale"
PORT = 18451
# replicas push their metrics every metrics_interval_s (Serve's default: 10 s) and the policy averages them over
# look_back_period_s, which must be longer
SCALING = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 0, "downscale_delay_s": 2,
           "metrics_interval_s": 0.5, "look_back_period_s": 2}


def _running(name: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or f"{APP}-{name}" not in app.deployments:
        return 0
    return app.deployments[f"{APP}-{name}"].replica_states.get("RUNNING", 0)


def _wait_for(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    return False


def test_pools_scale_with_the_sequences_they_serve(tiny_llama):
    from cluster import launch

    cfg = load_config(None, {
        "name": APP, "target.model": str(tiny_llama), "target.dtype": "fp32", "target.num_cpus": 0.4,
        "target.max_model_len": 1024, "target.autoscaling_config": dict(SCALING, target_ongoing_requests=2),
        "draft.drafter": "ngram", "draft.num_cpus": 0.2, "draft.autoscaling_config": dict(SCALING,
                                                                                          target_ongoing_requests=1),
        "router.port": PORT, "router.num_cpus": 0.2, "target.drain_timeout_s": 5, "draft.drain_timeout_s": 5,
    })
    launch.start_local_ray(num_cpus=2)
    try:
        url = launch.deploy(cfg, blocking_timeout_s=300)
        assert _running("target") == 1 and _running("draft") == 1
        stop = threading.Event()
        results: list[int] = []

        def user() -> None:  # one user after another, each a long completion
            while not stop.is_set():
                r = requests.post(url + "/v1/completions", timeout=120, json={
                    "model": cfg.served_model_name, "prompt": "Hello world", "max_tokens": 600,
                    "temperature": 0, "ignore_eos": True})
                results.append(r.status_code)

        users = [threading.Thread(target=user, daemon=True) for _ in range(4)]
        for u in users:
            u.start()
        try:
            # 4 live sequences: targets at 2 each -> 2 replicas; drafts at 1 each -> 4, capped at 2
            scaled_up = _wait_for(lambda: _running("target") == 2 and _running("draft") == 2, 120)
        finally:
            stop.set()
            for u in users:
                u.join(150)
        assert scaled_up, (_running("target"), _running("draft"))
        assert results and all(code == 200 for code in results), results
        # idle: back to min_replicas (the removed replicas drain first; nothing is live any more)
        assert _wait_for(lambda: _running("target") == 1 and _running("draft") == 1, 120), \
            (_running("target"), _running("draft"))
        r = requests.post(url + "/v1/completions", timeout=60, json={
            "model": cfg.served_model_name, "prompt": "Hello", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200
    finally:
        launch.shutdown()
