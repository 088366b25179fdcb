"""The disaggregated path on a local Ray: router (Serve ingress) -> target pool -> draft pool over gRPC.

One Ray instance and one application for the module (Ray start + deploy cost ~40 s here). The draft pool runs the
target model itself as its drafter (draft == target), so every draft token must be accepted: tau == k + 1 through
the distributed, pipelined path catches off-by-ones in positions, epochs and run-ahead. Both gRPC hops run over
mutual TLS (config `tls`, certificates from `specray tls-certs`): a replica that ignored it could not talk to the
others, and `_target_info` below gets nothing from a replica without a certificate.
"""

from __future__ import annotations

import threading
import time

import pytest
import requests

from cluster.config import load_config

pytestmark = pytest.mark.slow

K = 3
APP = "itest"


def _metric(text: str, name: str) -> float:
    """Sum of a sample over its labels; a name the page does not expose fails (a misspelt name reads as 0)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"/metrics has no sample named {name}"
    return total


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    from cluster import launch
    from cluster.tls import write_certs

    port = 18431
    tls = write_certs(tmp_path_factory.mktemp("tls"))
    cfg = load_config(None, {
        "tls": tls, "name": APP, "target.model": str(tiny_llama), "target.dtype": "fp32", "target.num_cpus": 0.5,
        "target.num_draft_tokens": K, "target.max_draft_wait_ms": 5000, "target.max_model_len": 1024,
        "draft.drafter": f"model:{tiny_llama}", "draft.dtype": "fp32", "draft.num_cpus": 0.25,  # as the target's
        "router.port": port,
    })
    launch.start_local_ray(num_cpus=2)
    url = launch.deploy(cfg, blocking_timeout_s=300)
    yield {"url": url, "cfg": cfg}
    launch.shutdown()


def _reference(tiny_llama, prompt: str, max_tokens: int) -> list[int]:
    from workers.engine.engine import SpecEngine
    from workers.engine.sequence import Request
    from workers.models.loader import load_model

    lm = load_model(str(tiny_llama), "fp32")
    (seq,) = SpecEngine(lm, None, max_batch=1).run([Request("ref", lm.tokenizer.encode(prompt), max_tokens)])
    return seq.output_ids


def _complete(url: str, prompt: str, max_tokens: int, **kw) -> dict:
    r = requests.post(f"{url}/v1/completions", json={"model": kw.pop("model", None) or "x", "prompt": prompt,
                                                     "max_tokens": max_tokens, "temperature": 0, **kw}, timeout=120)
    return r


def test_greedy_over_http_matches_in_process_and_tau_is_k_plus_1(cluster, tiny_llama):
    from openai import OpenAI

    url = cluster["url"]
    model = cluster["cfg"].served_model_name
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=120)
    assert [m.id for m in client.models.list().data] == [model]
    before = requests.get(url + "/metrics", timeout=10).text
    prompts = ["The quick brown fox", "def add(a, b):", "Hello world! How"]
    max_tokens = 1 + (K + 1) * 6  # whole blocks only: the engine caps k near max_tokens
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for p in prompts:
        r = client.completions.create(model=model, prompt=p, max_tokens=max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
        ref = _reference(tiny_llama, p, max_tokens)
        assert r.choices[0].text == tok.decode(ref, skip_special_tokens=True)
        assert r.usage.completion_tokens == max_tokens
    # Every committed token is counted once: one per prefill, one per draft-less step, accepted + 1 per draft;
    # the exception is a sequence's last step when only one token was left (k capped to 0 by max_tokens), which
    # happens after a short draft: a block the draft worker salvaged after a verdict overtook it (the draft's guess
    # at the target's bonus token can lose a near-tie to batched numerics), or a draft-less step on a loaded machine.
    n_seq, total = len(prompts), len(prompts) * max_tokens
    deadline, last = time.monotonic() + 30, None
    while True:  # the router polls target counters every 0.5 s: wait until they cover every committed token
        after = requests.get(url + "/metrics", timeout=10).text
        counts = tuple(_metric(after, name) - _metric(before, name)
                       for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_draft_tokens_total",
                                    "vllm:spec_decode_num_accepted_tokens_total", "specray:fallback_steps_total"))
        drafts, drafted, accepted, fallback = counts
        capped = total - (n_seq + fallback + drafts + accepted)
        if capped == 0 or (counts == last and 0 <= capped <= n_seq) or time.monotonic() > deadline:
            break
        last = counts
        time.sleep(1.0)
    assert drafts > 0 and accepted == drafted, (drafts, drafted, accepted)  # draft == target: all accepted
    assert 0 <= capped <= n_seq, (drafts, accepted, fallback)
    short = K * drafts - drafted  # draft tokens missing from full blocks
    if fallback == 0 and short == 0:
        assert capped == 0 and 1 + accepted / drafts == K + 1
    else:  # each short draft or plain step shifts the blocks; a shifted sequence can end on a capped block
        assert capped <= short + fallback and short <= K * (fallback + n_seq), (drafts, drafted, fallback)


def test_streaming_chat_and_stream_equals_non_stream(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=cluster["url"] + "/v1", api_key="unused", timeout=120)
    model = cluster["cfg"].served_model_name
    msgs = [{"role": "user", "content": "Hello world!"}]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text == full.choices[0].message.content
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_bad_input_is_a_clear_400_not_a_500(cluster):
    url = cluster["url"]
    r = requests.post(url + "/v1/completions", data=b"{not json", headers={"Content-Type": "application/json"},
                      timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    r = _complete(url, "hi", 10**6, model=cluster["cfg"].served_model_name)
    assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
    r = _complete(url, "hi", 5, model="no-such-model")
    assert r.status_code == 404


def _target_info(cfg):
    from ray import serve

    from cluster.registry import lister
    from protos import specray_pb2 as pb
    from protos import specray_pb2_grpc as pb_grpc
    import grpc

    from workers.wire import open_channel

    del serve
    tls = cfg.tls.load()
    infos = []
    for addr in lister(cfg.name, "target")():
        with open_channel(addr, tls) as ch:
            infos.append(pb_grpc.TargetServiceStub(ch).Info(pb.InfoRequest(), timeout=5))
        with grpc.insecure_channel(addr) as ch, pytest.raises(grpc.RpcError):  # no certificate: refused
            pb_grpc.TargetServiceStub(ch).Info(pb.InfoRequest(), timeout=5)
    drafts = []
    for addr in lister(cfg.name, "draft")():
        with open_channel(addr, tls) as ch:
            drafts.append(pb_grpc.DraftServiceStub(ch).Info(pb.InfoRequest(), timeout=5))
        with grpc.insecure_channel(addr) as ch, pytest.raises(grpc.RpcError):
            pb_grpc.DraftServiceStub(ch).Info(pb.InfoRequest(), timeout=5)
    return infos, drafts


def test_client_disconnect_frees_the_sequence_on_target_and_draft(cluster):
    url, cfg = cluster["url"], cluster["cfg"]
    body = {"model": cfg.served_model_name, "prompt": "The quick brown fox", "max_tokens": 900, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        infos, drafts = _target_info(cfg)
        assert sum(i.running for i in infos) == 1
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        infos, drafts = _target_info(cfg)
        if sum(i.running + i.waiting for i in infos) == 0 and sum(d.active_sequences for d in drafts) == 0:
            break
        time.sleep(0.2)
    assert sum(i.running + i.waiting for i in infos) == 0
    assert sum(d.active_sequences for d in drafts) == 0


def test_killing_the_draft_replica_mid_stream_keeps_output_identical(cluster, tiny_llama):
    import ray

    url, cfg = cluster["url"], cluster["cfg"]
    prompt, n = "def add(a, b):", 700
    ref = _reference(tiny_llama, prompt, n)
    body = {"model": cfg.served_model_name, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "ignore_eos": True}
    killed = threading.Event()

    def kill_draft():
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "draft" in a["name"]
                 and "SERVE_REPLICA" in a["name"]]
        assert names, "no draft replica actor found"
        for a in names:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
        killed.set()

    text, got_tokens = "", 0
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            import json

            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text += chunk["choices"][0]["text"]
                got_tokens += 1
            if got_tokens == 5 and not killed.is_set():
                kill_draft()
    assert killed.is_set()
    from transformers import AutoTokenizer

    assert text == AutoTokenizer.from_pretrained(tiny_llama).decode(ref, skip_special_tokens=True)


def test_tp2_target_replica_over_http_matches_in_process(cluster, tiny_llama):
    """A second application whose target replica is a TP=2 group (rank 0 = the Serve replica, rank 1 an actor in
    its placement group, gloo): greedy output over HTTP equals in-process target-only output."""
    from cluster import launch
    from ray import serve

    port = 18431  # the module's Serve proxy; this app lives under its own route prefix
    cfg = load_config(None, {
        "router.route_prefix": "/tp",
        "name": "itesttp", "target.model": str(tiny_llama), "target.dtype": "fp32", "target.num_cpus": 0.25,
        "target.tp": 2, "target.num_draft_tokens": K, "target.max_model_len": 1024, "draft.drafter": "ngram",
        "draft.num_cpus": 0.1, "router.port": port, "router.num_cpus": 0.1,
    })
    url = launch.deploy(cfg, blocking_timeout_s=300)
    try:
        for p in ["The quick brown fox", "1 + 1 = 2, 2 +"]:
            r = _complete(url, p, 30, model=cfg.served_model_name, ignore_eos=True)
            assert r.status_code == 200, r.text
            from transformers import AutoTokenizer

            ref = _reference(tiny_llama, p, 30)
            assert r.json()["choices"][0]["text"] == AutoTokenizer.from_pretrained(tiny_llama).decode(
                ref, skip_special_tokens=True)
    finally:
        serve.delete(cfg.name)
