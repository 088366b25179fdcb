"""The draft/target pipeline alone: in-process engine vs the same engine with a gRPC draft worker, no Ray, no HTTP.

    specray bench pipeline --draft eagle --k 7 --prompts bench/prompts/chat.jsonl --limit 6 --max-tokens 64 \
        --json pipeline.json

The target runs here on `--threads` torch threads; the disaggregated draft worker runs in a child process on one
thread (its own core here). Setups, measured side by side on the same prompts at batch size 1 (prompt-major):

    in_process     SpecEngine + InProcessDraftClient: draft, then verify, on the target's threads
    remote_ahead1  SpecEngine + RemoteDraftClient, draft worker with ahead_blocks = 1 (no run-ahead)
    remote_ahead2_plain  one block drafted ahead of verification, assuming the whole block is accepted
    remote_ahead2  the same, and the idle worker prepares blocks for the verdicts it expects (max_hypotheses)
    with --tree-width W > 1, also:
    in_process_treeW     the in-process engine verifying the drafter's W-wide token trees
    remote_ahead1_treeW  the worker drafting W-wide trees and streaming them whole, no run-ahead
    remote_ahead2_treeW  the same, running ahead on each tree's first branch and preparing blocks for the verdicts
                         its other branches would give

It prints one JSON object: tokens/s per setup and the ratios against in_process, with the remote client's counters
(fallback steps, time the target waited for drafts, verdict -> next block latency) and the worker's (blocks
prepared, verdicts answered with one). This separates what the pipeline itself costs or gains from Ray Serve and
HTTP (bench/disagg.py measures the whole path).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

import torch

from workers.wire import free_port

_SERVER = """
import sys, time, torch
torch.set_num_threads(1)
from workers.drafters.registry import build_drafter
from workers.models.loader import load_model
from workers.servers.draft_server import serve_draft
target = load_model(sys.argv[3], sys.argv[4])
drafter = build_drafter(sys.argv[2], target, dtype=sys.argv[4], max_batch=8, tree_width=int(sys.argv[7]))
server, worker, _ = serve_draft(drafter, sys.argv[2], port=int(sys.argv[1]), ahead_blocks=int(sys.argv[5]),
                                max_hypotheses=int(sys.argv[8]))
print("ready", flush=True)
time.sleep(float(sys.argv[6]))
"""


class _Setup:
    """One way of running the speculation loop at batch 1, and what it measured."""

    def __init__(self, target, client, k: int, max_tokens: int):
        from workers.engine.engine import SpecEngine

        self.engine = SpecEngine(target, client, max_batch=1, max_model_len=2048)
        self.client, self.k, self.max_tokens = client, k, max_tokens
        self.tokens, self.elapsed, self.accepted, self.drafts = 0, 0.0, 0, 0
        self.outputs: list[list[int]] = []
        self.draft_s = 0.0  # the target's time in `drafts()`: drafting in process, waiting for blocks remotely
        drafts = client.drafts

        def timed(requests):
            t = time.perf_counter()
            try:
                return drafts(requests)
            finally:
                self.draft_s += time.perf_counter() - t

        client.drafts = timed

    def run(self, i: int, ids: list[int], record: bool = True) -> None:
        from workers.engine.sequence import Request

        t = time.perf_counter()
        (seq,) = self.engine.run([Request(f"p{i}-{time.monotonic_ns()}", ids, max_tokens=self.max_tokens,
                                          num_draft_tokens=self.k, ignore_eos=True)])
        if not record:
            self.draft_s = 0.0
        if record:
            self.elapsed += time.perf_counter() - t
            self.tokens += len(seq.output_ids)
            self.accepted += seq.num_accepted_tokens
            self.drafts += seq.num_drafts
            self.outputs.append(seq.output_ids)

    def summary(self) -> dict:
        return {"tokens_per_s": round(self.tokens / self.elapsed, 3),
                "tau": round(1 + self.accepted / max(self.drafts, 1), 3), "tokens": self.tokens,
                "fallback_steps": self.engine.fallback_steps,
                "target_time_in_drafts_s": round(self.draft_s, 3)}


def _start_worker(draft: str, target_name: str, dtype: str, ahead: int, tree_width: int,
                  hypotheses: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(port), draft, target_name, dtype, str(ahead), "3600",
                             str(tree_width), str(hypotheses)], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the draft worker for {draft!r} did not start (exit code {proc.wait()})")
    return proc, port


def _worker_counters(client) -> dict:
    from protos import specray_pb2 as pb

    info = client._stub.Info(pb.InfoRequest(), timeout=10)
    return {"blocks_sent": info.blocks_sent, "blocks_prepared": info.hypotheses_drafted,
            "verdicts_answered_with_prepared_block": info.prepared_hits}


def run_pipeline(target_name: str, draft: str, rows: list[dict], k: int, max_tokens: int, dtype: str = "bf16",
                 threads: int = 1, chat: bool = True, tree_width: int = 1, hypotheses: int = 6) -> dict:
    """Every setup decodes every prompt, prompt-major (one prompt in all setups, then the next), so machine noise
    hits all setups alike. Greedy; the remote setups must produce exactly the in-process tokens."""
    from workers.drafters.registry import build_drafter
    from workers.engine.draft_client import InProcessDraftClient
    from workers.engine.prompting import encode_prompt
    from workers.engine.remote_draft import RemoteDraftClient
    from workers.models.loader import load_model

    torch.set_num_threads(threads)
    target = load_model(target_name, dtype)
    prompts = [encode_prompt(target.tokenizer, r["prompt"], chat=chat) for r in rows]
    if not prompts:
        raise ValueError("no prompts to run")
    procs = []
    try:
        def local(width: int) -> _Setup:
            drafter = build_drafter(draft, target, dtype=dtype, max_batch=1, tree_width=width)
            return _Setup(target, InProcessDraftClient(drafter), k, max_tokens)

        setups = {"in_process": local(1)}
        remotes = [("remote_ahead1", 1, 1, 0), ("remote_ahead2_plain", 2, 1, 0), ("remote_ahead2", 2, 1, hypotheses)]
        if tree_width > 1:
            setups[f"in_process_tree{tree_width}"] = local(tree_width)
            remotes += [(f"remote_ahead1_tree{tree_width}", 1, tree_width, 0),
                        (f"remote_ahead2_tree{tree_width}", 2, tree_width, hypotheses)]
        workers = {}
        for name, ahead, width, hyps in remotes:
            proc, port = _start_worker(draft, target_name, dtype, ahead, width, hyps)
            procs.append(proc)
            client = RemoteDraftClient(f"127.0.0.1:{port}", k=k, connect_timeout_s=60)
            setups[name] = _Setup(target, client, k, max_tokens)
            workers[name] = _worker_counters(client)
        for s in setups.values():
            s.run(-1, prompts[0], record=False)  # warm up every path (first forward, stream set-up)
        for name, s in setups.items():
            if name.startswith("remote"):  # the remote clients' counters start after the warm-up
                s.client.rpc_latencies.clear()
                s.client.wait_seconds = 0.0
                workers[name] = _worker_counters(s.client)
        for i, ids in enumerate(prompts):
            for s in setups.values():
                s.run(i, ids)
        result: dict = {"target": target_name, "draft": draft, "k": k, "dtype": dtype, "target_threads": threads,
                        "prompts": len(prompts), "max_tokens": max_tokens, "setups": {}}
        base = setups["in_process"]
        for name, s in setups.items():
            r = s.summary()
            if name.startswith("remote"):
                lat = sorted(s.client.rpc_latencies)
                r["target_wait_for_draft_s"] = round(s.client.wait_seconds, 3)
                r["verdict_to_next_block_ms"] = {
                    "p50": round(statistics.median(lat) * 1e3, 2) if lat else None,
                    "p90": round(lat[int(0.9 * (len(lat) - 1))] * 1e3, 2) if lat else None}
                r["identical_to_in_process"] = s.outputs == base.outputs
                r["draft_worker"] = {key: v - workers[name][key] for key, v in _worker_counters(s.client).items()}
                s.client.close()
            elif name != "in_process":
                r["identical_to_in_process"] = s.outputs == base.outputs
            result["setups"][name] = r
        result["ratios"] = {f"{name}_vs_in_process": round(r["tokens_per_s"] / result["setups"]["in_process"]
                                                          ["tokens_per_s"], 3)
                            for name, r in result["setups"].items() if name != "in_process"}
        tree = f"in_process_tree{tree_width}"
        for name, r in result["setups"].items():  # a remote tree against the same tree verified in process
            if name.startswith("remote") and name.endswith(f"_tree{tree_width}"):
                result["ratios"][f"{name}_vs_{tree}"] = round(r["tokens_per_s"] / result["setups"][tree]
                                                              ["tokens_per_s"], 3)
        return result
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
