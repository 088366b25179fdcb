"""Learned drafters (mtp1, eagle, dspark) on a tiny random target: training, checkpoints, exactness, serving.

A session fixture writes greedy answers of the tiny target and trains each kind for a few dozen steps on them
(seconds). The trained heads must then be *useful* on the sequences they were trained on (tau well above 1 through
the engine, which proves the serving path reads features the way training does), and every head, trained or
random, must leave greedy output identical to target-only decoding.
"""

from __future__ import annotations

import json

import pytest
import torch

from training.objective import judged_positions
from training.train import main as train_main
from workers.drafters.base import DraftRequest
from workers.drafters.learned import LearnedDrafter, load_head, save_head
from workers.drafters.registry import build_drafter
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.remote_draft import RemoteDraftClient
from workers.engine.sequence import Request
from workers.models.loader import load_model
from workers.params import SamplingParams
from workers.servers.draft_server import serve_draft
from workers.wire import free_port

KINDS = ("mtp1", "eagle", "dspark")
PROMPTS = ["The quick brown fox", "def add(a, b):", "Hello world", "1 + 1 = 2", "Once upon a time", "x = [1, 2,"]
MAX_LEN = 256

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), "fp32")


def _engine(target, drafter, max_batch=8):
    return SpecEngine(target, InProcessDraftClient(drafter) if drafter else None, max_batch=max_batch,
                      max_model_len=MAX_LEN)


def _requests(prompt_ids, k, max_tokens=30, **kw):
    return [Request(f"r{i}", list(p), max_tokens=max_tokens, num_draft_tokens=k, ignore_eos=True, **kw)
            for i, p in enumerate(prompt_ids)]


@pytest.fixture(scope="module")
def data_dir(target, tmp_path_factory):
    """Greedy answers of the tiny target: what `specray data` writes (train and held-out rows)."""
    d = tmp_path_factory.mktemp("data")
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    seqs = _engine(target, None).run(_requests(ids, 0, max_tokens=40))
    rows = [json.dumps({"prompt_ids": p, "answer_ids": s.output_ids}) for p, s in zip(ids, seqs)]
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    (d / "heldout.jsonl").write_text("\n".join(rows[:2]) + "\n")
    return d


def _train(tiny_llama, data_dir, out, kind, steps, *extra):
    return train_main(["--target", str(tiny_llama), "--drafter", kind, "--data", str(data_dir), "--out", str(out),
                       "--max-steps", str(steps), "--batch-tokens", "2048", "--eval-every", str(steps),
                       "--target-dtype", "fp32", "--draft-vocab", "0", "--lr", "3e-3", "--block-size",
                       "1" if kind == "mtp1" else "4", "--intermediate-size", "128", "--device", "cpu",
                       "--no-progress", *extra])


@pytest.fixture(scope="module")
def trained(tiny_llama, data_dir, tmp_path_factory):
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        assert _train(tiny_llama, data_dir, path, kind, 40) == 0
        out[kind] = path
    return out


def test_training_lowers_the_loss_and_writes_a_checkpoint(trained):
    for kind, path in trained.items():
        args = json.loads((path / "training_args.json").read_text())
        assert args["steps"] == 40 and args["drafter"] == kind
        assert {"config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
        assert args["eval"]["acc0"] > 0.9, (kind, args["eval"])  # it learned the target's continuations


def test_loss_decreases_within_a_few_steps(tiny_llama, data_dir, tmp_path, capsys):
    _train(tiny_llama, data_dir, tmp_path / "a", "dspark", 2)
    first = json.loads((tmp_path / "a" / "training_args.json").read_text())["eval"]["loss"]
    _train(tiny_llama, data_dir, tmp_path / "b", "dspark", 15)
    later = json.loads((tmp_path / "b" / "training_args.json").read_text())["eval"]["loss"]
    assert later < 0.8 * first


def test_checkpoint_round_trip(trained, target):
    head = load_head(trained["dspark"])
    head.attach(target.model)
    again = trained["dspark"].parent / "copy"
    save_head(head, again)
    head2 = load_head(again)
    for (k1, v1), (k2, v2) in zip(head.state_dict().items(), head2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_resume_continues_exactly(tiny_llama, data_dir, tmp_path):
    _train(tiny_llama, data_dir, tmp_path / "straight", "eagle", 6)
    _train(tiny_llama, data_dir, tmp_path / "resumed", "eagle", 6, "--stop-after", "3")
    _train(tiny_llama, data_dir, tmp_path / "resumed", "eagle", 6, "--resume")
    a = torch.load(tmp_path / "straight" / "state" / "trainer_state.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "state" / "trainer_state.pt", weights_only=False)
    assert b["step"] == 6
    for k in a["head"]:
        torch.testing.assert_close(a["head"][k], b["head"][k], rtol=1e-5, atol=1e-6)


def test_feature_cache_trains_the_same_head(tiny_llama, data_dir, tmp_path, capsys):
    # 3 epochs of one batch: the first fills the cache, the others read it; the weights must match online features
    _train(tiny_llama, data_dir, tmp_path / "online", "eagle", 3)
    _train(tiny_llama, data_dir, tmp_path / "cached", "eagle", 3, "--feature-cache", str(tmp_path / "fc"))
    assert "feature cache" in capsys.readouterr().out
    shards = list((tmp_path / "fc").glob("batch-*.safetensors"))
    assert len(shards) == 1  # one batch, written once, read twice
    a = torch.load(tmp_path / "online" / "state" / "trainer_state.pt", weights_only=False)["head"]
    b = torch.load(tmp_path / "cached" / "state" / "trainer_state.pt", weights_only=False)["head"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_output_is_exactly_target_only(target, trained, kind, k):
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    ref = [s.output_ids for s in _engine(target, None).run(_requests(ids, 0))]
    drafter = build_drafter(f"{kind}:{trained[kind]}", target, max_batch=8, max_model_len=MAX_LEN)
    seqs = _engine(target, drafter).run(_requests(ids, k))
    assert [s.output_ids for s in seqs] == ref
    # trained on these very continuations, the drafter must actually be used and accepted
    assert sum(s.num_accepted_tokens for s in seqs) > 0.5 * sum(s.num_draft_tokens for s in seqs)


@pytest.mark.parametrize("kind", KINDS)
def test_an_untrained_head_is_still_exact(target, tiny_llama, data_dir, tmp_path, kind):
    _train(tiny_llama, data_dir, tmp_path, kind, 0 + 1, "--lr", "1e-9")
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    ref = [s.output_ids for s in _engine(target, None, max_batch=3).run(_requests(ids, 0))]
    drafter = build_drafter(f"{kind}:{tmp_path}", target, max_batch=3, max_model_len=MAX_LEN)
    assert [s.output_ids for s in _engine(target, drafter, max_batch=3).run(_requests(ids, 3))] == ref


def test_confidence_is_a_probability_and_tracks_acceptance(target, trained):
    drafter = build_drafter(f"dspark:{trained['dspark']}", target, max_batch=2, max_model_len=MAX_LEN)
    eng = _engine(target, drafter, max_batch=2)
    seen = []
    orig = drafter.propose

    def spy(reqs):
        out = orig(reqs)
        seen.extend(c for p in out for c in (p.confidence or []))
        return out

    drafter.propose = spy
    eng.run(_requests([target.tokenizer.encode(p) for p in PROMPTS[:2]], 4))
    assert seen and all(0.0 <= c <= 1.0 for c in seen)


@pytest.mark.parametrize("kind", ["eagle", "dspark"])
def test_a_draft_ends_where_its_predicted_survival_falls_below_the_bar(target, trained, kind):
    """min_confidence cuts each proposal right after the token whose cumulative confidence drops below the bar:
    a prefix of the uncut proposal, as long as the confidences say, never changing the output."""
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    ref = [s.output_ids for s in _engine(target, None).run(_requests(ids, 0))]
    proposals, longest = {}, 0
    for bar in (0.0, 0.5, 1.0):
        drafter = build_drafter(f"{kind}:{trained[kind]}", target, max_batch=8, max_model_len=MAX_LEN,
                                min_confidence=bar)
        assert drafter.min_confidence == bar
        longest = min(5, drafter.max_draft_tokens)  # a dspark block is at most its trained size
        got = proposals[bar] = []
        orig = drafter.propose
        drafter.propose = lambda r, orig=orig, got=got: got.extend(zip([x.k for x in r], orig(r))) or [
            p for _, p in got[-len(r):]]
        seqs = _engine(target, drafter).run(_requests(ids, 5))
        assert [s.output_ids for s in seqs] == ref
    for _, p in proposals[0.0]:
        assert p.confidence is not None and len(p.confidence) == len(p.tokens)
        assert all(0.0 <= c <= 1.0 for c in p.confidence)
    cut = 0
    for k, p in proposals[0.5]:
        survive = [float(torch.tensor(p.confidence[:i + 1]).prod()) for i in range(len(p.tokens))]
        assert all(s >= 0.5 for s in survive[:-1])  # every token before the last kept the bar
        assert len(p.tokens) == min(k, longest) or survive[-1] < 0.5  # it stopped only where it fell under
        cut += len(p.tokens) < min(k, longest)
    assert cut > 0 and max(len(p.tokens) for _, p in proposals[0.0]) == longest
    assert {len(p.tokens) for _, p in proposals[1.0] if p.tokens} == {1}  # nothing is certain: one per draft
    with pytest.raises(ValueError, match="min_confidence"):
        build_drafter(f"{kind}:{trained[kind]}", target, min_confidence=1.5)


@pytest.mark.parametrize("kind", ["eagle", "dspark"])
def test_running_ahead_continues_the_same_draft(target, trained, kind):
    """Tokens a draft worker assumed (past the target's features) are fed as if drafted: proposing after
    [ctx + d1 d2] gives d3 d4 of the proposal made after ctx (full blocks: no survival bar)."""
    drafter = build_drafter(f"{kind}:{trained[kind]}", target, max_batch=2, max_model_len=MAX_LEN, min_confidence=0)
    eng = _engine(target, drafter, max_batch=1)
    ids = target.tokenizer.encode(PROMPTS[0])
    (seq,) = eng.run([Request("warm", list(ids), max_tokens=5, num_draft_tokens=0, ignore_eos=True)])
    drafter.add_sequence("s", SamplingParams())
    ctx = list(ids) + seq.output_ids[:1]
    from training.features import FeatureExtractor

    feats, _ = FeatureExtractor(target.model, list(drafter.feature_layers))(torch.tensor([ctx]), [len(ctx)])
    drafter.observe_target_features("s", 0, feats[0, : len(ctx) - 1])
    full = drafter.propose([DraftRequest("s", ctx, 4)])[0].tokens
    assert len(full) == 4
    rest = drafter.propose([DraftRequest("s", ctx + full[:2], 2)])[0].tokens
    assert rest == full[2:]


def test_sampled_proposals_are_distributions_over_the_full_vocabulary(target, trained):
    drafter = build_drafter(f"dspark:{trained['dspark']}", target, max_batch=2, max_model_len=MAX_LEN)
    ids = [target.tokenizer.encode(p) for p in PROMPTS[:2]]
    reqs = _requests(ids, 4, params=SamplingParams(temperature=1.0, seed=3))
    got = []
    orig = drafter.propose
    drafter.propose = lambda r: got.extend(orig(r)) or got[-len(r):]
    seqs = _engine(target, drafter, max_batch=2).run(reqs)
    assert all(len(s.output_ids) == 30 for s in seqs)
    probs = [p.probs for p in got if p.tokens]
    assert probs and all(p.shape[-1] == target.vocab_size for p in probs)
    for p in probs:
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]), atol=1e-4, rtol=0)


def test_bare_kind_needs_a_shipped_checkpoint(target):
    with pytest.raises(ValueError, match="no dspark drafter is shipped"):
        build_drafter("dspark", target)


def test_a_checkpoint_for_another_target_is_refused(trained, target, tmp_path):
    cfg = json.loads((trained["mtp1"] / "config.json").read_text())
    cfg["hidden_size"] += 8
    import shutil

    shutil.copytree(trained["mtp1"], tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError):
        build_drafter(f"mtp1:{tmp_path / 'bad'}", target)


@pytest.mark.parametrize("kind,width,ahead", [("dspark", 1, 1), ("dspark", 3, 1), ("eagle", 3, 2)])
def test_remote_draft_worker_serves_a_learned_drafter_exactly(target, trained, kind, width, ahead):
    """Through the gRPC draft stream (features sent with each verdict; token trees streamed whole; with and without
    run-ahead): output identical."""
    ids = [target.tokenizer.encode(p) for p in PROMPTS[:4]]
    ref = [s.output_ids for s in _engine(target, None, max_batch=4).run(_requests(ids, 0))]
    head = load_head(trained[kind])
    head.attach(target.model)
    drafter = LearnedDrafter(head, max_batch=8, max_model_len=MAX_LEN, tree_width=width)
    server, worker, port = serve_draft(drafter, kind, ahead_blocks=ahead)
    trees, send = [], worker._send_block
    worker._send_block = lambda st, block: (trees.append(len(block.parents) > 0), send(st, block))
    client = RemoteDraftClient(f"127.0.0.1:{port}", k=4, max_wait_s=2.0)
    try:
        assert client.feature_layers == tuple(head.cfg.feature_layers)
        engine = SpecEngine(target, client, max_batch=4, max_model_len=MAX_LEN)
        seqs = engine.run(_requests(ids, 4))
        assert [s.output_ids for s in seqs] == ref
        assert sum(s.num_accepted_tokens for s in seqs) > 0
        assert any(trees) == (width > 1), sum(trees)  # trees went over the wire whole
    finally:
        client.close()
        worker.stop()
        server.stop(0)


@pytest.mark.slow
def test_data_parallel_training_with_torchrun(tiny_llama, data_dir, tmp_path):
    """Two gloo ranks under torchrun: both step, rank 0 writes one checkpoint, and it is a working drafter."""
    import os
    import subprocess
    import sys

    import signal

    port = free_port()  # for the rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "training.train", "--target", str(tiny_llama), "--drafter", "mtp1", "--data", str(data_dir),
           "--out", str(tmp_path / "ddp"), "--max-steps", "4", "--eval-every", "4", "--batch-tokens", "512",
           "--target-dtype", "fp32", "--draft-vocab", "0", "--intermediate-size", "64", "--device", "cpu",
           "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # a hang: stop the launcher and both ranks, not just the launcher
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    args = json.loads((tmp_path / "ddp" / "training_args.json").read_text())
    assert args["steps"] == 4
    load_head(tmp_path / "ddp")


@pytest.mark.slow
def test_training_on_ray_train(tiny_llama, data_dir, tmp_path, monkeypatch):
    """`--ray-workers 2`: Ray Train runs the same loop on two workers and rank 0 writes the checkpoint."""
    import ray

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    try:
        assert _train(tiny_llama, data_dir, tmp_path / "ray", "mtp1", 4, "--ray-workers", "2") == 0
    finally:
        ray.shutdown()
    assert json.loads((tmp_path / "ray" / "training_args.json").read_text())["steps"] == 4
    load_head(tmp_path / "ray")


def test_the_confidence_head_learns_only_where_verification_would_judge():
    """A block position counts for the confidence loss only when every earlier position is right: serving
    multiplies the confidences into P(all accepted so far), so each must be P(accepted | earlier accepted)."""
    correct = torch.tensor([[True, True, False, True],   # a miss at 2: 3 is never judged
                            [False, True, True, True],   # a miss at 0: only 0 is judged
                            [True, True, True, True]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, True, True, False]])  # row 2 runs past the sequence
    judged = judged_positions(correct, valid)
    assert judged.tolist() == [[True, True, True, False], [True, False, False, False], [True, True, True, False]]
    assert judged_positions(correct[:, :1], valid[:, :1]).all()  # the first position is always judged


def test_expected_calibration_error():
    from training.eval import expected_calibration_error

    g = torch.Generator().manual_seed(0)
    conf = torch.rand(20000, generator=g)
    calibrated = [(float(c), int(u < c)) for c, u in zip(conf, torch.rand(20000, generator=g))]
    overconfident = [(min(1.0, float(c) + 0.3), y) for c, y in calibrated]  # negative control
    assert expected_calibration_error(calibrated) < 0.02
    assert expected_calibration_error(overconfident) > 0.2
    assert expected_calibration_error([]) is None


def test_eval_command_reports_every_drafter_and_plots(target, trained, tiny_llama, tmp_path, capsys):
    from cluster.cli import main as cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS[:3])))
    rc = cli(["eval", "--target", str(tiny_llama), "--dtype", "fp32", "--draft", f"mtp1:{trained['mtp1']}",
              "--draft", f"dspark:{trained['dspark']}", "--prompts", str(prompts), "--k", "4", "--max-tokens", "12",
              "--no-chat", "--json", str(tmp_path / "e.json"), "--rows", str(tmp_path / "r.jsonl"),
              "--plot", str(tmp_path / "a.png")])
    assert rc == 0
    res = json.loads((tmp_path / "e.json").read_text())
    d = res["drafters"]
    assert set(d) == {"none", f"mtp1:{trained['mtp1']}", f"dspark:{trained['dspark']}"}
    assert d["none"]["speedup"] == 1.0 and d["none"]["tau"] == 1.0
    dspark = d[f"dspark:{trained['dspark']}"]
    assert len(dspark["acceptance_per_pos"]) == 4 and 0 <= dspark["calibration_ece"] <= 1
    assert d[f"mtp1:{trained['mtp1']}"]["acceptance_per_pos"][1:] == [0.0, 0.0, 0.0]  # mtp1 drafts one token
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and {r["draft"] for r in rows} == set(d)
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_several_drafters_train_together_on_shared_features(tiny_llama, data_dir, tmp_path, target):
    assert train_main(["--target", str(tiny_llama), "--drafter", "mtp1,dspark", "--data", str(data_dir), "--out",
                       str(tmp_path), "--max-steps", "3", "--eval-every", "3", "--batch-tokens", "2048",
                       "--target-dtype", "fp32", "--draft-vocab", "0", "--intermediate-size", "64",
                       "--block-size", "4", "--device", "cpu", "--no-progress"]) == 0
    for kind in ("mtp1", "dspark"):
        args = json.loads((tmp_path / kind / "training_args.json").read_text())
        assert args["drafter"] == kind and args["steps"] == 3 and args["eval"] is not None
        assert build_drafter(f"{kind}:{tmp_path / kind}", target).kind == kind
    with pytest.raises(ValueError, match="expected one or more"):
        train_main(["--drafter", "mtp1,medusa", "--data", str(data_dir), "--out", str(tmp_path / "x")])


def test_eval_sweeps_the_survival_bar_of_eagle_and_dspark(trained, tiny_llama, tmp_path):
    from cluster.cli import main as cli

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "prompt": p}) for i, p in enumerate(PROMPTS[:2])))
    rc = cli(["eval", "--target", str(tiny_llama), "--dtype", "fp32", "--draft", f"mtp1:{trained['mtp1']}",
              "--draft", f"eagle:{trained['eagle']}", "--draft", f"dspark:{trained['dspark']}@1", "--prompts",
              str(prompts), "--k", "4", "--max-tokens", "12", "--no-chat", "--min-confidence", "0,1",
              "--json", str(tmp_path / "e.json")])
    assert rc == 0
    d = json.loads((tmp_path / "e.json").read_text())["drafters"]
    eagle, dspark = f"eagle:{trained['eagle']}", f"dspark:{trained['dspark']}@1"
    # mtp1 has no bar to sweep, dspark brought its own
    assert set(d) == {"none", f"mtp1:{trained['mtp1']}", f"{eagle}@0", f"{eagle}@1", dspark}
    for name in (f"{eagle}@1", dspark):
        assert d[name]["acceptance_per_pos"][1:] == [0.0, 0.0, 0.0]  # a bar of 1 leaves one token per draft
    assert sum(d[f"{eagle}@0"]["acceptance_per_pos"][1:]) > 0
    with pytest.raises(SystemExit):
        cli(["eval", "--draft", "eagle", "--prompts", str(prompts), "--min-confidence", "0,2"])


def test_init_continues_from_a_trained_head(tiny_llama, data_dir, trained, tmp_path):
    from safetensors.torch import load_file

    start = load_file(str(trained["eagle"] / "model.safetensors"))
    # lr 0: one step changes nothing, so the checkpoint written is exactly the one it started from
    _train(tiny_llama, data_dir, tmp_path / "init", "eagle", 1, "--init", str(trained["eagle"]), "--lr", "0")
    _train(tiny_llama, data_dir, tmp_path / "fresh", "eagle", 1, "--lr", "0")
    init = load_file(str(tmp_path / "init" / "model.safetensors"))
    fresh = load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert init.keys() == start.keys()
    for k in start:
        assert torch.equal(init[k], start[k]), k
    assert any(not torch.equal(fresh[k], start[k]) for k in start if start[k].is_floating_point())  # control
    args = json.loads((tmp_path / "init" / "training_args.json").read_text())
    assert args["init"] == str(trained["eagle"])
    with pytest.raises(ValueError, match="of kind eagle, not mtp1"):
        _train(tiny_llama, data_dir, tmp_path / "wrong", "mtp1", 1, "--init", str(trained["eagle"]))
    with pytest.raises(ValueError, match="no dspark checkpoint"):
        _train(tiny_llama, data_dir, tmp_path / "missing", "dspark", 1, "--init", str(tmp_path / "nowhere"))


def test_dspark_serving_block_equals_the_training_path(target, trained):
    """Serving runs the context update and the block's mask positions as ONE head pass in the slot cache; it must
    compute what training computes with `context` + `block`: the anchor's output and every block position, also
    when the context is already cached and only the block is fed."""
    from training.features import FeatureExtractor

    drafter = build_drafter(f"dspark:{trained['dspark']}", target, max_batch=2, max_model_len=MAX_LEN,
                            min_confidence=0)
    head = drafter.head
    ctx = target.tokenizer.encode(PROMPTS[1]) + target.tokenizer.encode(PROMPTS[0])
    feats, _ = FeatureExtractor(target.model, list(drafter.feature_layers))(torch.tensor([ctx]), [len(ctx)])
    drafter.add_sequence("s", SamplingParams())
    drafter.observe_target_features("s", 0, feats[0, : len(ctx) - 1])
    st, a, K = drafter.states["s"], len(ctx) - 2, head.cfg.block_size
    with torch.inference_mode():
        y, kvs = head.context(head.context_inputs(feats[:, : a + 1], torch.tensor([ctx[1 : a + 2]])))
        blk = head.block(head.mask_embed[: K - 1][None, None], kvs, torch.tensor([[a]]))
        ref = torch.cat([y[0, a][None], blk[0, 0]])  # [K, d]
        for _ in range(2):  # fresh slot; then the same context again, already cached
            out = drafter._block_outputs([ctx], [st], [a], [K])
            torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)
            drafter.cache.rollback(st.slot, a + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_learned_drafters_on_an_fp16w_target_stay_exact(tiny_llama, trained, kind):
    """fp16w (fp16 weights packed for fbgemm, workers/models/packed.py): the head scores its draft vocabulary with
    packed rows too, and greedy output still equals the fp16w target's own."""
    from workers.models.packed import fp16w_supported

    if not fp16w_supported():
        pytest.skip("this torch build has no fbgemm (not x86-64)")
    target = load_model(str(tiny_llama), "fp16w")
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    ref = [s.output_ids for s in _engine(target, None).run(_requests(ids, 0))]
    drafter = build_drafter(f"{kind}:{trained[kind]}", target, max_batch=8, max_model_len=MAX_LEN)
    assert drafter.head._lm_packed is not None
    seqs = _engine(target, drafter).run(_requests(ids, 4))
    assert [s.output_ids for s in seqs] == ref
    assert sum(s.num_accepted_tokens for s in seqs) > 0.5 * sum(s.num_draft_tokens for s in seqs)
