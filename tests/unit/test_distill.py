"""`specray train --drafter model`: a small LM distilled from the target, served as `model:PATH`."""

from __future__ import annotations

import json

import pytest
import torch

from training.distill import build_student, spaced_layers
from training.train import main as train_main
from workers.drafters.registry import build_drafter
from workers.engine.draft_client import InProcessDraftClient
from workers.engine.engine import SpecEngine
from workers.engine.sequence import Request
from workers.models.loader import load_model

PROMPTS = ["The quick brown fox", "def add(a, b):", "Hello world", "1 + 1 = 2", "Once upon a time", "x = [1, 2,"]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), "fp32")


def _run(target, drafter, ids, k):
    engine = SpecEngine(target, InProcessDraftClient(drafter) if drafter else None, max_batch=8, max_model_len=256)
    return engine.run([Request(f"r{i}", list(p), max_tokens=30, num_draft_tokens=k, ignore_eos=True)
                       for i, p in enumerate(ids)])


@pytest.fixture(scope="module")
def data_dir(target, tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    seqs = _run(target, None, ids, 0)
    rows = [json.dumps({"prompt_ids": p, "answer_ids": s.output_ids}) for p, s in zip(ids, seqs)]
    (d / "train.jsonl").write_text("\n".join(rows) + "\n")
    (d / "heldout.jsonl").write_text("\n".join(rows[:2]) + "\n")
    return d


def _distill(tiny, data_dir, out, steps, *extra):
    return train_main(["--target", str(tiny), "--drafter", "model", "--data", str(data_dir), "--out", str(out),
                       "--max-steps", str(steps), "--eval-every", str(steps), "--batch-tokens", "2048",
                       "--target-dtype", "fp32", "--lr", "3e-3", "--device", "cpu", "--no-progress", *extra])


def test_spaced_layers():
    assert spaced_layers(30, 4) == [0, 10, 19, 29]
    assert spaced_layers(30, 1) == [29] and spaced_layers(2, 2) == [0, 1]
    with pytest.raises(ValueError, match="student-layers"):
        spaced_layers(2, 3)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_a_student_with_every_layer_is_the_target(tiny_models, family):
    lm = load_model(str(tiny_models[family]), "fp32")
    n = lm.model.args.num_layers
    student, cfg = build_student(lm.model, lm.path, n)
    tokens = torch.tensor([lm.tokenizer.encode("Hello world! How are you today?")])
    outs = []
    for m in (lm.model, student):
        outs.append(m(tokens, m.new_cache(1, tokens.shape[1]), [0]).logits)
    torch.testing.assert_close(outs[0], outs[1])
    cut, cfg = build_student(lm.model, lm.path, 1)
    assert cut.args.num_layers == 1 and cfg["specray_student"]["layers_from_target"] == [n - 1]
    if "layer_types" in cfg:
        assert cfg["layer_types"] == [json.loads((lm.path / "config.json").read_text())["layer_types"][-1]]


def test_distilled_model_learns_and_serves_exactly(target, tiny_llama, data_dir, tmp_path, capsys):
    assert _distill(tiny_llama, data_dir, tmp_path / "early", 1, "--student-layers", "1") == 0
    assert _distill(tiny_llama, data_dir, tmp_path / "m", 150, "--student-layers", "1") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    early = json.loads((tmp_path / "early" / "training_args.json").read_text())["eval"]
    late = json.loads((tmp_path / "m" / "training_args.json").read_text())["eval"]
    assert result["drafter"] == "model" and result["steps"] == 150
    assert late["loss"] < 0.5 * early["loss"] and late["acc0"] > 0.9, (early, late)
    # an ordinary model directory: `model:PATH` serves it, greedy output stays the target's, drafts get accepted
    ids = [target.tokenizer.encode(p) for p in PROMPTS]
    ref = [s.output_ids for s in _run(target, None, ids, 0)]
    drafter = build_drafter(f"model:{tmp_path / 'm'}", target, max_batch=8, max_model_len=256)
    seqs = _run(target, drafter, ids, 4)
    assert [s.output_ids for s in seqs] == ref
    assert sum(s.num_accepted_tokens for s in seqs) > 0.6 * sum(s.num_draft_tokens for s in seqs)
    student = load_model(str(tmp_path / "m"), "fp32")
    assert student.model.args.num_layers == 1 and student.tokenizer.encode("Hello") == target.tokenizer.encode("Hello")


def test_distill_resume_continues_exactly(tiny_llama, data_dir, tmp_path):
    _distill(tiny_llama, data_dir, tmp_path / "straight", 6, "--student-layers", "1")
    _distill(tiny_llama, data_dir, tmp_path / "resumed", 6, "--student-layers", "1", "--stop-after", "3")
    _distill(tiny_llama, data_dir, tmp_path / "resumed", 6, "--student-layers", "1", "--resume")
    a = torch.load(tmp_path / "straight" / "state" / "trainer_state.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "state" / "trainer_state.pt", weights_only=False)
    assert b["step"] == 6
    for k in a["student"]:
        torch.testing.assert_close(a["student"][k], b["student"][k], rtol=1e-5, atol=1e-6)


def test_distill_errors(tiny_llama, tiny_models, data_dir, tmp_path):
    with pytest.raises(ValueError, match="runs on its own"):
        _distill(tiny_llama, data_dir, tmp_path / "x", 1, "--drafter", "model,eagle")
    with pytest.raises(ValueError, match="student-layers"):
        _distill(tiny_llama, data_dir, tmp_path / "x", 1, "--student-layers", "9")
    other = tmp_path / "other-vocab"
    other.mkdir()
    cfg = json.loads((tiny_models["qwen2"] / "config.json").read_text())
    cfg["vocab_size"] += 8
    (other / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM, AutoConfig

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    for f in tiny_models["qwen2"].glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        _distill(tiny_llama, data_dir, tmp_path / "x", 1, "--student", str(other))
