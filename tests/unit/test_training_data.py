"""Draft-training data: the built-in prompt corpus (`training/prompts.py`) and `specray data` (`training/data.py`).

The corpus must be large, distinct, deterministic and free of benchmark prompts. The generator must produce, for
every prompt of a padded batch, exactly the greedy tokens the engine's target-only path produces for that prompt
alone, and stop at EOS (mid-batch, which exercises the batch compaction) or at max_new_tokens. The command is run
end to end on a tiny random model, locally and against a stub OpenAI server.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from training import prompts as corpus
from training.data import add_data_parser, generate, read_prompt_files, run_data
from workers.engine.engine import SpecEngine
from workers.engine.prompting import encode_prompt
from workers.engine.sequence import Request
from workers.models.loader import load_model

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):",
    "Hello world! How are you today? I am fine, thank you. And you?",
    "1 + 1 =",
    "a",
    "Speculative decoding drafts tokens cheaply and verifies them",
    "3 + 3 = 6.",
]

pytestmark = pytest.mark.usefixtures("torch_single_thread")


@pytest.fixture(scope="module")
def full_corpus():
    return corpus.build_prompts(seed=0)


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), dtype="fp32")


@pytest.fixture(scope="module")
def reference(target):
    """Greedy answers of the engine's target-only path, one prompt at a time, EOS ignored."""
    engine = SpecEngine(target, max_batch=1, max_model_len=256)
    reqs = [Request(f"r{i}", encode_prompt(target.tokenizer, p, chat=True), 24, num_draft_tokens=0, ignore_eos=True)
            for i, p in enumerate(PROMPTS)]
    return [s.output_ids for s in engine.run(reqs)]


# ------------------------------------------------------------------------------------------------------- corpus


def test_corpus_is_large_distinct_and_mixed(full_corpus):
    keys = [corpus.normalize(r["prompt"]) for r in full_corpus]
    assert len(full_corpus) >= 8000
    assert len(set(keys)) == len(keys)
    assert len({r["id"] for r in full_corpus}) == len(full_corpus)
    sources = Counter(r["source"] for r in full_corpus)
    assert set(sources) == {"template", "passage"} and sources["passage"] >= 500
    passages = [r["prompt"] for r in full_corpus if r["source"] == "passage"]
    assert all(len(p.split("\n\n", 1)[1]) <= corpus.PASSAGE_CHARS[1] + 20 for p in passages)


def test_corpus_excludes_benchmark_prompts(full_corpus):
    bench = corpus.bench_prompt_keys()
    assert len(bench) >= 40
    assert not bench & {corpus.normalize(r["prompt"]) for r in full_corpus}


def test_shipped_heldout_prompts_are_excluded():
    """The prompts the shipped drafters are evaluated on count as benchmark prompts; a plain one does not."""
    bench = corpus.bench_prompt_keys()
    heldout = corpus.BENCH_PROMPTS_DIR.parent.parent / "workers/drafters/checkpoints/smollm2-135m/heldout-chat.jsonl"
    rows = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
    assert len(rows) >= 20 and all(corpus.normalize(r["prompt"]) in bench for r in rows)
    assert corpus.normalize("A prompt that is not in any benchmark.") not in bench


def test_benchmark_prompts_are_filtered_out(monkeypatch):
    """Negative control for the exclusion: a benchmark prompt planted in a pool is dropped, even reformatted."""
    bench_text = json.loads((corpus.BENCH_PROMPTS_DIR / "chat.jsonl").read_text().splitlines()[2])["prompt"]
    planted = ["  " + bench_text.upper().replace(" ", "  "), "A prompt that is not in any benchmark."]
    monkeypatch.setattr(corpus, "_letter_prompts", lambda: planted)
    texts = [r["prompt"] for r in corpus.build_prompts(seed=0, sources=("template",))]
    assert planted[1] in texts and planted[0] not in texts


def test_corpus_is_deterministic_per_seed():
    a, b = corpus.build_prompts(3000, seed=7), corpus.build_prompts(3000, seed=7)
    assert a == b and len(a) == 3000
    assert [r["prompt"] for r in corpus.build_prompts(3000, seed=8)] != [r["prompt"] for r in a]


def test_python_doc_html_passages(tmp_path):
    para = "The interpreter reads a line, runs it and prints the result. " * 5
    (tmp_path / "tutorial").mkdir()
    (tmp_path / "tutorial" / "a.html").write_text(
        f"<html><body><div class='nav'>Index</div><p>{para}</p><pre>x = 1</pre><p><em>{para}</em></p></body></html>")
    out = corpus.python_doc_passages(tmp_path)
    assert out and all(corpus.PASSAGE_CHARS[0] <= len(p) <= corpus.PASSAGE_CHARS[1] for p in out)
    assert "Index" not in out[0] and "x = 1" not in out[0] and "<em>" not in out[0]
    assert corpus.python_doc_passages(tmp_path / "missing") == []


def test_self_instruct_requests():
    reqs = corpus.self_instruct_requests(50, seed=1)
    assert len(set(reqs)) == 50 and reqs == corpus.self_instruct_requests(50, seed=1)
    assert all("only." in r for r in reqs)
    with pytest.raises(ValueError, match="at most"):
        corpus.self_instruct_requests(10**6)


@pytest.mark.parametrize("reply, expected", [
    ("How do bees find their way back to the hive?", "How do bees find their way back to the hive?"),
    ("Question: Why is the sky blue at noon? It is because of scattering.", "Why is the sky blue at noon?"),
    ('  "What makes sourdough bread rise without yeast?"\nAnswer: wild yeast.',
     "What makes sourdough bread rise without yeast?"),
    ("1. Plan a cheap three-day trip to Lisbon.", "Plan a cheap three-day trip to Lisbon."),
    ("\n\n**Q:** How can I stop my cat scratching the sofa?", "How can I stop my cat scratching the sofa?"),
    # framings seen from SmolLM2-135M: the question inside is kept, the framing dropped
    ('A student asks a teacher: "What are salamanders?"', "What are salamanders?"),
    ("One practical task that a houseplant expert could do is to ask: How do I care for a cactus?",
     "How do I care for a cactus?"),
    # unusable: statements, the model talking as the assistant, refusals, meta-talk, noise, too short or long
    ("Barcelona is a city known for its vibrant culture, rich history, and stunning architecture.", None),
    ("I'm here to help you understand the basics of programming. How can I assist you?", None),
    ("Please provide the request, and I will provide a response.", None),
    ("Sure! Here is a question about bees:", None),
    ("I'm sorry, I cannot do that.", None),
    ("Here is a question a curious person might ask about tides?", None),
    ("Why?", None),
    ("", None),
    ("1234 5678 9012 3456 7890 ???", None),
    ("Why " + "x" * 400 + "?", None),
])
def test_clean_self_instruct(reply, expected):
    assert corpus.clean_self_instruct(reply) == expected


# --------------------------------------------------------------------------------------------------- generation


def test_batched_greedy_equals_unbatched(target, reference):
    batched = generate(target, PROMPTS, 24, batch_size=len(PROMPTS), progress=False)
    target.eos_token_ids, eos = [], target.eos_token_ids
    try:  # EOS off for the comparison with the engine, which ignored it
        batched_no_eos = generate(target, PROMPTS, 24, batch_size=4, progress=False)
        single = [generate(target, [p], 24, batch_size=1, progress=False)[0] for p in PROMPTS]
    finally:
        target.eos_token_ids = eos
    assert [r["prompt"] for r in batched] == PROMPTS
    assert [r["answer_ids"] for r in batched_no_eos] == [r["answer_ids"] for r in single] == reference
    for row, ref in zip(batched, reference):  # with EOS on: the same tokens, cut at the first EOS
        cut = next((i for i, t in enumerate(ref) if t in eos), None)
        assert row["answer_ids"] == ref[:cut]
        assert row["finish"] == ("length" if cut is None else "stop")
        assert row["prompt_ids"] == encode_prompt(target.tokenizer, row["prompt"], chat=True)
        assert row["answer"] == target.tokenizer.decode(row["answer_ids"], skip_special_tokens=True)


def test_stops_at_eos_mid_batch(target, reference):
    """Make a token the reference emits early and often an EOS: rows finish at different steps, the batch is
    compacted, and every row must still be its reference cut at its first EOS."""
    counts = Counter(t for ref in reference for t in ref[1:12])
    stop_tok = counts.most_common(1)[0][0]
    eos = target.eos_token_ids
    target.eos_token_ids = [stop_tok]
    try:
        rows = generate(target, PROMPTS, 24, batch_size=len(PROMPTS), progress=False)
    finally:
        target.eos_token_ids = eos
    finishes = Counter(r["finish"] for r in rows)
    assert finishes["stop"] >= 2
    for row, ref in zip(rows, reference):
        cut = ref.index(stop_tok) if stop_tok in ref else None
        assert row["answer_ids"] == ref[:cut] and stop_tok not in row["answer_ids"]
        assert row["finish"] == ("stop" if cut is not None else "length")


def test_max_new_tokens_and_sampling(target):
    rows = generate(target, PROMPTS, 5, batch_size=3, progress=False)
    assert all(len(r["answer_ids"]) == 5 and r["finish"] == "length" for r in rows if r["finish"] == "length")
    assert all(len(r["answer_ids"]) <= 5 for r in rows)
    a = generate(target, PROMPTS, 12, temperature=1.0, top_p=0.9, batch_size=4, seed=3, progress=False)
    b = generate(target, PROMPTS, 12, temperature=1.0, top_p=0.9, batch_size=4, seed=3, progress=False)
    c = generate(target, PROMPTS, 12, temperature=1.0, top_p=0.9, batch_size=4, seed=4, progress=False)
    greedy = generate(target, PROMPTS, 12, batch_size=4, progress=False)
    assert a == b and all(r["temperature"] == 1.0 for r in a)
    assert [r["answer_ids"] for r in a] != [r["answer_ids"] for r in c]
    assert [r["answer_ids"] for r in a] != [r["answer_ids"] for r in greedy]


# ------------------------------------------------------------------------------------------------------ command


def _args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_data_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["data", *argv])


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_data_end_to_end(tiny_llama, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"u{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    text = tmp_path / "more.txt"
    text.write_text("Tell me about foxes.\n\nTell me about  FOXES!\n")  # the second is a duplicate
    out = tmp_path / "out"
    args = _args("--target", str(tiny_llama), "--dtype", "fp32", "--prompts", str(prompts), str(text),
                 "--builtin", "40", "--self-instruct", "4", "--out", str(out), "--max-new-tokens", "8",
                 "--batch-size", "16", "--heldout", "0.1", "--sampled-fraction", "0.5")
    assert args.func is run_data
    assert run_data(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    train, held = _read(out / "train.jsonl"), _read(out / "heldout.jsonl")
    held_prompts = _read(out / "heldout_prompts.jsonl")
    meta = json.loads((out / "meta.json").read_text())
    n_prompts = len(PROMPTS) + 1 + 40 + meta["counts"]["prompts_by_source"]["self-instruct"]
    assert meta["counts"]["prompts"] == summary["prompts"] == n_prompts
    assert summary["rows"] == len(train) + len(held) == meta["counts"]["rows"]
    assert held_prompts and {r["prompt"] for r in held_prompts} == {r["prompt"] for r in held}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["id"] for r in train + held}) == len(train) + len(held)
    pairs = [(tuple(r["prompt_ids"]), tuple(r["answer_ids"])) for r in train + held]
    assert len(set(pairs)) == len(pairs)
    for r in train + held:
        assert {"id", "prompt", "prompt_ids", "answer_ids", "answer", "finish", "temperature"} <= set(r)
        assert 1 <= len(r["answer_ids"]) <= 8 and r["finish"] in ("stop", "length")
    temps = Counter(r["temperature"] for r in train + held)
    assert temps[0.0] >= n_prompts - 2 and temps[0.8] >= 0.4 * n_prompts
    assert meta["counts"]["answer_tokens"] == summary["answer_tokens"] == sum(len(r["answer_ids"])
                                                                               for r in train + held)
    assert meta["target"] == str(tiny_llama) and meta["arguments"]["builtin"] == 40


def test_run_data_time_budget_still_writes(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    args = _args("--target", str(tiny_llama), "--dtype", "fp32", "--builtin", "200", "--out", str(out),
                 "--max-new-tokens", "4", "--batch-size", "8", "--time-budget-s", "1e-6")
    assert run_data(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    c = meta["counts"]
    # the budget was gone before the first batch: each pass (greedy, sampled) still ran exactly one batch of 8
    assert meta["time_budget_hit"] and 0 < c["answered_prompts"] <= 16
    assert c["unanswered_prompts"] == 200 - c["answered_prompts"]
    rows = (out / "train.jsonl").read_text().splitlines() + (out / "heldout.jsonl").read_text().splitlines()
    assert len(rows) == c["rows"] > 0


def test_run_data_resume_answers_only_new_prompts(tiny_llama, tmp_path, capsys):
    # --heldout 0.5: each corpus has prompts held out by their hash (the at-least-one fallback, which depends on the
    # corpus, never comes into play), so one prompt lands on the same side in every run
    common = ["--target", str(tiny_llama), "--dtype", "fp32", "--max-new-tokens", "6",
              "--batch-size", "8", "--heldout", "0.5", "--sampled-fraction", "0"]
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    # a smaller corpus first: the same ids name other prompts in the bigger one
    assert run_data(_args(*common, "--builtin", "12", "--out", str(out))) == 0
    first = _read(out / "train.jsonl") + _read(out / "heldout.jsonl")
    common += ["--builtin", "30"]
    assert run_data(_args(*common, "--resume", "--out", str(out))) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert run_data(_args(*common, "--out", str(fresh))) == 0

    resumed = _read(out / "train.jsonl") + _read(out / "heldout.jsonl")
    meta = json.loads((out / "meta.json").read_text())
    assert all(r in resumed for r in first)  # kept as they were
    assert len(resumed) == len({r["prompt"] for r in resumed}) == 30 == summary["answered_prompts"]
    assert len({r["prompt_id"] for r in resumed}) == 30 and len({r["id"] for r in resumed}) == 30
    assert meta["counts"]["resumed_rows"] == len(first) and meta["counts"]["unanswered_prompts"] == 0
    assert meta["earlier_runs"][0]["builtin"] == 12 and meta["arguments"]["resume"]
    # the same prompts, on the same side of the split, as one uninterrupted run (answers are compared only for the
    # rows kept above: a random tiny model's near-tied logits may break differently in another batch composition)
    for split in ("train", "heldout"):
        got = {r["prompt"] for r in _read(out / f"{split}.jsonl")}
        assert got == {r["prompt"] for r in _read(fresh / f"{split}.jsonl")}
    held = _read(out / "heldout_prompts.jsonl")
    assert sorted(r["prompt"] for r in held) == sorted(r["prompt"] for r in _read(fresh / "heldout_prompts.jsonl"))
    assert len({r["id"] for r in held}) == len(held)
    assert {(r["prompt_id"], r["prompt"]) for r in _read(out / "heldout.jsonl")} <= {(r["id"], r["prompt"])
                                                                                      for r in held}


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "/nonexistent/prompts.jsonl"], "prompts file not found"),
    (["--prompts", "{bad}"], "invalid JSON"),
    (["--prompts", "{empty}", "--builtin", "0"], "no prompts"),
    (["--builtin", "5", "--heldout", "1.5"], "--heldout"),
])
def test_run_data_errors(tiny_llama, tmp_path, argv, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = [a.format(bad=tmp_path / "bad.jsonl", empty=tmp_path / "empty.txt") for a in argv]
    with pytest.raises(ValueError, match=message):
        run_data(_args("--target", str(tiny_llama), "--dtype", "fp32", "--out", str(tmp_path / "o"), *argv))


def test_read_prompt_files(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "prompt": "one"}\n\n{"prompt": "two", "category": "c"}\n')
    (tmp_path / "b.txt").write_text("three\n\nfour\n")
    rows = read_prompt_files([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")])
    assert [(r["id"], r["prompt"]) for r in rows] == [("x", "one"), ("a-3", "two"), ("b-1", "three"),
                                                      ("b-3", "four")]
    (tmp_path / "c.jsonl").write_text('{"id": "y"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        read_prompt_files([str(tmp_path / "c.jsonl")])


class _StubChat(BaseHTTPRequestHandler):
    """An OpenAI chat endpoint that answers every prompt by echoing it reversed."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions" and body["model"] == "stub"
        text = body["messages"][0]["content"][::-1]
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text},
                                         "finish_reason": "length" if body["max_tokens"] < 8 else "stop"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


def test_run_data_via_url(tiny_llama, tmp_path, target, capsys):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prompts = tmp_path / "p.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        out = tmp_path / "out"
        args = _args("--target", str(tiny_llama), "--url", f"http://127.0.0.1:{server.server_port}",
                     "--url-model", "stub", "--prompts", str(prompts), "--out", str(out), "--sampled-fraction", "0",
                     "--concurrency", "3")
        assert run_data(args) == 0
    finally:
        server.shutdown()
    rows = _read(out / "train.jsonl") + _read(out / "heldout.jsonl")
    assert sorted(r["prompt"] for r in rows) == sorted(PROMPTS)
    for r in rows:
        assert r["answer"] == r["prompt"][::-1] and r["finish"] == "stop"
        assert r["answer_ids"] == target.tokenizer(r["answer"], add_special_tokens=False)["input_ids"]
        assert r["prompt_ids"] == encode_prompt(target.tokenizer, r["prompt"], chat=True)
    assert json.loads((out / "meta.json").read_text())["mode"] == "url"
