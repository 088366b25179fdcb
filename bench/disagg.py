"""In-process vs disaggregated serving, side by side in one run (the serving issue's comparison).

    in_process          one process: HTTP router, engine and drafter share it (`specray serve --in-process`)
    disagg_no_runahead  Ray Serve: router -> target replica <-> draft replica over gRPC, the draft drafts the next
                        block only after the verdict on the previous one (draft.ahead_blocks = 1)
    disagg_runahead     the same with the draft one block ahead of verification (draft.ahead_blocks = 2)

The target gets the same torch threads in every setup; in the disaggregated setups the draft replica runs in its
own process (its own core here, its own cheap accelerator in production). Each setup is measured with the same
closed-loop sweep (bench/serve.py); the result carries every level plus the ratios that matter: per-user tokens/s
at concurrency 1 against the in-process engine, and the draft<->target round trip measured on the target.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

import requests

from bench.serve import run_serve_bench
from cluster.config import load_config

SETUPS = ("in_process", "disagg_no_runahead", "disagg_runahead")


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy within {timeout_s:.0f}s")


def _latency(samples: list[float]) -> dict:
    if not samples:
        return {"p50_ms": None, "p90_ms": None, "n": 0}
    s = sorted(samples)
    return {"p50_ms": round(statistics.median(s) * 1e3, 3), "p90_ms": round(s[int(0.9 * (len(s) - 1))] * 1e3, 3),
            "n": len(s)}


def _target_counters(app: str) -> dict:
    import grpc

    from cluster.registry import lister
    from protos import specray_pb2 as pb
    from protos import specray_pb2_grpc as pb_grpc

    out = {"num_drafts": 0, "num_accepted_tokens": 0, "fallback_steps": 0, "draft_wait_seconds": 0.0,
           "latencies": []}
    for addr in lister(app, "target")():
        with grpc.insecure_channel(addr) as ch:
            info = pb_grpc.TargetServiceStub(ch).Info(pb.InfoRequest(), timeout=10)
        out["num_drafts"] += info.num_drafts
        out["num_accepted_tokens"] += info.num_accepted_tokens
        out["fallback_steps"] += info.fallback_steps
        out["draft_wait_seconds"] += info.draft_wait_seconds
        out["latencies"] += list(info.draft_rpc_latency_s)
    return out


def run_comparison(target: str, drafter: str, prompts: list[dict], concurrency: list[int], max_tokens: int,
                   k: int = 4, dtype: str = "bf16", chat: bool = True, threads: int = 1, port: int = 18700,
                   requests_per_level: int | None = None, setups: tuple[str, ...] = SETUPS) -> dict:
    result: dict = {"target": target, "drafter": drafter, "k": k, "dtype": dtype, "target_threads": threads,
                    "max_tokens": max_tokens, "setups": {}}
    sweep = dict(prompts=prompts, concurrency=concurrency, max_tokens=max_tokens, chat=chat,
                 requests_per_level=requests_per_level)
    if "in_process" in setups:
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "cluster.cli", "serve", "--in-process", "--target", target, "--draft", drafter,
               "--k", str(k), "--dtype", dtype, "--threads", str(threads), "--port", str(port)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        try:
            _wait_http(url, 300, proc)
            result["setups"]["in_process"] = run_serve_bench(url, **sweep)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    disagg = [s for s in setups if s.startswith("disagg")]
    if disagg:
        from ray import serve

        from cluster import launch

        launch.start_local_ray()
        try:
            for i, name in enumerate(disagg):
                app = f"bench{i}"
                cfg = load_config(None, {
                    "name": app, "target.model": target, "target.dtype": dtype, "target.threads": threads,
                    "target.num_draft_tokens": k, "draft.drafter": drafter, "draft.dtype": dtype,
                    "draft.threads": 1, "draft.ahead_blocks": 2 if name == "disagg_runahead" else 1,
                    "router.port": port + 1, "target.num_cpus": 1.0, "draft.num_cpus": 0.5,
                })
                url = launch.deploy(cfg, blocking_timeout_s=600)
                _wait_http(url, 120)
                before = _target_counters(app)
                bench = run_serve_bench(url, **sweep)
                after = _target_counters(app)
                drafts = after["num_drafts"] - before["num_drafts"]
                bench["cluster"] = {
                    "tau": round(1 + (after["num_accepted_tokens"] - before["num_accepted_tokens"]) / drafts, 3)
                    if drafts else None,
                    "fallback_steps": after["fallback_steps"] - before["fallback_steps"],
                    "target_wait_for_draft_s": round(after["draft_wait_seconds"] - before["draft_wait_seconds"], 3),
                    "verdict_to_next_block": _latency(after["latencies"]),
                }
                result["setups"][name] = bench
                serve.delete(app)
        finally:
            launch.shutdown()
    result["ratios"] = _ratios(result["setups"])
    return result


def _level(bench: dict, c: int) -> dict | None:
    return next((lv for lv in bench["levels"] if lv["concurrency"] == c), None)


def _ratios(setups: dict) -> dict:
    out: dict = {}
    base = setups.get("in_process")
    for name, bench in setups.items():
        c1 = _level(bench, 1)
        if base is not None and name != "in_process" and c1 and _level(base, 1):
            b = _level(base, 1)["per_user_tokens_per_s"]["p50"]
            v = c1["per_user_tokens_per_s"]["p50"]
            out[f"{name}_per_user_c1_vs_in_process"] = round(v / b, 3) if b and v else None
        levels = bench["levels"]
        if len(levels) > 1 and levels[0]["aggregate_tokens_per_s"]:
            out[f"{name}_aggregate_max_c_vs_c1"] = round(
                levels[-1]["aggregate_tokens_per_s"] / levels[0]["aggregate_tokens_per_s"], 3)
    return out
