"""NgramDrafter: prompt lookup matching rules, edge cases and cost."""

from __future__ import annotations

import random
import time

import pytest

from workers.drafters.base import DraftRequest
from workers.drafters.ngram import NgramDrafter


def propose(token_ids: list[int], k: int, **kwargs) -> list[int]:
    proposal = NgramDrafter(**kwargs).propose([DraftRequest(seq_id="s", token_ids=token_ids, k=k)])[0]
    assert proposal.probs is None
    assert all(isinstance(t, int) for t in proposal.tokens)
    return proposal.tokens


def test_proposes_continuation_of_match():
    # suffix "1 2 3" occurred at the start, followed by 7 8 9 4
    assert propose([1, 2, 3, 7, 8, 9, 4, 5, 1, 2, 3], k=3) == [7, 8, 9]


def test_most_recent_match_preferred():
    # "1 2" occurs at 0 (-> 10 11) and at 4 (-> 20 21); the later one wins
    assert propose([1, 2, 10, 11, 1, 2, 20, 21, 5, 1, 2], k=2) == [20, 21]


def test_longest_ngram_preferred_over_more_recent_shorter_match():
    # "3" alone last occurs at 8 (-> 30), but "2 3" occurs at 1..2 (-> 20); the longer match wins
    assert propose([1, 2, 3, 20, 21, 9, 9, 9, 3, 30, 31, 2, 3], k=2, max_ngram=3) == [20, 21]
    # with max_ngram=1 only the last token is matched, so the most recent "3" wins
    assert propose([1, 2, 3, 20, 21, 9, 9, 9, 3, 30, 31, 2, 3], k=2, max_ngram=1) == [30, 31]


def test_min_ngram_rejects_shorter_matches():
    ctx = [5, 3, 40, 41, 7, 8, 9, 1, 3]  # only the 1-gram "3" re-occurs
    assert propose(ctx, k=2, min_ngram=1) == [40, 41]
    assert propose(ctx, k=2, min_ngram=2) == []


def test_no_match_gives_empty():
    assert propose([1, 2, 3, 4, 5, 6], k=4) == []


def test_k_zero_gives_empty():
    assert propose([1, 2, 1, 2, 1], k=0) == []


@pytest.mark.parametrize("ctx", [[], [7], [7, 8]])
def test_short_contexts_never_raise(ctx):
    assert propose(ctx, k=4) == []


def test_two_equal_tokens_match():
    assert propose([7, 7], k=4) == [7]


def test_continuation_truncated_at_end_of_context():
    # "4 5" at 3..4 is followed by only two tokens before the context ends
    assert propose([0, 1, 2, 4, 5, 6, 4, 5], k=5) == [6, 4, 5]


def test_continuation_may_overlap_the_suffix():
    # repeating pattern: the most recent earlier "a b" (at 2..3) continues into the suffix itself
    assert propose([1, 2, 1, 2, 1, 2], k=4) == [1, 2]
    assert propose([1, 2, 1, 2, 1, 2], k=4, max_ngram=2) == [1, 2]


def test_batch_keeps_request_order_and_per_request_k():
    drafter = NgramDrafter()
    proposals = drafter.propose(
        [
            DraftRequest(seq_id="a", token_ids=[1, 2, 3, 4, 1, 2], k=1),
            DraftRequest(seq_id="b", token_ids=[], k=3),
            DraftRequest(seq_id="c", token_ids=[9, 8, 7, 6, 9, 8], k=4),
        ]
    )
    assert [p.tokens for p in proposals] == [[3], [], [7, 6, 9, 8]]
    assert drafter.propose([]) == []


def test_rejects_bad_config():
    with pytest.raises(ValueError):
        NgramDrafter(min_ngram=0)
    with pytest.raises(ValueError):
        NgramDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError):
        NgramDrafter(k=-1)


def test_agrees_with_brute_force_reference():
    def reference(ctx: list[int], k: int, max_n: int, min_n: int) -> list[int]:
        for n in range(max_n, min_n - 1, -1):
            if k <= 0 or len(ctx) < n + 1:
                continue
            suffix = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):
                if ctx[start : start + n] == suffix:
                    return ctx[start + n : start + n + k]
        return []

    rng = random.Random(0)
    for _ in range(500):
        ctx = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        k, max_n = rng.randrange(0, 6), rng.randrange(1, 5)
        min_n = rng.randrange(1, max_n + 1)
        assert propose(ctx, k, max_ngram=max_n, min_ngram=min_n) == reference(ctx, k, max_n, min_n), (ctx, k)


def test_fast_on_2k_token_context():
    rng = random.Random(0)
    repetitive = [rng.randrange(8) for _ in range(2048)]  # many matches at every n
    distinct = [rng.randrange(49_152) for _ in range(2048)]  # almost no matches
    drafter = NgramDrafter()
    for ctx in (repetitive, distinct):
        requests = [DraftRequest(seq_id="s", token_ids=ctx, k=8)]
        drafter.propose(requests)  # warm-up
        calls = 200
        start = time.perf_counter()
        for _ in range(calls):
            drafter.propose(requests)
        per_call = (time.perf_counter() - start) / calls
        assert per_call < 5e-3, f"{per_call * 1e3:.2f} ms per call"
