"""N-gram drafter: prompt lookup decoding, no model at all.

Much of what a model writes is already in its context: an edited passage repeats the original, code quotes the
identifiers around it, a summary lifts whole phrases. Prompt lookup decoding (Saxena 2023,
https://github.com/apoorvumang/prompt-lookup-decoding) exploits that: take the last n tokens of the context, find
an earlier place where the same n tokens occur, and propose the tokens that followed them there. The target
verifies the guess like any other draft, so a wrong guess costs only the extra positions in one forward pass.
This is the same idea as transformers' `prompt_lookup_num_tokens` (assisted generation with
`PromptLookupCandidateGenerator`) and vLLM's ngram proposer (`speculative_config={"method": "ngram"}`).

Matching rule, for one context of L tokens:
- try n from `max_ngram` down to `min_ngram`; the longest suffix that re-occurs wins, because a longer match is
  better evidence that the text is being repeated;
- among occurrences of that suffix, the most recent one wins (transformers takes the earliest): the nearest copy
  is usually the passage being rewritten right now, and after a rejection it reflects the latest wording;
- propose up to k tokens that followed the occurrence. The continuation may run into the suffix itself (in a
  repeating pattern "a b a b" the match at 0 continues with "a b"), and it stops at the end of the context, so the
  proposal can be shorter than k. No match, a context shorter than min_ngram + 1 tokens, or k == 0 give an empty
  proposal.

The drafter keeps no state per sequence: every request carries its full context (see `base.py`), and a rescan is
cheap. Matching is vectorised with numpy: one comparison of the whole context against the last token, then one
shifted AND per extra n-gram length (stopping as soon as nothing matches), so a call is O(L * max_ngram) element
operations with a handful of numpy calls: tens of microseconds for 2k tokens, against ~20 ms for a target forward.
An incremental index would save that scan but would have to be repaired on every rollback of a running-ahead
draft; the scan is simpler and never wrong.

Proposals are point masses (`probs is None`): the verifier then accepts a draft token with the target's own
probability of it, which is exact for both greedy and sampled verification.
"""

from __future__ import annotations

import numpy as np

from workers.drafters.base import Drafter, DraftProposal, DraftRequest


def find_ngram_continuation(
    token_ids: list[int] | np.ndarray, k: int, max_ngram: int = 3, min_ngram: int = 1
) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest matching context suffix.

    token_ids: [L] the context. Returns [] when k <= 0, the context is too short, or no suffix of length
    min_ngram..max_ngram occurs earlier in the context.
    """
    length = len(token_ids)
    if k <= 0 or length < min_ngram + 1:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)  # [L]

    # An occurrence is named by the index e of its last token. Only e <= L - 2 counts: e = L - 1 is the suffix
    # itself. matches[e] is True while the n tokens ending at e equal the n tokens ending at L - 1.
    matches = tokens[: length - 1] == tokens[length - 1]  # [L - 1], n = 1
    best: np.ndarray | None = matches if min_ngram <= 1 else None  # [L - 1], longest n >= min_ngram so far
    for n in range(2, min(max_ngram, length - 1) + 1):
        # Extend every surviving match one token to the left: the token before e must equal token L - n.
        # Ends e < n - 1 have no room for an n-gram and drop out.
        extended = np.zeros_like(matches)
        extended[n - 1 :] = matches[n - 1 :] & (tokens[: length - n] == tokens[length - n])
        if not extended.any():
            break  # no n-gram match means no longer match either
        matches = extended
        if n >= min_ngram:
            best = matches
    if best is None or not best.any():
        return []

    # The most recent occurrence: the last True. flatnonzero is one pass; the array is only L - 1 long.
    end = int(np.flatnonzero(best)[-1])
    start = end + 1  # <= L - 1, so the continuation has at least one token
    return tokens[start : start + k].tolist()


class NgramDrafter(Drafter):
    """Prompt lookup: proposes the continuation of the most recent earlier occurrence of the context's suffix."""

    def __init__(self, k: int = 4, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if min_ngram < 1:
            raise ValueError(f"min_ngram must be >= 1, got {min_ngram}")
        if max_ngram < min_ngram:
            raise ValueError(f"max_ngram must be >= min_ngram, got max_ngram={max_ngram}, min_ngram={min_ngram}")
        # Default block length for callers that build requests from this drafter's config; `propose` always uses
        # the k of each request, so the engine's verify budget decides the length.
        self.k = k
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, requests: list[DraftRequest]) -> list[DraftProposal]:
        return [
            DraftProposal(tokens=find_ngram_continuation(r.token_ids, r.k, self.max_ngram, self.min_ngram))
            for r in requests
        ]
