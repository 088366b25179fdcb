"""The draft round-trip bench really crosses a process boundary and measures something."""

from bench.draft_rtt import run_draft_rtt, run_draft_rtt_bench


def test_draft_rtt_measures_a_live_stream():
    r = run_draft_rtt(steps=30, warmup=5, timeout_s=60)
    assert r["steps"] == 30 and len(r["samples_s"]) == 30 and r["mutual_tls"] is False
    # a real round trip through another process cannot take under 20 microseconds
    assert 0.02 < r["round_trip_ms"]["p50"] <= r["round_trip_ms"]["p90"] < 1000


def test_draft_rtt_compares_plain_and_mutual_tls_in_one_run():
    r = run_draft_rtt_bench(steps=20, compare_tls=True, rounds=2)
    assert r["steps"] == 20 and set(r["round_trip_ms"]) == {"plain", "mtls"}
    for v in r["round_trip_ms"].values():
        assert 0.02 < v["p50"] <= v["p90"] < 1000
    assert r["mtls_vs_plain_p50"] == round(r["round_trip_ms"]["mtls"]["p50"] / r["round_trip_ms"]["plain"]["p50"], 3)
