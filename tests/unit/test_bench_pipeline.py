"""The pipeline bench runs the same loop in-process and against real draft worker processes, side by side."""

from bench.pipeline import run_pipeline


def test_pipeline_bench_remote_setups_match_in_process(tiny_llama):
    rows = [{"id": "a", "prompt": "one two three one two three one two"}, {"id": "b", "prompt": "the cat sat on"}]
    r = run_pipeline(str(tiny_llama), "ngram", rows, k=3, max_tokens=12, dtype="fp32", chat=False)
    assert set(r["setups"]) == {"in_process", "remote_ahead1", "remote_ahead2_plain", "remote_ahead2"}
    for name, s in r["setups"].items():
        assert s["tokens"] == 2 * 12 and s["tokens_per_s"] > 0 and s["tau"] >= 1.0, (name, s)
        if name != "in_process":
            assert s["identical_to_in_process"], name
            assert s["verdict_to_next_block_ms"]["p50"] is None or s["verdict_to_next_block_ms"]["p50"] > 0
    assert set(r["ratios"]) == {"remote_ahead1_vs_in_process", "remote_ahead2_plain_vs_in_process",
                                "remote_ahead2_vs_in_process"}
    # ngram states no confidence: nothing to prepare blocks from
    assert all(s["draft_worker"]["blocks_prepared"] == 0 for n, s in r["setups"].items() if n != "in_process")
