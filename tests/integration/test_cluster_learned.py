"""A learned drafter in the draft pool of a local Ray cluster: the target sends its hidden states with every
verdict over gRPC, the draft replica (which loads the target's embedding and LM head for the head) drafts from
them, and greedy output over HTTP stays exactly target-only decoding (fp32)."""

from __future__ import annotations

import json
import time

import pytest
import requests

from cluster.config import load_config

pytestmark = pytest.mark.slow

K = 3
PROMPTS = ["The quick brown fox", "def add(a, b):", "Hello world! How"]
MAX_TOKENS = 20


def _reference(lm, prompt: str) -> list[int]:
    from workers.engine.engine import SpecEngine
    from workers.engine.sequence import Request

    (seq,) = SpecEngine(lm, None, max_batch=1).run([Request("ref", lm.tokenizer.encode(prompt), MAX_TOKENS,
                                                            ignore_eos=True)])
    return seq.output_ids


@pytest.fixture(scope="module")
def dspark_checkpoint(tiny_llama, tmp_path_factory):
    """A dspark head trained for a few seconds on the tiny target's own answers to the test prompts."""
    from training.train import main as train_main
    from workers.models.loader import load_model

    lm = load_model(str(tiny_llama), "fp32")
    d = tmp_path_factory.mktemp("data")
    rows = [json.dumps({"prompt_ids": lm.tokenizer.encode(p), "answer_ids": _reference(lm, p)}) for p in PROMPTS]
    (d / "train.jsonl").write_text("\n".join(rows * 3) + "\n")
    out = tmp_path_factory.mktemp("dspark")
    assert train_main(["--target", str(tiny_llama), "--drafter", "dspark", "--data", str(d), "--out", str(out),
                       "--max-steps", "40", "--eval-every", "40", "--batch-tokens", "1024", "--target-dtype",
                       "fp32", "--draft-vocab", "0", "--intermediate-size", "128", "--block-size", "4", "--lr",
                       "3e-3", "--device", "cpu", "--no-progress"]) == 0
    return out, {p: lm.tokenizer.decode(_reference(lm, p), skip_special_tokens=True) for p in PROMPTS}


@pytest.fixture(scope="module", params=[1, 3], ids=["chains", "trees"])
def cluster(tiny_llama, dspark_checkpoint, request):
    """The draft pool drafting chains, then token trees (streamed whole to the target, verified as trees)."""
    from cluster import launch

    ckpt, _ = dspark_checkpoint
    cfg = load_config(None, {
        "name": "itest-learned", "target.model": str(tiny_llama), "target.dtype": "fp32", "target.num_cpus": 0.5,
        "target.num_draft_tokens": K, "target.max_draft_wait_ms": 5000, "target.max_model_len": 512,
        "draft.drafter": f"dspark:{ckpt}", "draft.num_cpus": 0.25, "draft.tree_width": request.param,
        "router.port": 18437,
    })
    launch.start_local_ray(num_cpus=2)
    url = launch.deploy(cfg, blocking_timeout_s=300)
    yield url, cfg.served_model_name, request.param
    launch.shutdown()


def test_learned_drafter_through_the_cluster_is_exact_and_accepted(cluster, dspark_checkpoint):
    _, expected = dspark_checkpoint
    cluster, model, tree_width = cluster
    before = requests.get(cluster + "/metrics", timeout=10).text
    for p in PROMPTS:
        r = requests.post(f"{cluster}/v1/completions", json={"model": model, "prompt": p, "max_tokens": MAX_TOKENS,
                                                              "temperature": 0, "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[p]
    time.sleep(1.5)  # the router polls target counters every 0.5 s
    after = requests.get(cluster + "/metrics", timeout=10).text

    def delta(name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in after.splitlines() if line.startswith(name)) - sum(
            float(line.rsplit(" ", 1)[1]) for line in before.splitlines() if line.startswith(name))

    drafts, drafted = delta("vllm:spec_decode_num_drafts_total"), delta("vllm:spec_decode_num_draft_tokens_total")
    accepted = delta("vllm:spec_decode_num_accepted_tokens_total")
    # the head was trained on these answers: over half of each chain accepted; a tree's nodes are counted as drafted
    # tokens, only one path of them can be accepted, so for trees: over half of a K-token chain per draft
    bound = 0.5 * drafted if tree_width == 1 else 0.5 * K * drafts
    assert drafted > 0 and accepted > bound, (drafts, drafted, accepted)
