"""The `specray` CLI contract on a tiny model: generate rows, bench offline JSON, clear errors."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main


def _prompts(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "The quick brown fox"}\n{"id": "b", "prompt": "def add(a, b):"}\n')
    return f


def test_generate_rows(tiny_llama, tmp_path):
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--target", str(tiny_llama), "--dtype", "fp32", "--draft", "ngram", "--k", "3",
               "--prompts", str(_prompts(tmp_path)), "--max-tokens", "12", "--json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    keys = {"id", "prompt", "text", "token_ids", "num_drafts", "num_draft_tokens", "num_accepted_tokens",
            "accepted_per_pos", "wall_s"}
    for r in rows:
        assert keys <= set(r)
        assert 1 <= len(r["token_ids"]) <= 12
        assert r["num_accepted_tokens"] <= r["num_draft_tokens"]


def test_generate_matches_target_only(tiny_llama, tmp_path):
    outs = []
    for draft in ("none", "ngram"):
        out = tmp_path / f"{draft}.jsonl"
        assert main(["generate", "--target", str(tiny_llama), "--dtype", "fp32", "--draft", draft, "--chat",
                     "--prompt", "Hello world! How", "--max-tokens", "20", "--json", str(out)]) == 0
        outs.append(json.loads(out.read_text())["token_ids"])
    assert outs[0] == outs[1]


def test_bench_offline_json(tiny_llama, tmp_path):
    out = tmp_path / "bench.json"
    rec = tmp_path / "rec.jsonl"
    rc = main(["bench", "offline", "--target", str(tiny_llama), "--dtype", "fp32", "--drafts", "none,ngram",
               "--peers", "hf_generate,hf_assisted", "--prompts", str(_prompts(tmp_path)), "--max-tokens", "10",
               "--json", str(out), "--records", str(rec)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"none", "ngram", "hf_generate", "hf_assisted"}
    for name, m in res["modes"].items():
        assert m["tokens_per_s"] > 0, name
        assert m["speedup"] > 0, name
    assert res["modes"]["ngram"]["identical_to_none"] == 1.0
    assert res["modes"]["hf_assisted"]["speedup_vs"] == "hf_generate"
    assert len(rec.read_text().splitlines()) == 4 * 2


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--target", "no-such-model", "--prompt", "x"], "cannot find model"),
    (["generate", "--target", "{tiny}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--target", "{tiny}", "--prompt", "x", "--draft", "bogus"], "unknown draft"),
    (["generate", "--target", "{tiny}", "--prompt", "x", "--max-tokens", "100000"], "maximum context length"),
    (["generate", "--target", "{tiny}", "--prompts", "/nonexistent.jsonl"], "nonexistent"),
])
def test_errors_are_one_line(argv, needle, tiny_llama, capsys):
    argv = [a.replace("{tiny}", str(tiny_llama)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_serve_flags_override_the_config_file(tmp_path, capsys):
    from cluster.cli import build_parser, serve_config
    from cluster.tls import write_certs

    (tmp_path / "app.yaml").write_text("target: {max_batch: 4, max_queued: null}\nrouter: {port: 9001}\n")
    base = ["serve", "--config", str(tmp_path / "app.yaml")]
    cfg = serve_config(build_parser().parse_args(base))
    assert (cfg.target.max_batch, cfg.target.max_queued, cfg.router.port, cfg.tls) == (4, None, 9001, None)
    write_certs(tmp_path / "tls", server_name="spec.internal")
    cfg = serve_config(build_parser().parse_args(base + ["--max-queued", "3", "--max-batch", "2", "--port", "9002",
                                                         "--tls-dir", str(tmp_path / "tls")]))
    assert (cfg.target.max_batch, cfg.target.max_queued, cfg.router.port) == (2, 3, 9002)
    assert cfg.tls.server_name == "spec.internal" and cfg.tls.load().server_name == "spec.internal"
    assert main(base + ["--max-queued", "-1"]) == 2  # a clear error, before anything starts
    assert "max_queued" in capsys.readouterr().err
    assert serve_config(build_parser().parse_args(base + ["--tree-width", "3"])).draft.tree_width == 3
    (tmp_path / "bad.yaml").write_text("draft: {max_hypotheses: -1}\n")
    assert main(["serve", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "max_hypotheses" in capsys.readouterr().err
    assert main(base + ["--tree-width", "0"]) == 2
    assert "tree_width" in capsys.readouterr().err
