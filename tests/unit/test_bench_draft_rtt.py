"""The draft round-trip bench really crosses a process boundary and measures something."""

from bench.draft_rtt import run_draft_rtt


def test_draft_rtt_measures_a_live_stream():
    r = run_draft_rtt(steps=30, warmup=5, timeout_s=60)
    assert r["steps"] == 30
    # a real round trip through another process cannot take under 20 microseconds
    assert 0.02 < r["round_trip_ms"]["p50"] <= r["round_trip_ms"]["p90"] < 1000
